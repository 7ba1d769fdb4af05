"""The `leaplm eval`, `leaplm bench` and `leaplm quickstart` commands (listed in leaplm.cli's table).

    leaplm eval MODEL --tasks synth --decoder ar [--decoder-settings JSON] [--n 100] [--out DIR]
    leaplm eval MODEL --prompts FILE.jsonl --decoder jacobi [--n N] [--out DIR]
    leaplm bench MODEL --decoders ar --out DIR [--tasks copy,sort] [--n 50]
    leaplm bench MODEL --prompts FILE.jsonl --decoders ar,jacobi --out DIR [--n N] [--reference BASE_DIR/outputs.jsonl]
    leaplm quickstart [--out runs/quickstart] [--n 50] [--jf-n 20] [--skip-jacobi-forcing]

MODEL is a local model directory, a Hub id, or ``tiny-teacher`` (the embedded teacher).
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

import yaml

from leaplm.models.zoo import DTYPES, EMBEDDED_BLOCK_DIFFUSION, EMBEDDED_TEACHER

EVAL_N, BENCH_N = 100, 50  # default test prompts per task


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}); example: '{{\"temperature\": 0.7}}'") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"temperature\": 0.7}}', got {text!r}")
    return value


def _decoder_specs(text: str) -> list:
    """Decoders to bench: a JSON list of names / {"decoder": ..., "decoder_settings": {...}} objects, or a
    comma list whose items are ``name`` or ``name:key=value:key=value``, where ``a|b|c`` sweeps a
    setting: ``ar,block_diffusion:threshold=0.5|0.7|0.9:sub_block_size=8`` is four decoders."""
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"--decoders is not valid JSON ({err})") from err
        return value
    specs: list = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, *pairs = item.split(":")
        sweeps: list[dict[str, Any]] = [{}]
        for pair in pairs:
            key, eq, values = pair.partition("=")
            if not eq or not key:
                raise argparse.ArgumentTypeError(f"cannot read {pair!r} in {item!r}; write key=value or key=v1|v2")
            sweeps = [{**s, key: yaml.safe_load(v)} for s in sweeps for v in values.split("|")]
        specs += [{"decoder": name, "decoder_settings": s} if s else name for s in sweeps]
    return specs


def _add_common(p: argparse.ArgumentParser, n: int) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--tasks", help="synthetic tasks: 'synth' (every task, the default) or a comma list, "
                        "e.g. copy,sort")
    source.add_argument("--prompts", metavar="FILE.jsonl", help="your own prompts, one JSON object a line: "
                        '{"prompt": "..."}, {"messages": [...]} or {"text": "..."}, optional "id" (docs/decoders.md); '
                        "decoders are compared with the model's greedy output")
    p.add_argument("--n", type=int, help=f"test prompts per task (default {n}); with --prompts, the first N rows "
                   "(default all)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts decoded together (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=160, help="new tokens per prompt (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="test-split seed (default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))


def command_line(words: list[str], args: argparse.Namespace, keys: list[str]) -> str:
    """The command line that reproduces this run (``leaplm *words --key value ...``), for result files."""
    parts = ["leaplm", *words]
    for key in keys:
        value = getattr(args, key)
        if value is None:
            continue
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        elif isinstance(value, (dict, list)):
            value = json.dumps(value)
        parts += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(parts)


def print_eval(rows: list[dict[str, Any]]) -> None:
    from leaplm.inference.evaluate import EVAL_COLUMNS, format_table

    print(format_table(rows, EVAL_COLUMNS))


def _n(args: argparse.Namespace, per_task: int) -> int | None:
    """--n, or its default: ``per_task`` prompts per task, every row of a prompts file."""
    return args.n if args.n is not None or args.prompts else per_task


def run_eval(args: argparse.Namespace) -> None:
    from leaplm.inference.evaluate import (
        PROMPT_EVAL_COLUMNS,
        evaluate_model,
        evaluate_prompts,
        format_table,
        load_for_eval,
    )

    model, tokenizer = load_for_eval(args.model, dtype=args.dtype)
    outputs = None
    if args.prompts:
        rows, outputs = evaluate_prompts(model, tokenizer, args.prompts, n=args.n, decoder=args.decoder,
                                         decoder_settings=args.decoder_settings, max_new_tokens=args.max_new_tokens,
                                         batch_size=args.batch_size, model_name=args.model)
        print(format_table(rows, PROMPT_EVAL_COLUMNS))
    else:
        rows = evaluate_model(model, tokenizer, tasks=args.tasks, n=_n(args, EVAL_N), decoder=args.decoder,
                              decoder_settings=args.decoder_settings, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, seed=args.seed, model_name=args.model)
        print_eval(rows)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(rows, indent=2))
        print(f"wrote {out / 'eval.json'}")
        if outputs is not None:
            (out / "outputs.jsonl").write_text(outputs)
            print(f"wrote {out / 'outputs.jsonl'}")


def run_bench_command(args: argparse.Namespace) -> None:
    from leaplm.bench.decoders import run_bench
    from leaplm.inference.evaluate import load_for_eval

    model, tokenizer = load_for_eval(args.model, dtype=args.dtype)
    seed = [] if args.prompts else ["seed"]  # the seed draws the synthetic test split only
    command = command_line(["bench", args.model], args, ["decoders", "tasks", "prompts", "reference", "n",
                                                          "batch_size", "max_new_tokens", *seed, "dtype", "repeats",
                                                          "out"])
    rows = run_bench(args.model, args.decoders, args.tasks, _n(args, BENCH_N), args.batch_size, args.max_new_tokens,
                     args.out, prompts=args.prompts, reference=args.reference, seed=args.seed, model=model,
                     tokenizer=tokenizer, command=command, repeats=args.repeats)
    _print_bench(rows, Path(args.out), outputs=args.prompts is not None)


def _print_bench(rows: list[dict[str, Any]], out: Path, outputs: bool = False) -> None:
    from leaplm.bench.decoders import BENCH_COLUMNS, measured_columns
    from leaplm.inference.evaluate import format_table

    print(format_table(rows, [c for c in measured_columns(rows, BENCH_COLUMNS) if c[0] != "decoder_settings"]))
    written = ["bench.json", "bench.md", "bench.png"] + (["outputs.jsonl"] if outputs else [])
    print("wrote " + ", ".join(str(out / name) for name in written))


def quickstart_jacobi_forcing(out: Path, n: int, max_new_tokens: int, overrides: list[str] | tuple[str, ...] = (),
                              command: str | None = None) -> list[dict[str, Any]]:
    """Run ``configs/jacobi_forcing/tiny_teacher.yaml`` (rollout, train, export to ``out/model``), then
    bench ``ar``, ``jacobi`` and ``jacobi_multiblock`` on the export against HF generate, one prompt
    at a time (bench files in ``out``). ``overrides`` are config overrides (tests shrink the run)."""
    from leaplm.bench.decoders import run_bench
    from leaplm.inference.evaluate import load_for_eval
    from leaplm.train.recipes import load_config
    from leaplm.train.trainer import train

    config = Path(__file__).resolve().parents[1] / "configs" / "jacobi_forcing" / "tiny_teacher.yaml"
    # resume_from=latest: a rerun into the same --out continues (or, when finished, reuses) that training
    cfg = load_config(config, [f"output_dir={out}", f"export.dir={out / 'model'}", "train.resume_from=latest",
                               *overrides])
    train(cfg)
    n_block = cfg.method.jacobi_block_size
    decoders = ["ar", {"decoder": "jacobi", "decoder_settings": {"jacobi_block_size": n_block}},
                {"decoder": "jacobi_multiblock", "decoder_settings": {"jacobi_block_size": n_block}}]
    model, tokenizer = load_for_eval(str(out / "model"))
    return run_bench(str(out / "model"), decoders, None, n, 1, max_new_tokens, out, model=model, tokenizer=tokenizer,
                     command=command)


def run_quickstart(args: argparse.Namespace) -> None:
    """Evaluate the embedded teacher and bench it against HF generate; bench the embedded
    block-diffusion model (the teacher adapted by the ar2bd recipe) decoding one prompt at a time;
    then train the teacher with Jacobi Forcing and bench its Jacobi decoders the same way."""
    from leaplm.bench.decoders import run_bench
    from leaplm.inference.evaluate import evaluate_model, load_for_eval

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = command_line(["quickstart"], args, ["n", "batch_size", "max_new_tokens", "threshold", "jf_n", "out", "model"])
    model, tokenizer = load_for_eval(args.model)
    print(f"== 1/4 eval: {args.model}, ar decoding, {args.n} test prompts per task")
    rows = evaluate_model(model, tokenizer, n=args.n, decoder="ar", max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, model_name=args.model)
    print_eval(rows)
    (out / "eval.json").write_text(json.dumps(rows, indent=2))
    print(f"\n== 2/4 bench: ar vs HF generate, same prompts, interleaved, batches of {args.batch_size}")
    bench_rows = run_bench(args.model, ["ar"], None, args.n, args.batch_size, args.max_new_tokens, out,
                           model=model, tokenizer=tokenizer, command=command)
    _print_bench(bench_rows, out)
    if args.model != EMBEDDED_TEACHER:
        print(f"\nresults in {out}/: eval.json, bench.json, bench.md, bench.png")
        return
    # Parallel decoding pays off where a step is latency-bound: one prompt at a time. At large
    # batches on a CPU a 16-token block costs ~8x a 1-token step and the gain is gone (docs/ar2bd.md).
    parallel = out / "block_diffusion"
    print(f"\n== 3/4 bench: {EMBEDDED_BLOCK_DIFFUSION} (the teacher after configs/ar2bd/tiny_teacher.yaml), "
          f"block_diffusion (threshold {args.threshold}, unverified and verified) vs HF generate, one prompt at a time")
    bd_model, bd_tokenizer = load_for_eval(EMBEDDED_BLOCK_DIFFUSION)
    # Verified blocks are exactly the model's AR output; unverified ones are faster and may differ.
    bd_decoders = [{"decoder": "block_diffusion", "decoder_settings": {"threshold": args.threshold, "verify": verify}}
                   for verify in (False, True)]
    bd_rows = run_bench(EMBEDDED_BLOCK_DIFFUSION, bd_decoders, None, args.n, 1, args.max_new_tokens, parallel,
                        model=bd_model, tokenizer=bd_tokenizer, command=command)
    _print_bench(bd_rows, parallel)
    if args.skip_jacobi_forcing:
        print(f"\nresults in {out}/ (eval.json, bench.*) and {parallel}/ (bench.*)")
        return
    jf = out / "jacobi_forcing"
    print(f"\n== 4/4 Jacobi Forcing: configs/jacobi_forcing/tiny_teacher.yaml on {EMBEDDED_TEACHER} (rollout, train, "
          f"export to {jf}/model), then ar, jacobi and jacobi_multiblock vs HF generate, one prompt at a time, "
          f"{args.jf_n} test prompts per task")
    jf_rows = quickstart_jacobi_forcing(jf, args.jf_n, args.max_new_tokens, ["logging.progress_bar=true"], command)
    _print_bench(jf_rows, jf)
    print(f"\nresults in {out}/ (eval.json, bench.*), {parallel}/ (bench.*) and {jf}/ (model/, bench.*)")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model directory, a Hub id, or tiny-teacher")
    p.add_argument("--decoder", default="ar", help="a registered decoder (default %(default)s)")
    p.add_argument("--decoder-settings", type=_json_object, default={}, help="decoder settings as JSON, e.g. "
                   "'{\"temperature\": 0.7, \"top_p\": 0.9}'")
    _add_common(p, n=EVAL_N)
    p.add_argument("--out", help="also write DIR/eval.json (and, with --prompts, DIR/outputs.jsonl: every text)")


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model directory, a Hub id, or tiny-teacher")
    p.add_argument("--decoders", type=_decoder_specs, default=["ar"],
                   help="comma list, settings after colons, | sweeps a setting: "
                        "'ar,block_diffusion:threshold=0.5|0.7|0.9'; or a JSON list of names and "
                        "{\"decoder\": NAME, \"decoder_settings\": {...}} objects; hf_generate is always included, "
                        "and with --prompts hf_prompt_lookup too (e.g. hf_prompt_lookup:prompt_lookup_num_tokens=3)")
    _add_common(p, n=BENCH_N)
    p.add_argument("--reference", metavar="OUTPUTS.jsonl", help="with --prompts: the outputs.jsonl of an earlier "
                   "bench of the same prompts (and --n), e.g. of the base model; adds exact_match_vs_reference and "
                   "token_agreement_vs_reference, every decoder against that run's hf_generate texts")
    p.add_argument("--repeats", type=int, default=1, help="runs of every decoder per batch, the fastest timed "
                   "(default %(default)s); 3 steadies timings on a shared machine")
    p.add_argument("--out", required=True, help="directory for bench.json, bench.md, bench.png (and, with --prompts, "
                   "outputs.jsonl: every decoder's text per prompt)")


def add_quickstart_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/quickstart", help="results directory (default %(default)s)")
    p.add_argument("--n", type=int, default=50, help="test prompts per task (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--threshold", type=float, default=0.9, help="block_diffusion commit threshold (default %(default)s)")
    p.add_argument("--jf-n", type=int, default=20, help="test prompts per task of the Jacobi Forcing bench, "
                   "decoded one at a time (default %(default)s)")
    p.add_argument("--skip-jacobi-forcing", action="store_true", help="leave out stage 4 (Jacobi Forcing training, "
                   "about 10 minutes on 2 cores)")
    p.add_argument("--model", default=EMBEDDED_TEACHER, help="the model to use (default: the embedded teacher; "
                   "another model skips the block-diffusion and Jacobi Forcing stages)")
