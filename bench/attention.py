"""Training cost of a two-stream mask: FlexAttention against the dense SDPA reference.

    leaplm bench-attention --lengths 512,2048 --out runs/attention_bench
    leaplm bench-attention --mask jacobi_forcing --lengths 512,2048 --out runs/attention_bench_jf

For each sample length L (prompt + response; the two-stream row is about 2L wide) and each
backend, one process times ``--steps`` training steps (forward, loss, backward) of the
recipe's loss on the tiny teacher's architecture (random weights, positions raised to fit) and
reports training tokens/s and peak memory. ``--mask`` picks the layout: ``block_diffusion``
(ar2bd's ``[clean | noisy]`` rows, the default) or ``jacobi_forcing`` (``[prompt, k_0, last_0,
...]`` rows whose noisy states differ from the fixed point in the second half of each block,
with its consistency + AR loss). Every measurement runs in a fresh subprocess, so peak memory is that configuration's alone: on GPUs ``torch.cuda.max_memory_allocated``; on
CPU the peak resident set size of the process minus its size after the model is built (so on
CPU it includes the warm-up step, and for FlexAttention its compilation).

FlexAttention has no backward pass on CPU, so there it is timed forward-only (under
``torch.no_grad``), and the dense backend is timed both ways so the two can be compared; the
``mode`` column says which. On a GPU both backends train.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from leaplm.losses import jacobi_forcing as jf_loss
from leaplm.losses.block_diffusion import block_diffusion_loss_sum, build_batch, sample_masks
from leaplm.models import jacobi_forcing as jf_model
from leaplm.models.block_diffusion import convert, training_attention
from leaplm.models.zoo import EMBEDDED_TEACHER, build_from_config, load_tokenizer, resolve


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


MASKS = ("block_diffusion", "jacobi_forcing")


def measure(length: int, backend: str, mode: str, steps: int, block_size: int, batch_size: int,
            mask: str = "block_diffusion") -> dict[str, Any]:
    """Time ``steps`` steps of one configuration in this process; return one result row."""
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {', '.join(MASKS)}, got {mask!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(EMBEDDED_TEACHER)
    config = json.loads((Path(resolve(EMBEDDED_TEACHER)) / "config.json").read_text())
    init = {"architecture": config["model_type"], "max_position_embeddings": 2 * length + block_size,
            **{k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                      "num_key_value_heads", "tie_word_embeddings")}}
    model = build_from_config(init, tokenizer, attn_implementation="flex_attention" if backend == "flex" else "sdpa")
    n_prompt = length // 8
    prompts = [[1] * n_prompt for _ in range(batch_size)]
    responses = [[2 + (i % 200) for i in range(length - n_prompt)] for _ in range(batch_size)]
    if mask == "block_diffusion":
        spec = convert(model, tokenizer, block_size)
    else:
        half = block_size // 2
        pairs = [[(fixed[:half] + [1] * (len(fixed) - half), fixed)
                  for fixed in (r[i:i + block_size] for i in range(0, len(r), block_size))] for r in responses]
    model.to(device).train(mode == "train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def loss_of_one_batch() -> torch.Tensor:
        if mask == "jacobi_forcing":
            layout, targets = jf_loss.build_batch(prompts, pairs)
            layout, targets = layout.to(device), targets.to(device)
            logits = model(input_ids=layout.input_ids, position_ids=layout.position_ids,
                           attention_mask=jf_model.training_attention(model, layout, backend)).logits
            return jf_loss.jacobi_forcing_loss_sum(logits, targets, ar_weight=1.0)[0]
        masks, rates = sample_masks([len(r) for r in responses], block_size, 0.001, 1.0, complementary=True)
        layout, targets = build_batch(prompts, responses, masks, rates, block_size, spec.mask_token_id,
                                      inverse_t_weight=False, ar_weight=0.0)
        layout, targets = layout.to(device), targets.to(device)
        logits = model(input_ids=layout.input_ids, position_ids=layout.position_ids,
                       attention_mask=training_attention(model, layout, backend)).logits
        return block_diffusion_loss_sum(logits, targets)[0]

    def step() -> None:
        with torch.set_grad_enabled(mode == "train"):
            loss = loss_of_one_batch()
        if mode == "train":
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    base_rss = _rss_mb()  # before the warm-up: the peak of a fresh process can only be measured once
    step()  # warm-up: FlexAttention compiles here
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_mb() - base_rss
    tokens = steps * batch_size * length
    return {"mask": mask, "length": length, "backend": backend, "mode": mode, "batch_size": batch_size,
            "steps": steps, "tokens_per_s": tokens / elapsed, "s_per_step": elapsed / steps, "peak_mem_mb": peak,
            "device": str(device), "torch_threads": torch.get_num_threads()}


def plan(device_is_cuda: bool) -> list[tuple[str, str]]:
    """(backend, mode) pairs this hardware can run."""
    if device_is_cuda:
        return [("dense", "train"), ("flex", "train")]
    return [("dense", "train"), ("dense", "forward"), ("flex", "forward")]


def run(lengths: list[int], steps: int, block_size: int, batch_size: int, out: Path,
        mask: str = "block_diffusion") -> list[dict[str, Any]]:
    rows = []
    for length in lengths:
        for backend, mode in plan(torch.cuda.is_available()):
            cmd = [sys.executable, "-m", "leaplm.bench.attention", "--one", f"{length},{backend},{mode}",
                   "--steps", str(steps), "--block-size", str(block_size), "--batch-size", str(batch_size),
                   "--mask", mask]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"L={length} {backend:5s} {mode:7s} {rows[-1]['tokens_per_s']:9.0f} tok/s "
                  f"{rows[-1]['peak_mem_mb']:8.1f} MB", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_bench.json").write_text(json.dumps(rows, indent=2))
    lines = ["| mask | length | backend | mode | tokens/s | s/step | peak mem (MB) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['mask']} | {r['length']} | {r['backend']} | {r['mode']} | {r['tokens_per_s']:.0f} | "
              f"{r['s_per_step']:.3f} | {r['peak_mem_mb']:.1f} |" for r in rows]
    (out / "attention_bench.md").write_text("\n".join(lines) + "\n")
    return rows


def run_command(a: argparse.Namespace) -> None:
    run([int(x) for x in a.lengths.split(",")], a.steps, a.block_size, a.batch_size, Path(a.out), a.mask)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", default="512,2048", help="sample lengths (prompt + response), comma separated")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration, after one warm-up")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--mask", default="block_diffusion", choices=MASKS, help="which recipe's layout and loss")
    p.add_argument("--out", default="runs/attention_bench")


def main() -> None:
    """Subprocess entry: measure one configuration and print its row as JSON."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    p.add_argument("--one", required=True, help="length,backend,mode")
    a = p.parse_args()
    length, backend, mode = a.one.split(",")
    print(json.dumps(measure(int(length), backend, mode, a.steps, a.block_size, a.batch_size, a.mask)))


if __name__ == "__main__":
    main()
