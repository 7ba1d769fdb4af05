"""The `leaplm` command: train, eval, bench, quickstart.

    leaplm train CONFIG [section.key=value ...]
    leaplm eval MODEL --tasks synth --decoder ar [--out DIR]
    leaplm bench MODEL --decoders ar --out DIR
    leaplm quickstart
    leaplm bench-attention --lengths 512,2048 --out DIR
    leaplm bench-report              (regenerates the measured section of docs/benchmarks.md)
    leaplm bench-rollout MODEL --n 64 --block-size 16 --out DIR
"""

from __future__ import annotations

import argparse
import logging
import sys


def _train(args: argparse.Namespace) -> None:
    from leaplm.config import load_config
    from leaplm.train.trainer import train

    result = train(load_config(args.config, args.overrides))
    print(f"trained {result.steps} steps; outputs in {result.output_dir}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="leaplm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run a recipe from a YAML config")
    p.add_argument("config", help="YAML file, e.g. configs/pretrain/tiny_teacher.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 data.max_length=512")
    p.set_defaults(func=_train)

    from leaplm.inference.bench_report import add_command as add_bench_report
    from leaplm.inference.cli import add_inference_commands
    from leaplm.inference.rollout_bench import add_command as add_rollout_bench
    from leaplm.inference.kernels.bench import add_command as add_kernel_bench
    from leaplm.train.attention_bench import add_command as add_attention_bench
    from leaplm.train.loss_bench import add_command as add_loss_bench

    add_inference_commands(sub)
    add_attention_bench(sub)
    add_rollout_bench(sub)
    add_kernel_bench(sub)
    add_loss_bench(sub)
    add_bench_report(sub)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
