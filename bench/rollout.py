"""Rollout throughput: our Jacobi trajectory collector against the reference's way of collecting.

    leaplm bench-rollout MODEL --n 64 --block-size 16 --out DIR

Both collect greedy Jacobi trajectories of the same model on the same prompts (synthetic test
prompts, the tasks taken in turn):

- ``ours``: :func:`~leaplm.inference.decoders.jacobi.collect_jacobi_trajectories` through the engine with
  the KV cache, once per batch size in ``--batch-sizes`` (batch size 1 separates the cache's gain
  from batching's);
- ``reference``: :func:`reference_trajectories`, written here as CLLM's ``generate_trajectory.py``
  does it: one prompt at a time, no KV cache, every Jacobi iteration a forward of the whole
  prompt + answer so far + block, the block's initial guess drawn from the prompt's tokens, a
  block iterated until an iteration leaves it unchanged.

Greedy fixed points are the model's greedy answer whatever the initial guess, so both collect the
same blocks with the same fixed points (checked, and reported as ``same_fixed_points``); their
states differ (the reference guesses the first token too). Work is interleaved: each chunk of
prompts is collected by every collector before the next chunk, rotating who goes first, so a
noisy neighbour slows all alike. Writes ``rollout_bench.json`` and ``rollout_bench.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from leaplm.bench.commands import command_line
from leaplm.bench.decoders import machine_info
from leaplm.data.tasks import make_split
from leaplm.inference.decoders.jacobi import collect_jacobi_trajectories
from leaplm.inference.engine import Engine
from leaplm.inference.evaluate import format_table, load_for_eval, resolve_tasks, task_prompts


def reference_trajectories(engine: Engine, prompt: list[int], jacobi_block_size: int, max_new_tokens: int,
                           rng: random.Random) -> tuple[list[dict[str, Any]], int]:
    """One prompt's blocks collected as CLLM's ``generate_trajectory.py`` does; (rows, forwards).

    Rows carry ``block_index``, ``states`` and ``fixed_point`` like the engine's collector, the
    last block's fixed point cut after the answer's first stop token.
    """
    model, rows, answer, forwards = engine.model, [], [], 0
    while len(answer) < max_new_tokens:
        n = min(jacobi_block_size, max_new_tokens - len(answer))
        context = prompt + answer
        state = rng.choices(prompt, k=n)
        states = [state]
        while True:
            with torch.inference_mode():
                ids = torch.tensor([context + state], device=engine.device)
                logits = model(input_ids=ids, use_cache=False).logits[0, len(context) - 1:-1]  # [n, v]
            forwards += 1
            following = logits.argmax(-1).tolist()
            if following == state:
                break
            states.append(following)
            state = following
        stops = engine.is_stop(torch.tensor(state, device=engine.device)).nonzero()
        end = int(stops[0]) + 1 if len(stops) else n
        rows.append({"block_index": len(rows), "states": [s[:end] for s in states], "fixed_point": state[:end]})
        answer += state[:end]
        if len(stops):
            break
    return rows, forwards


def bench_prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """``n`` synthetic test prompts, the tasks taken in turn."""
    tasks = resolve_tasks(None)
    per_task = -(-n // len(tasks))
    examples = [make_split(task, "test", per_task, seed) for task in tasks]
    ordered = [examples[t][i] for i in range(per_task) for t in range(len(tasks))][:n]
    return task_prompts(tokenizer, ordered)


def run_rollout_bench(model, tokenizer, model_name: str, n: int = 64, jacobi_block_size: int = 16,
                      max_new_tokens: int = 96, batch_sizes: tuple[int, ...] = (32, 8, 1),
                      out_dir: str | Path = "runs/rollout_bench", *, seed: int = 0,
                      command: str | None = None) -> list[dict[str, Any]]:
    """Time the collectors on ``n`` prompts; write rollout_bench.json/.md; return the rows.

    ``ours`` runs once per batch size; prompts are handed out in chunks of the largest, sorted by
    length as our collector groups them, and each chunk goes to every collector in turn.
    """
    engine = Engine(model, tokenizer)
    prompts = sorted(bench_prompts(tokenizer, n, seed), key=len)
    rng = random.Random(seed)

    def ours(size: int):
        def collect(chunk: list[list[int]]) -> tuple[list[list[list[int]]], int]:
            rows = collect_jacobi_trajectories(engine, chunk, jacobi_block_size, max_new_tokens, seed=seed,
                                               batch_size=size)
            return _by_prompt(rows, len(chunk)), sum(len(r["states"]) for r in rows)
        return collect

    def reference(chunk: list[list[int]]) -> tuple[list[list[list[int]]], int]:
        found = [reference_trajectories(engine, p, jacobi_block_size, max_new_tokens, rng)[0] for p in chunk]
        return [[r["fixed_point"] for r in rows] for rows in found], sum(len(r["states"]) for rows in found for r in rows)

    collectors = [("ours", {"batch_size": size, "kv_cache": True}, ours(size)) for size in batch_sizes]
    collectors.append(("reference", {"batch_size": 1, "kv_cache": False}, reference))
    for _, _, collect in collectors:  # warm-up: allocator growth, lazy initialisation
        collect(prompts[:2])
    totals = [{"wall_s": 0.0, "trajectories": 0, "states": 0, "fixed_points": []} for _ in collectors]
    chunk_size = max(batch_sizes)
    for chunk_no, first in enumerate(range(0, len(prompts), chunk_size)):
        chunk = prompts[first:first + chunk_size]
        shift = chunk_no % len(collectors)
        for k in list(range(shift, len(collectors))) + list(range(shift)):  # rotate who goes first
            start = time.perf_counter()
            fixed_points, states = collectors[k][2](chunk)
            totals[k]["wall_s"] += time.perf_counter() - start
            totals[k]["trajectories"] += sum(len(blocks) for blocks in fixed_points)
            totals[k]["states"] += states
            totals[k]["fixed_points"] += fixed_points

    baseline = totals[-1]["trajectories"] / totals[-1]["wall_s"]
    rows = []
    for (name, settings, _), total in zip(collectors, totals):
        per_s = total["trajectories"] / total["wall_s"]
        rows.append({"model": model_name, "collector": name, "settings": settings, "prompts": len(prompts),
                     "jacobi_block_size": jacobi_block_size, "trajectories": total["trajectories"],
                     "states_per_trajectory": total["states"] / max(total["trajectories"], 1),
                     "wall_s": total["wall_s"], "trajectories_per_s": per_s, "speedup_vs_reference": per_s / baseline,
                     "same_fixed_points": total["fixed_points"] == totals[-1]["fixed_points"]})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rollout_bench.json").write_text(json.dumps(rows, indent=2))
    command = command or (f"run_rollout_bench(model, tokenizer, {model_name!r}, n={n}, "
                          f"jacobi_block_size={jacobi_block_size}, "
                          f"max_new_tokens={max_new_tokens}, batch_sizes={tuple(batch_sizes)})")
    (out / "rollout_bench.md").write_text(render_markdown(rows, command, engine.device))
    return rows


def _by_prompt(rows: list[dict[str, Any]], n_prompts: int) -> list[list[list[int]]]:
    """The engine collector's fixed points grouped per prompt, in block order."""
    grouped: list[list[list[int]]] = [[] for _ in range(n_prompts)]
    for row in rows:
        grouped[row["prompt_index"]].append(row["fixed_point"])
    return grouped


ROLLOUT_COLUMNS = [("collector", "collector"), ("settings", "settings"), ("prompts", "prompts"),
                   ("trajectories", "trajectories"), ("states_per_trajectory", "states/trajectory"),
                   ("wall_s", "wall s"), ("trajectories_per_s", "trajectories/s"),
                   ("speedup_vs_reference", "speedup vs reference"), ("same_fixed_points", "same fixed points")]


def render_markdown(rows: list[dict[str, Any]], command: str, device: torch.device) -> str:
    machine = "\n".join(f"- {k}: {v}" for k, v in machine_info(device).items())
    return (
        f"# leaplm bench-rollout: {rows[0]['model']}, block size {rows[0]['jacobi_block_size']}\n\n"
        "Greedy Jacobi trajectories of the same model on the same prompts: our batched, KV-cached collector "
        "against the reference's one prompt at a time without a cache, interleaved chunk by chunk.\n\n"
        f"```text\n{command}\n```\n\n{machine}\n\n{format_table(rows, ROLLOUT_COLUMNS)}\n"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model directory, a Hub id, or tiny-teacher")
    p.add_argument("--n", type=int, default=64, help="prompts (synthetic test split, tasks in turn; default %(default)s)")
    p.add_argument("--jacobi-block-size", type=int, default=16, help="Jacobi block size (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="answer budget per prompt (default %(default)s)")
    p.add_argument("--batch-sizes", default="32,8,1",
                   help="batch sizes to run ours with, comma separated (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", required=True, help="directory for rollout_bench.json and rollout_bench.md")


def run_command(args: argparse.Namespace) -> None:
    model, tokenizer = load_for_eval(args.model, dtype=args.dtype)
    command = command_line(["bench-rollout", args.model], args,
                       ["n", "jacobi_block_size", "max_new_tokens", "batch_sizes", "seed", "out"])
    batch_sizes = tuple(int(size) for size in args.batch_sizes.split(","))
    rows = run_rollout_bench(model, tokenizer, args.model, args.n, args.jacobi_block_size, args.max_new_tokens,
                             batch_sizes, args.out, seed=args.seed, command=command)
    print(format_table(rows, ROLLOUT_COLUMNS))
    print(f"wrote {Path(args.out) / 'rollout_bench.json'}, {Path(args.out) / 'rollout_bench.md'}")
