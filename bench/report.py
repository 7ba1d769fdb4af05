"""The performance report: one command regenerates the measured section of ``docs/benchmarks.md``.

    OMP_NUM_THREADS=1 leaplm bench-report

It runs, in this order, and writes each part's files under ``--out`` (default ``docs/results/report``):

1. decoders against ``generate`` for every landed recipe's decoder (:func:`~leaplm.bench.decoders.run_bench`):
   ``ar``, ``jacobi`` and ``jacobi_multiblock`` (the CLLM and Jacobi Forcing recipes) on the
   embedded teacher, ``block_diffusion`` (ar2bd) on the embedded block-diffusion model, and the
   decoders whose trained add-ons the report cannot build itself, each when its option names one:
   ``medusa`` (``--heads``), ``hydra`` (``--hydra``) and ``clover`` (``--clover``) on the teacher
   with draft heads, ``eagle3`` (``--eagle3``) on the teacher with an EAGLE-3 draft, ``kangaroo``
   (``--kangaroo``) on the teacher with a Kangaroo adapter,
   ``speculative`` with a draft model (``--draft``) and with an acceptance head
   (``--acceptance-head``) on the teacher; an absent one is named in the report as not measured,
   with the command that trains it;
2. the decode-step kernels, fused against eager (``leaplm bench-kernels``);
3. the loss step, chunked linear + CE against plain CE (``leaplm bench-loss``);
4. a training step with the two-stream mask, FlexAttention against dense (``leaplm bench-attention``).

The section between the ``bench-report`` markers of ``--doc`` is replaced with the tables, the
command line and the machine; the rest of the file (hand-written notes) is kept.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from leaplm.bench import attention as attention_bench
from leaplm.bench import decoders as bench
from leaplm.bench import kernels as kernel_bench
from leaplm.bench import loss as loss_bench
from leaplm.inference.evaluate import format_table
from leaplm.models.zoo import EMBEDDED_BLOCK_DIFFUSION, EMBEDDED_TEACHER

START, END = "<!-- bench-report:start -->", "<!-- bench-report:end -->"
BASE = EMBEDDED_TEACHER  # the add-ons below are trained for it, so their rows compare on one model
DECODERS = {
    BASE: ["ar", "jacobi", "jacobi_multiblock"],
    EMBEDDED_BLOCK_DIFFUSION: [{"decoder": "block_diffusion", "decoder_settings": {"threshold": 0.9}}],
}
DECODER_COLUMNS = [("model", "model")] + bench.BENCH_COLUMNS
SUMMARY_COLUMNS = [("model", "model"), ("decoder", "decoder"), ("decoder_settings", "settings"),
                   ("accuracy", "mean accuracy"), ("tokens_per_forward", "mean tokens/forward"),
                   ("speedup_vs_generate", "mean speedup vs generate")]
# The trained add-ons, by their option's dest: (decoder, its settings, whether it runs on BASE with the
# add-on as its draft rather than on the add-on itself, the command that trains it). Tree size 8 and
# threshold 0.3 are the settings of the Hydra++ and acceptance-head rows of docs/benchmarks.md; both
# head kinds get the same tree so that they compare like for like.
ADD_ONS = {
    "heads": ("medusa", {"tree_size": 8}, False,
              "leaplm train configs/draft_heads/tiny_teacher.yaml"),
    "hydra": ("hydra", {"tree_size": 8}, False,
              "leaplm train configs/draft_heads/tiny_teacher_hydra_pp.yaml"),
    "eagle3": ("eagle3", {"tree_size": 8}, False, "leaplm train configs/eagle3/tiny_teacher.yaml"),
    "clover": ("clover", {"tree_size": 8}, False, "leaplm train configs/draft_heads/tiny_teacher_clover2.yaml"),
    "kangaroo": ("kangaroo", {}, False, "leaplm train configs/kangaroo/tiny_teacher.yaml"),
    "draft": ("speculative", {}, True,
              "leaplm train configs/pretrain/tiny_draft.yaml"),
    "acceptance_head": ("speculative", {"stop_threshold": 0.3}, True,
                        ("leaplm train configs/pretrain/tiny_draft.yaml && "
                         "leaplm train configs/acceptance_head/tiny_teacher.yaml")),
}


def decoder_plan(args: argparse.Namespace) -> tuple[list[tuple[str, str, list]], list[str]]:
    """What the decoder part runs, as (label, model path or zoo name, decoder specs), and one note
    per add-on option left out, so a missing row is always explained in the report."""
    base = list(DECODERS[BASE])
    own_models, notes = [], []
    for dest, (decoder, settings, on_base, train) in ADD_ONS.items():
        path = getattr(args, dest)
        option = "--" + dest.replace("_", "-")
        if path is None:
            notes.append(f"- `{bench.spec_label(decoder, settings)}`: not measured; `{option} DIR` adds it, "
                         f"DIR the model exported by `{train}`.")
        elif on_base:
            base.append({"decoder": decoder, "decoder_settings": {"draft": str(path), **settings}})
        else:
            spec = {"decoder": decoder, "decoder_settings": settings}
            addon = {"eagle3": "draft", "kangaroo": "adapter"}.get(decoder, "heads")
            own_models.append((f"{BASE} + {decoder} {addon}", str(path), [spec]))
    plan = [(BASE, BASE, base)] + [(m, m, d) for m, d in DECODERS.items() if m != BASE] + own_models
    return plan, notes


def decoder_part(args: argparse.Namespace, out: Path) -> str:
    """Bench every decoder of :func:`decoder_plan` against ``generate``; return the part's markdown."""
    plan, notes = decoder_plan(args)
    rows = []
    for label, model, decoders in plan:
        name = label.replace(" + ", "_").replace(" ", "_")
        model_rows = bench.run_bench(model, decoders, n=args.n, batch_size=args.batch_size,
                                     max_new_tokens=args.max_new_tokens, out_dir=out / f"decoders_{name}",
                                     repeats=args.repeats)
        rows += [dict(row, model=label) for row in model_rows]
    fastest = f", each batch's time its fastest of {args.repeats} runs" if args.repeats > 1 else ""
    missing = ("\n\nNot measured in this run:\n\n" + "\n".join(notes)) if notes else ""
    return (f"### Decoders against `generate`\n\n{args.n} test prompts per task, batch {args.batch_size}, "
            f"up to {args.max_new_tokens} new tokens, greedy; each model's decoders interleaved batch by batch "
            f"with its `generate` in one process{fastest} (`bench/decoders.py`). Peak memory: the process's peak RSS "
            f"on CPU.{missing}\n\nMeans over the tasks:\n\n{format_table(summary(rows), SUMMARY_COLUMNS)}"
            f"\n\nPer task:\n\n{format_table(rows, bench.measured_columns(rows, DECODER_COLUMNS))}")


def summary(rows: list[dict]) -> list[dict]:
    """One row per (model, decoder, settings): the unweighted means over tasks of accuracy, tokens
    per forward and speedup, the one-line-per-paradigm view of the per-task table."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], bench.spec_label(row["decoder"], row["decoder_settings"])), []).append(row)
    means = []
    for group in groups.values():
        mean = {k: sum(r[k] for r in group) / len(group) for k in ("accuracy", "tokens_per_forward")}
        speedups = [r["speedup_vs_generate"] for r in group if r["speedup_vs_generate"] is not None]
        mean["speedup_vs_generate"] = sum(speedups) / len(speedups) if speedups else None
        means.append({**{k: group[0][k] for k in ("model", "decoder", "decoder_settings")}, **mean})
    return means


def build_report(args: argparse.Namespace, command: str) -> str:
    """Run every part and return the report's markdown."""
    out = Path(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    parts = [decoder_part(args, out)]

    vocabs = [int(v) for v in args.vocabs.split(",")]
    kernels = kernel_bench.run(vocabs, batch=4, slots=17, repeats=20)
    parts.append("### Decode-step kernels: fused against eager\n\n"
                 "Commit statistics (argmax, probability, entropy, top-2 gap) of 4 x 17 positions, and greedy "
                 "verification of 4 rows of 16 candidates, on random logits; median of 20 alternating calls "
                 f"(`bench/kernels.py`).\n\n{kernel_bench.markdown(kernels)}")

    losses = loss_bench.run(vocabs, seq=args.seq, hidden=896, chunk_size=loss_bench.DEFAULT_CHUNK)
    parts.append(f"### Loss step: chunked linear + cross-entropy against plain cross-entropy\n\n"
                 f"Forward + backward of the summed CE of {args.seq} hidden states (hidden 896, fp32) through a "
                 "random head, each variant in a fresh process; peak memory is the step's growth of the peak RSS "
                 f"(`bench/loss.py`).\n\n{loss_bench.markdown(losses)}")

    lengths = [int(x) for x in args.attention_lengths.split(",")]
    attention_bench.run(lengths, steps=3, block_size=32, batch_size=1, out=out / "attention")
    parts.append("### Training step: FlexAttention against the dense two-stream mask\n\n"
                 "ar2bd's `[clean | noisy]` rows on the tiny teacher's architecture (`bench/attention.py`; on "
                 "CPU FlexAttention has no backward, so it is timed forward-only).\n\n"
                 + (out / "attention" / "attention_bench.md").read_text().strip())

    machine = "\n".join(f"- {k}: {v}" for k, v in bench.machine_info(device).items())
    header = (f"## Performance report (generated)\n\nGenerated by `leaplm bench-report` in "
              f"{(time.time() - started) / 60:.0f} minutes on {time.strftime('%Y-%m-%d')}:\n\n"
              f"```text\n{command}\n```\n\n{machine}")
    return "\n\n".join([header] + parts) + "\n"


def write_section(doc: Path, section: str) -> None:
    """Put ``section`` between the markers of ``doc`` (appended with markers the first time)."""
    text = doc.read_text() if doc.exists() else ""
    block = f"{START}\n{section}{END}\n"
    if START in text and END in text:
        before, rest = text.split(START, 1)
        text = before + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    doc.write_text(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--doc", default="docs/benchmarks.md", help="markdown file whose generated section is replaced")
    p.add_argument("--out", default="docs/results/report", help="where each part's own files go")
    p.add_argument("--n", type=int, default=20, help="test prompts per task for the decoder benchmark")
    p.add_argument("--batch-size", type=int, default=1, help="prompts decoded together")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=1, help="runs of every decoder per batch, the fastest timed")
    p.add_argument("--vocabs", default="32000,152064", help="vocabulary sizes for the kernel and loss benchmarks")
    p.add_argument("--seq", type=int, default=2048, help="tokens per loss step")
    p.add_argument("--attention-lengths", default="512", help="sample lengths for the attention benchmark")
    p.add_argument("--heads", metavar="DIR", help="the teacher exported with Medusa heads: adds `medusa` rows")
    p.add_argument("--hydra", metavar="DIR", help="the teacher exported with Hydra++ heads: adds `hydra` rows")
    p.add_argument("--eagle3", metavar="DIR", help="the teacher exported with an EAGLE-3 draft: adds `eagle3` rows")
    p.add_argument("--clover", metavar="DIR", help="the teacher exported with Clover-2 heads: adds `clover` rows")
    p.add_argument("--kangaroo", metavar="DIR", help="the teacher exported with a Kangaroo adapter: adds `kangaroo` rows")
    p.add_argument("--draft", metavar="DIR", help="a draft model for the teacher: adds `speculative` rows")
    p.add_argument("--acceptance-head", metavar="DIR",
                   help="a draft exported with an acceptance head: adds adaptive-length `speculative` rows")


def run_command(args: argparse.Namespace) -> None:
    write_section(Path(args.doc), build_report(args, shlex.join(["leaplm", *sys.argv[1:]])))
