"""Peak memory and time of one loss step: chunked linear + CE against plain CE over full logits.

    leaplm bench-loss --vocabs 32000,152064 --seq 2048 --hidden 896

One step is forward and backward of the summed next-token CE of ``seq`` random hidden states
(the last layer's output, fp32) through a random ``[vocab, hidden]`` head; ``hidden`` 896 is
Qwen2.5-0.5B's. ``plain`` computes ``hidden @ head.T`` and ``F.cross_entropy`` over it;
``chunked`` is :func:`~leaplm.losses.linear_cross_entropy.linear_cross_entropy_sum`.

Each variant runs in a fresh subprocess. Peak memory is the process's peak resident set size
(``ru_maxrss``) after the step minus its size once the inputs exist, so it counts everything the
step allocates: the logits and their gradient for ``plain``, the head's gradient and the chunk
buffers for ``chunked`` (on a GPU: ``torch.cuda.max_memory_allocated`` minus the inputs). The
driver checks that both variants give the same loss and gradients.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from leaplm.losses.linear_cross_entropy import DEFAULT_CHUNK, linear_cross_entropy_sum

VARIANTS = ("plain", "chunked")


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(variant: str, vocab: int, seq: int, hidden: int, chunk_size: int, grads_to: Path | None) -> dict[str, Any]:
    """One loss step of ``variant`` in this process; saves gradient samples to ``grads_to``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=device).manual_seed(0)
    h = (torch.randn(seq, hidden, generator=g, device=device) * 0.5).requires_grad_()  # [s, h]
    head = (torch.randn(vocab, hidden, generator=g, device=device) / hidden ** 0.5).requires_grad_()  # [v, h]
    labels = torch.randint(0, vocab, (seq,), generator=g, device=device)  # [s]
    before = _peak_mb(device)
    start = time.perf_counter()
    if variant == "plain":
        loss = F.cross_entropy(h @ head.T, labels, reduction="sum")
    elif variant == "chunked":
        loss = linear_cross_entropy_sum(h, head, labels, chunk_size=chunk_size)
    else:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = _peak_mb(device) - before
    if grads_to is not None:
        torch.save({"loss": loss.detach().cpu(), "hidden": h.grad.cpu(), "head": head.grad[::97].cpu()}, grads_to)
    return dict(variant=variant, vocab=vocab, seq=seq, hidden=hidden, device=device.type, seconds=seconds,
                tokens_per_s=seq / seconds, peak_mb=peak)


def run(vocabs: list[int], seq: int, hidden: int, chunk_size: int) -> list[dict[str, Any]]:
    """Both variants per vocabulary, each in its own subprocess; adds the agreement check."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in vocabs:
            saved = {}
            for variant in VARIANTS:
                path = Path(tmp) / f"{variant}-{vocab}.pt"
                cmd = [sys.executable, "-m", "leaplm.bench.loss", "--measure", variant, "--vocabs", str(vocab),
                       "--seq", str(seq), "--hidden", str(hidden), "--chunk-size", str(chunk_size),
                       "--grads-to", str(path)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                saved[variant] = torch.load(path)
            plain, chunked = saved["plain"], saved["chunked"]
            rows[-1].update(
                loss_rel_diff=float((chunked["loss"] - plain["loss"]).abs() / plain["loss"].abs()),
                grad_max_abs_diff=max(float((chunked[k] - plain[k]).abs().max()) for k in ("hidden", "head")),
                # nan when plain CE did not grow the peak RSS at all (tiny sizes fit in memory already touched)
                peak_ratio=rows[-1]["peak_mb"] / rows[-2]["peak_mb"] if rows[-2]["peak_mb"] > 0 else float("nan"),
                speed_ratio=rows[-1]["tokens_per_s"] / rows[-2]["tokens_per_s"],
            )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| vocab | seq | hidden | loss | step s | tokens/s | peak MB | peak vs plain | speed vs plain | "
             "loss rel. diff | max grad diff |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = (f"{r['peak_ratio']:.2f}x | {r['speed_ratio']:.2f}x | {r['loss_rel_diff']:.1e} | "
                 f"{r['grad_max_abs_diff']:.1e}") if "peak_ratio" in r else "1.00x | 1.00x | - | -"
        lines.append(f"| {r['vocab']} | {r['seq']} | {r['hidden']} | {r['variant']} | {r['seconds']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['peak_mb']:.0f} | {extra} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocabs", default="32000,152064", help="comma-separated vocabulary sizes")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per step")
    parser.add_argument("--hidden", type=int, default=896, help="hidden size (Qwen2.5-0.5B's is 896)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help="rows per chunk of the chunked loss")


def run_command(args) -> None:
    print(markdown(run([int(v) for v in args.vocabs.split(",")], args.seq, args.hidden, args.chunk_size)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--measure", choices=VARIANTS, help="measure one variant in this process (internal)")
    parser.add_argument("--grads-to", type=Path)
    args = parser.parse_args()
    vocabs = [int(v) for v in args.vocabs.split(",")]
    if args.measure:
        print(json.dumps(measure(args.measure, vocabs[0], args.seq, args.hidden, args.chunk_size, args.grads_to)))
    else:
        print(markdown(run(vocabs, args.seq, args.hidden, args.chunk_size)))


if __name__ == "__main__":
    main()
