"""The `leaplm` command: train, eval, bench, quickstart, export.

    leaplm train CONFIG [section.key=value ...]
    leaplm eval MODEL --tasks synth --decoder ar [--out DIR]
    leaplm bench MODEL --decoders ar --out DIR
    leaplm quickstart
    leaplm bench-attention --lengths 512,2048 --out DIR
    leaplm bench-report              (regenerates the measured section of docs/benchmarks.md)
    leaplm bench-rollout MODEL --n 64 --block-size 16 --out DIR
    leaplm bench-draft-length TARGET --draft DIR --out DIR   (fixed draft lengths vs the acceptance head)
    leaplm bench-kernels / bench-loss   (decode-step kernels and chunked cross-entropy against their references)
    leaplm export RUN_OR_CHECKPOINT --out DIR [--push REPO_ID] [--merge-lora | --no-merge-lora] [--bench-n N]
    leaplm lm-eval --model leaplm --model_args pretrained=DIR[,decoder=NAME,setting=value] --tasks ...
"""

from __future__ import annotations

import argparse
import logging
import sys


def _train(args: argparse.Namespace) -> None:
    from leaplm.config import load_config
    from leaplm.train.trainer import train

    result = train(load_config(args.config, args.overrides))
    if result.preempted:
        print(f"preempted: checkpoint at step {result.steps} in {result.output_dir}; "
              "rerun with train.resume_from=latest to continue")
        return
    print(f"trained {result.steps} steps; outputs in {result.output_dir}")


def _lm_eval(args: argparse.Namespace) -> None:
    from leaplm.inference.harness import run_lm_eval  # needs the `eval` extra (lm-eval)

    run_lm_eval(args.lm_eval_args)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="leaplm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run a recipe from a YAML config")
    p.add_argument("config", help="YAML file, e.g. configs/pretrain/tiny_teacher.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 data.max_length=512")
    p.set_defaults(func=_train)

    p = sub.add_parser("lm-eval", add_help=False, help="lm-evaluation-harness with the `leaplm` model registered; "
                       "every argument goes to lm_eval, e.g. --model leaplm --model_args pretrained=DIR --tasks NAME")
    p.set_defaults(func=_lm_eval)

    from leaplm.inference.bench_report import add_command as add_bench_report
    from leaplm.inference.cli import add_inference_commands
    from leaplm.inference.draft_length_bench import add_command as add_draft_length_bench
    from leaplm.inference.kernels.bench import add_command as add_kernel_bench
    from leaplm.inference.rollout_bench import add_command as add_rollout_bench
    from leaplm.models.export import add_command as add_export
    from leaplm.train.attention_bench import add_command as add_attention_bench
    from leaplm.train.loss_bench import add_command as add_loss_bench

    add_inference_commands(sub)
    add_attention_bench(sub)
    add_rollout_bench(sub)
    add_export(sub)
    add_kernel_bench(sub)
    add_loss_bench(sub)
    add_bench_report(sub)
    add_draft_length_bench(sub)
    args, rest = parser.parse_known_args(argv)
    if args.command != "lm-eval" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.lm_eval_args = rest  # lm-eval's own arguments, passed through untouched
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
