"""``leaplm bench-draft-length``: SpecDec++'s comparison, fixed draft lengths against the acceptance head.

    leaplm bench-draft-length tiny-teacher --draft runs/acceptance_head/model \\
        --draft-tokens 1,2,3,4,6 --stop-thresholds 0.3,0.5,0.7 --n 30 --out runs/draft_length_bench

The same target, draft and prompts decode with ``speculative`` at each fixed ``draft_tokens`` and
at each ``stop_threshold`` of the draft's acceptance head (adaptive length in ``[min_draft,
max_draft]``), each as set, then with lengths up to ``max_draft`` sized by the measured cost of
both models' forwards (``adaptive``), one setting after another in one process. Reported per setting: drafted and
rejected draft tokens per generated token (:func:`leaplm.inference.decoders.speculative.draft_efficiency`),
tokens per target forward, tokens/s, and tokens/s against the best fixed length. Greedy, so every
setting returns the target's own answer. Writes ``draft_length_bench.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from leaplm.bench.commands import command_line
from leaplm.bench.decoders import machine_info
from leaplm.bench.rollout import bench_prompts
from leaplm.inference.decoders.speculative import draft_efficiency
from leaplm.inference.engine import Engine
from leaplm.inference.evaluate import format_table, load_for_eval

COLUMNS = [("setting", "setting"), ("drafted_per_token", "drafted/token"),
           ("rejected_per_token", "rejected/token"), ("tokens_per_forward", "tokens/target forward"),
           ("tokens_per_s", "tokens/s"), ("speed_vs_best_fixed", "tokens/s vs best fixed")]


def run_draft_length_bench(target, tokenizer, draft, draft_tokens: list[int], stop_thresholds: list[float], *,
                           n: int = 30, max_new_tokens: int = 96, min_draft: int = 1, max_draft: int = 8,
                           out_dir: str | Path, command: str, seed: int = 0) -> list[dict[str, Any]]:
    engine = Engine(target, tokenizer)
    prompts = bench_prompts(tokenizer, n, seed)
    engine.generate(prompts[:1], "speculative", 8, draft=draft, draft_tokens=2)  # warm-up, not timed
    # Fixed lengths and the head alone, as set; then draft lengths up to max_draft sized by measured cost.
    settings = [({"draft_tokens": k, "adaptive": False}, "fixed", f"fixed draft_tokens={k}") for k in draft_tokens]
    settings += [({"stop_threshold": t, "min_draft": min_draft, "max_draft": max_draft, "adaptive": False}, "head",
                  f"acceptance head stop_threshold={t}") for t in stop_thresholds]
    settings.append(({"draft_tokens": max_draft, "adaptive": True}, "cost", f"cost-sized draft_tokens<={max_draft}"))
    rows = [{"setting": label, "sizing": sizing, **draft_efficiency(engine, prompts, max_new_tokens, draft=draft, **s)}
            for s, sizing, label in settings]
    fixed = [r for r in rows if r["sizing"] == "fixed"]
    best = max(fixed, key=lambda r: r["tokens_per_s"]) if fixed else None
    for r in rows:
        r["speed_vs_best_fixed"] = r["tokens_per_s"] / best["tokens_per_s"] if best else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "draft_length_bench.json").write_text(json.dumps(rows, indent=2))
    machine = "\n".join(f"- {k}: {v}" for k, v in machine_info(engine.device).items())
    (out / "draft_length_bench.md").write_text(
        "# leaplm bench-draft-length\n\nGreedy speculative decoding of the same prompts: fixed draft lengths "
        "against the draft's acceptance head (SpecDec++) and against lengths sized by the measured cost of "
        "both models' forwards (`adaptive`). Rejected draft tokens per generated token is the waste the head "
        "is trained to cut.\n\n"
        f"```text\n{command}\n```\n\n{machine}\n\n{format_table(rows, COLUMNS)}\n")
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the target: a model directory, a Hub id, or tiny-teacher")
    p.add_argument("--draft", required=True, help="the draft model directory (with an acceptance head beside it)")
    p.add_argument("--draft-tokens", default="1,2,3,4,6", help="fixed draft lengths (default %(default)s)")
    p.add_argument("--stop-thresholds", default="0.3,0.5,0.7",
                   help="acceptance-head stop thresholds; empty = fixed lengths only (default %(default)s)")
    p.add_argument("--min-draft", type=int, default=1)
    p.add_argument("--max-draft", type=int, default=8)
    p.add_argument("--n", type=int, default=30, help="prompts (synthetic test split, tasks in turn)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for draft_length_bench.json and .md")


def run_command(args: argparse.Namespace) -> None:
    target, tokenizer = load_for_eval(args.model)
    draft, _ = load_for_eval(args.draft)
    command = command_line(["bench-draft-length", args.model], args,
                       ["draft", "draft_tokens", "stop_thresholds", "min_draft", "max_draft", "n", "max_new_tokens",
                        "seed", "out"])
    rows = run_draft_length_bench(
        target, tokenizer, draft, [int(k) for k in args.draft_tokens.split(",") if k],
        [float(t) for t in args.stop_thresholds.split(",") if t], n=args.n, max_new_tokens=args.max_new_tokens,
        min_draft=args.min_draft, max_draft=args.max_draft, out_dir=args.out, command=command, seed=args.seed)
    print(format_table(rows, COLUMNS))
    print(f"wrote {Path(args.out) / 'draft_length_bench.md'}")
