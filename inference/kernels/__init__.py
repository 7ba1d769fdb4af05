"""Fused kernels for the decode step: one function per operation, three implementations each.

- ``triton``: a Triton kernel, used on CUDA tensors when ``triton`` is installed (the tests also
  run it on CPU tensors under ``TRITON_INTERPRET=1``);
- ``compiled``: the same one-pass formulation in torch, compiled by ``torch.compile`` (inductor
  writes one loop over the vocabulary per row), used on CPU;
- ``reference``: plain eager torch, the definition the tests compare against.

:func:`backend` picks one by the tensor's device (and, on CPU, its vocabulary size).
``LEAPLM_KERNELS=reference`` in the environment, or ``with use_backend("reference"):``, forces the
reference everywhere (to rule the kernels out when a result looks wrong, or where compiling is not
wanted); ``use_backend`` also forces a fused path (tests, benchmarks).

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
# Below this vocabulary the compiled CPU path does not pay for its compilation (seconds per process
# and per new shape pattern) and dispatch overhead: `leaplm bench-kernels` measures the crossover.
COMPILED_MIN_VOCAB = 8192
_forced: list[str] = []  # innermost use_backend() last


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block every kernel function runs ``name`` (``"reference"``: the eager definitions)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def fused_backend(device: torch.device) -> str:
    """The fused implementation for ``device``: Triton on CUDA, compiled on CPU, else the reference
    (CUDA without triton has no compiler for either)."""
    if device.type == "cuda":
        return "triton" if triton_available() else "reference"
    return "compiled" if device.type == "cpu" else "reference"


def backend(x: torch.Tensor) -> str:
    """Which implementation runs on logits ``x`` [..., v]: a forced one, the reference when
    ``LEAPLM_KERNELS=reference``, else the fused one (on CPU from ``COMPILED_MIN_VOCAB`` up)."""
    if _forced:
        return _forced[-1]
    if os.environ.get("LEAPLM_KERNELS", "") == "reference":
        return "reference"
    fused = fused_backend(x.device)
    if fused == "compiled" and x.shape[-1] < COMPILED_MIN_VOCAB:
        return "reference"
    return fused


_compiled: dict[Callable, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)`` built once per process; dynamic shapes, so new sizes rarely recompile."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


def first_argmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, lowest index holding it) over the last dim of ``x`` [..., v], for compiled paths.

    Equals ``x.max(-1)`` but is written as a max and a min over matching indices: inductor
    vectorises these two reductions on CPU, not its fused argmax (measured 1.6x faster at v=152k
    although it reads ``x`` twice).
    """
    top = x.amax(-1)  # [...]
    index = torch.arange(x.shape[-1], device=x.device)  # [v]
    return top, torch.where(x == top[..., None], index, x.shape[-1]).amin(-1)
