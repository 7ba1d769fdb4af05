"""Fused kernels for the decode step: one function per operation, three implementations each.

- ``triton``: a Triton kernel, used on CUDA tensors when ``triton`` is installed (the tests also
  run it on CPU tensors under ``TRITON_INTERPRET=1``);
- ``compiled``: the same one-pass formulation in torch, compiled by ``torch.compile`` (inductor
  writes one loop over the vocabulary per row), used on CPU;
- ``reference``: plain eager torch, the definition the tests compare against.

:func:`backend` picks one by the tensor's device. ``LEAPLM_KERNELS=reference`` in the environment,
or the :func:`reference_kernels` context manager, forces the reference everywhere (to rule the
kernels out when a result looks wrong, or where compiling is not wanted).

Operations: :func:`~leaplm.inference.kernels.commit.commit_stats` (the per-slot statistics of
diffusion-style commit rules), :func:`~leaplm.inference.kernels.verify.verify_block` and
:func:`~leaplm.inference.kernels.verify.verify_tree` (greedy verification for Jacobi and
speculative decoders).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Callable, Iterator

import torch

BACKENDS = ("reference", "compiled", "triton")
_forced: list[str] = []  # innermost reference_kernels() last


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Within the block every kernel function runs its eager reference."""
    _forced.append("reference")
    try:
        yield
    finally:
        _forced.pop()


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend(x: torch.Tensor) -> str:
    """Which implementation runs on ``x``: forced reference, Triton on CUDA, compiled on CPU."""
    if _forced or os.environ.get("LEAPLM_KERNELS", "") == "reference":
        return "reference"
    if x.is_cuda and triton_available():
        return "triton"
    if x.device.type == "cpu":
        return "compiled"
    return "reference"


_compiled: dict[Callable, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)`` built once per process; dynamic shapes, so new sizes rarely recompile."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]
