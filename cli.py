"""The `leaplm` command. Every subcommand is one row of COMMANDS.

    leaplm train CONFIG [section.key=value ...]
    leaplm eval MODEL --tasks synth --decoder ar [--out DIR]
    leaplm bench MODEL --decoders ar --out DIR
    leaplm check MODEL [--prompts FILE.jsonl] [--n N] [--max-new-tokens T] [--out DIR]
    leaplm prompts FILE --source stdlib_code --split test --n 12
    leaplm quickstart
    leaplm export RUN_OR_CHECKPOINT --out DIR [--push REPO_ID] [--merge-lora | --no-merge-lora] [--bench-n N]
    leaplm export EXPORT_DIR --push REPO_ID      (push an export as it is)
    leaplm export-speculators MODEL_DIR --out DIR  (an EAGLE-3 draft in the format vLLM serves)
    leaplm lm-eval --model leaplm --model_args pretrained=DIR[,decoder=NAME,setting=value] --tasks ...

Maintainers' benchmarks (bench/):

    leaplm bench-report              (regenerates the measured section of docs/benchmarks.md)
    leaplm bench-attention --lengths 512,2048 --out DIR
    leaplm bench-rollout MODEL --n 64 --block-size 16 --out DIR
    leaplm bench-draft-length TARGET --draft DIR --out DIR   (fixed draft lengths vs the acceptance head)
    leaplm bench-kernels / bench-loss   (decode-step kernels and chunked cross-entropy against their references)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Callable, NamedTuple


class Command(NamedTuple):
    help: str
    add_arguments: str  # "module:function" taking the subcommand's parser
    run: str  # "module:function" taking the parsed arguments


# Imported only when their command runs: `leaplm --help` loads none of them.
COMMANDS = {
    "train": Command("run a recipe from a YAML config", "leaplm.cli:add_train_arguments", "leaplm.cli:run_train"),
    "eval": Command("per-task accuracy, tokens/forward and tokens/s of a model under a decoder",
                    "leaplm.bench.commands:add_eval_arguments", "leaplm.bench.commands:run_eval"),
    "bench": Command("decoders side by side with HF generate: bench.json, bench.md, bench.png",
                     "leaplm.bench.commands:add_bench_arguments", "leaplm.bench.commands:run_bench_command"),
    "check": Command("every lossless decoder against generate on your model (exit 1 if one is not exact), and "
                     "which recipes can train it", "leaplm.bench.check:add_arguments",
                     "leaplm.bench.check:run_command"),
    "prompts": Command("write held-out real prompts (standard-library code or instructions) to a JSONL file for "
                       "`leaplm bench --prompts`", "leaplm.cli:add_prompts_arguments", "leaplm.cli:run_prompts"),
    "quickstart": Command("eval + bench of the embedded teacher, its block-diffusion adaptation, and Jacobi Forcing "
                          "on it", "leaplm.bench.commands:add_quickstart_arguments",
                          "leaplm.bench.commands:run_quickstart"),
    "export": Command("write a run's model in the Hub layout with its model card; optionally push it",
                      "leaplm.cli:add_export_arguments", "leaplm.cli:run_export"),
    "export-speculators": Command("write a model's EAGLE-3 draft in the speculators format vLLM serves",
                                  "leaplm.ship.speculators:add_arguments", "leaplm.ship.speculators:run_command"),
    "lm-eval": Command("lm-evaluation-harness with the `leaplm` model registered; every argument goes to lm_eval, "
                       "e.g. --model leaplm --model_args pretrained=DIR --tasks NAME", "", "leaplm.cli:run_lm_eval"),
    "bench-report": Command("regenerate the performance report in docs/benchmarks.md",
                            "leaplm.bench.report:add_arguments", "leaplm.bench.report:run_command"),
    "bench-attention": Command("training tokens/s and memory: FlexAttention vs dense two-stream mask",
                               "leaplm.bench.attention:add_arguments", "leaplm.bench.attention:run_command"),
    "bench-rollout": Command("Jacobi rollout throughput: batched KV-cached collector vs the reference's one-prompt "
                             "no-cache collection", "leaplm.bench.rollout:add_arguments",
                             "leaplm.bench.rollout:run_command"),
    "bench-draft-length": Command("speculative decoding: fixed draft lengths against the draft's acceptance head "
                                  "(SpecDec++)", "leaplm.bench.draft_length:add_arguments",
                                  "leaplm.bench.draft_length:run_command"),
    "bench-kernels": Command("decode-step kernels: fused against eager", "leaplm.bench.kernels:add_arguments",
                             "leaplm.bench.kernels:run_command"),
    "bench-loss": Command("peak memory and speed: chunked linear+CE vs plain CE", "leaplm.bench.loss:add_arguments",
                          "leaplm.bench.loss:run_command"),
}


def _resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


# ----- train --------------------------------------------------------------------------------


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from leaplm.train.recipes import RECIPE_MODULES

    p.add_argument("config", help="YAML file, e.g. configs/pretrain/tiny_teacher.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 data.max_length=512")
    p.epilog = (f"recipes: {', '.join(RECIPE_MODULES)} (configs/<recipe>/*.yaml); every config key: docs/config.md; "
                "each recipe's method settings: docs/recipes/")


def run_train(args: argparse.Namespace) -> None:
    from leaplm.train.recipes import load_config
    from leaplm.train.trainer import end_processes, train

    result = train(load_config(args.config, args.overrides))
    # Under `accelerate launch` the gloo/NCCL group must close before the interpreter does: left to
    # interpreter teardown, a rank can abort ("terminate called without an active exception").
    end_processes()
    if result.preempted:
        print(f"preempted: checkpoint at step {result.steps} in {result.output_dir}; "
              "rerun with train.resume_from=latest to continue")
        return
    print(f"trained {result.steps} steps; outputs in {result.output_dir}")


# ----- prompts ------------------------------------------------------------------------------


def add_prompts_arguments(p: argparse.ArgumentParser) -> None:
    from leaplm.data.prompts import SOURCES

    p.add_argument("out", help="the JSONL file to write ({\"id\", \"prompt\"} per line)")
    p.add_argument("--source", default="stdlib_code", choices=SOURCES,
                   help="standard-library code completion, instructions, or both (default %(default)s)")
    p.add_argument("--split", default="test", choices=["train", "test"],
                   help="test prompts never share a function with the train split that recipes use (default %(default)s)")
    p.add_argument("--n", type=int, default=None, help="prompts to write (per kind for 'stdlib'; default all)")
    p.add_argument("--seed", type=int, default=0, help="order and subsample (default %(default)s)")


def run_prompts(args: argparse.Namespace) -> None:
    from leaplm.data.prompts import write_prompt_file

    path = write_prompt_file(args.out, args.source, args.split, args.n, args.seed)
    print(f"wrote {sum(1 for _ in path.open())} prompts to {path}")


# ----- export ------------------------------------------------------------------------------


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a run's output_dir (its newest checkpoint) or one checkpoint directory; "
                   "or an export directory, to --push it as it is")
    p.add_argument("--out", help="export directory, replaced whole: new, empty, or an earlier export "
                   "(required unless SOURCE is an export)")
    p.add_argument("--push", metavar="REPO_ID", help="upload the export to this Hub repo (token from HF_TOKEN)")
    p.add_argument("--merge-lora", action=argparse.BooleanOptionalAction, default=None,
                   help="merge a LoRA run's adapter into standalone weights, or (--no-merge-lora) keep the base "
                   "weights plus adapter/ (default: the run's export.merge_lora, true unless set)")
    p.add_argument("--bench-n", type=int, default=0, help="bench N test prompts per task against HF generate "
                   "for the card's speedups and plot (default: the run's eval rows only)")


def run_export(args: argparse.Namespace) -> None:
    from leaplm.ship.export import ExportError, looks_like_export, push
    from leaplm.train.export_run import export_run

    source = Path(args.source)
    if looks_like_export(source):  # already exported: push it as it is (what a failed push says to run)
        if args.out is not None and Path(args.out).resolve() != source.resolve():
            raise ExportError(f"{source} is already an export; copy it to {args.out}, or pass a run's output_dir "
                              "(or a checkpoint) to export again")
        if args.merge_lora is not None or args.bench_n:
            raise ExportError(f"{source} is already an export, so --merge-lora and --bench-n do not apply; pass "
                              "the run's output_dir (or a checkpoint) to export it again with them")
        if not args.push:
            raise ExportError(f"{source} is already an export; add --push REPO_ID to upload it")
        print(f"pushed: {push(source, args.push)}")
        return
    if args.out is None:
        raise ExportError(f"--out DIR is needed to export {source}; it is omitted only to push an export directory")
    command = shlex.join(["leaplm", "export", str(args.source), "--out", str(args.out)]
                         + (["--bench-n", str(args.bench_n)] if args.bench_n else []))
    bench = None
    if args.bench_n > 0:
        def bench(model, tokenizer, cfg, directory):
            """``ar`` and the run's decoder beside HF generate: the card's speedups and plot."""
            from leaplm.bench.decoders import run_bench

            decoders: list = ["ar"]
            if cfg.eval.decoder != "ar":
                decoders.append({"decoder": cfg.eval.decoder, "decoder_settings": dict(cfg.eval.decoder_settings)})
            return run_bench(Path(args.out).name, decoders, cfg.eval.tasks or cfg.data.tasks, args.bench_n,
                             cfg.eval.batch_size, cfg.eval.max_new_tokens, directory, model=model,
                             tokenizer=tokenizer, command=command)
    out = export_run(args.source, args.out, merge_lora=args.merge_lora, bench=bench, name=args.push)
    print(f"exported to {out}")
    if args.push:
        print(f"pushed: {push(out, args.push)}")


# ----- lm-eval ------------------------------------------------------------------------------


def run_lm_eval(args: argparse.Namespace) -> None:
    from leaplm.ship.harness import run_lm_eval as run  # needs the `eval` extra (lm-eval)

    run(args.lm_eval_args)


def log_level(environ: dict[str, str]) -> int:
    """INFO on the main process; under `accelerate launch` (torchrun sets RANK) the other ranks log
    warnings and errors only, so each progress line appears once, not once per process."""
    return logging.INFO if environ.get("RANK", "0") == "0" else logging.WARNING


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=log_level(os.environ), format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="leaplm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, add_help=name != "lm-eval")
        # Only the chosen command's arguments are built: the others' modules stay unimported.
        if command.add_arguments and argv and argv[0] == name:
            _resolve(command.add_arguments)(p)
    args, rest = parser.parse_known_args(argv)
    if args.command != "lm-eval" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.lm_eval_args = rest  # lm-eval's own arguments, passed through untouched
    _resolve(COMMANDS[args.command].run)(args)


if __name__ == "__main__":
    main(sys.argv[1:])
