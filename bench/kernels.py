"""The decode-step kernels, fused against eager, on random logits.

    leaplm bench-kernels --vocabs 512,32000,152064

Per vocabulary size, the commit step (statistics of ``[batch, slots, vocab]`` logits) and the
block verification (``[batch, k + 1, vocab]`` logits against k candidates) run through the eager
reference and through the path :func:`~leaplm.inference.kernels.backend` picks on this device
(the Triton kernel on CUDA, the compiled one on CPU; compiled once before timing), alternately,
``--repeats`` times each; the table reports the median milliseconds per call and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch

from leaplm.inference.kernels import fused_backend, use_backend
from leaplm.inference.kernels.commit import commit_stats
from leaplm.inference.kernels.verify import verify_block


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure(vocab: int, batch: int, slots: int, repeats: int) -> list[dict[str, Any]]:
    """Both operations at one vocabulary size: eager against fused, interleaved."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(batch, slots, vocab, generator=g, device=device) * 3  # [b, s, v]
    candidates = logits[:, :-1].argmax(-1)  # [b, s - 1] all accepted: the longest verification
    fused_name = fused_backend(device)
    operations = {
        "commit": lambda: commit_stats(logits),
        "verify": lambda: verify_block(logits, candidates),
    }
    rows = []
    for name, op in operations.items():
        with use_backend(fused_name):
            op()  # compile (CPU) or autotune-free first launch (CUDA) outside the timing
        times: dict[str, list[float]] = {"eager": [], "fused": []}
        for _ in range(repeats):
            for label, which in (("eager", "reference"), ("fused", fused_name)):
                with use_backend(which):
                    times[label].append(_time(op, device))
        eager, fused = (statistics.median(times[k]) * 1e3 for k in ("eager", "fused"))
        rows.append(dict(operation=name, vocab=vocab, shape=f"{batch}x{slots}x{vocab}", fused_backend=fused_name,
                         eager_ms=eager, fused_ms=fused, speedup=eager / fused, device=device.type))
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| operation | logits | fused path | eager ms | fused ms | speedup |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['operation']} | {r['shape']} | {r['fused_backend']} | {r['eager_ms']:.2f} | {r['fused_ms']:.2f} | "
              f"{r['speedup']:.2f}x |" for r in rows]
    return "\n".join(lines)


def run(vocabs: list[int], batch: int, slots: int, repeats: int) -> list[dict[str, Any]]:
    return [row for vocab in vocabs for row in measure(vocab, batch, slots, repeats)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocabs", default="512,32000,152064", help="comma-separated vocabulary sizes")
    parser.add_argument("--batch", type=int, default=4, help="rows of the decode batch")
    parser.add_argument("--slots", type=int, default=17, help="positions per row (a block of 16 plus one)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per path")


def run_command(args) -> None:
    print(markdown(run([int(v) for v in args.vocabs.split(",")], args.batch, args.slots, args.repeats)))
