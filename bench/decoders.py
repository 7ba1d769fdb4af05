"""Decoders side by side with Hugging Face ``generate``: accuracy and speed on the same prompts.

Everything runs in one process on one loaded model. After a warm-up of every decoder, the
prompts (each synthetic task's test split, or the rows of a user's prompts file) are split into
batches and every decoder (``hf_generate`` included) decodes batch 1, then every decoder decodes
batch 2, and so on, rotating the order each batch, so a noisy neighbour or a thermal dip slows
all decoders alike; with ``repeats`` R, each decoder decodes every batch R times and keeps its
fastest run (what a one-shot timing on a shared machine swings by, the fastest of a few runs
does not). ``speedup_vs_generate`` is a decoder's tokens/s over ``hf_generate``'s
tokens/s on the same task; ``speedup_vs_prompt_lookup`` the same over ``hf_prompt_lookup``'s,
which a prompts-file bench always runs.

Every decoder's output is also compared with ``hf_generate``'s greedy output (``exact_match``,
``token_agreement``, ``reproduces_greedy``): the only quality measure a prompts file has, as it
has no checker. Given ``reference``, the outputs.jsonl of an earlier prompts-file bench on the same
prompts (typically of the base model a fine-tune started from), every decoder's text is also
compared with that run's ``hf_generate`` text (``exact_match_vs_reference``,
``token_agreement_vs_reference``): how far the answers moved from the other model's. The forwards
each decoder makes are recorded (``forward_width``: mean new tokens per decode step) and the time
of a k-token forward relative to a 1-token one is measured on the spot
(:func:`~leaplm.inference.cost.step_cost`), so ``forward_cost`` says what a decoder's
tokens/forward cost per forward.

Writes ``bench.json`` (rows with :data:`~leaplm.inference.evaluate.ROW_KEYS`), ``bench.md``
(table, forward cost table, command, machine), ``bench.png`` (accuracy, or exact match on a
prompts file, against speedup per decoder) and, for a prompts file, ``outputs.jsonl`` (every
decoder's text per prompt).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Union

import torch
import transformers
from tqdm.auto import tqdm

from leaplm.data.tasks import Example, make_split
from leaplm.inference.cost import COST_WIDTHS, REPEATS, step_cost
from leaplm.inference.decoders.prompt_lookup import PROMPT_LOOKUP
from leaplm.inference.engine import Engine
from leaplm.inference.evaluate import (
    REFERENCE,
    TaskScore,
    batches,
    compare_with_reference,
    decode_recorded,
    format_table,
    load_for_eval,
    make_row,
    outputs_jsonl,
    peak_memory_mb,
    prompt_room,
    read_prompts,
    read_reference,
    reset_peak_memory,
    resolve_tasks,
    task_prompts,
)

WARMUP_TOKENS = 16

# A decoder to benchmark: a registered name, or {"decoder": name, "decoder_settings": {...}}.
DecoderSpec = Union[str, dict[str, Any]]


def parse_spec(spec: DecoderSpec) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict) and "settings" in spec:
        raise ValueError(f"decoder spec {spec!r}: the key 'settings' was renamed to 'decoder_settings'")
    if isinstance(spec, dict) and isinstance(spec.get("decoder"), str) and set(spec) <= {"decoder", "decoder_settings"}:
        return spec["decoder"], dict(spec.get("decoder_settings") or {})
    raise ValueError(
        f"cannot read decoder spec {spec!r}; use a decoder name such as 'ar', or "
        '{"decoder": "ar", "decoder_settings": {"temperature": 0.7}}'
    )


def spec_label(name: str, decoder_settings: dict[str, Any]) -> str:
    return f"{name} {json.dumps(decoder_settings, sort_keys=True)}" if decoder_settings else name


def run_bench(
    model_name: str,
    decoders: list[DecoderSpec],
    tasks: list[str] | None = None,
    n: int | None = 50,
    batch_size: int = 32,
    max_new_tokens: int = 160,
    out_dir: str | Path = "runs/bench",
    *,
    repeats: int = 1,
    prompts: str | Path | None = None,
    reference: str | Path | None = None,
    seed: int = 0,
    model=None,
    tokenizer=None,
    command: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Benchmark ``decoders`` against ``hf_generate``; write bench.json/.md/.png; return the rows.

    The prompts are ``n`` test prompts of each of ``tasks`` (the synthetic suite by default), or
    the first ``n`` rows (None = all) of the JSON-lines file ``prompts``
    (:func:`~leaplm.inference.evaluate.read_prompts`), which also adds ``hf_prompt_lookup``
    unless ``decoders`` name it. ``reference``, an earlier prompts-file run's ``outputs.jsonl``
    (:func:`~leaplm.inference.evaluate.read_reference`, checked before decoding), adds the
    ``*_vs_reference`` columns (:func:`~leaplm.inference.evaluate.compare_with_reference`).
    ``model``/``tokenizer`` may be passed already loaded; otherwise ``model_name`` (a path or
    ``tiny-teacher``) is loaded with :func:`load_for_eval`. With ``repeats`` R > 1 every decoder
    decodes each batch R times, in R rounds whose order rotates, and its time on the batch is its
    fastest run (other work on a shared machine only ever adds time, so the fastest is the most
    repeatable measure); its answers and forwards are that run's.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1 runs per batch, got {repeats}")
    if prompts is not None and tasks is not None:
        raise ValueError("pass either tasks (the synthetic suite) or prompts (a prompts file), not both")
    if reference is not None and prompts is None:
        raise ValueError("reference (an earlier bench's outputs.jsonl) compares answers on a prompts file; "
                         "pass prompts too")
    chosen = [parse_spec(s) for s in decoders if s != REFERENCE]
    peers = [(PROMPT_LOOKUP, {})] if prompts is not None and all(name != PROMPT_LOOKUP for name, _ in chosen) else []
    specs = [(REFERENCE, {})] + peers + chosen
    labels = [spec_label(name, decoder_settings) for name, decoder_settings in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"decoder specs repeat: {labels}; list each decoder (with its settings) once")
    if model is None:
        model, tokenizer = load_for_eval(model_name)
    engine = Engine(model, tokenizer)
    # (task, prompt ids, examples graded by the task's checker or None)
    suites: list[tuple[str, list[list[int]], list[Example] | None]] = []
    references = None
    if prompts is not None:
        user_prompts = read_prompts(prompts, tokenizer, n, prompt_room(engine, max_new_tokens))
        if reference is not None:
            references = read_reference(reference, user_prompts)
        suites.append((Path(prompts).name, [p.tokens for p in user_prompts], None))
    else:
        for task in resolve_tasks(tasks):
            examples = make_split(task, "test", n, seed)
            suites.append((task, task_prompts(tokenizer, examples), examples))

    # Warm-up: first calls pay for allocator growth and lazy initialisation; also surfaces a
    # bad decoder name or setting before any timing starts.
    warm_prompts = suites[0][1][:batch_size]
    for name, decoder_settings in specs:
        engine.generate(warm_prompts, name, min(WARMUP_TOKENS, max_new_tokens), **decoder_settings)

    measured = []  # per suite: (task, scores, peaks)
    texts: dict[str, list[str]] = {label: [] for label in labels}
    bar = tqdm(total=sum(len(ids) for _, ids, _ in suites), unit="prompt", disable=not progress,
               desc=f"bench ({len(specs)} decoders per batch)")
    for task, task_ids, examples in suites:
        scores = [TaskScore() for _ in specs]
        peaks = [0.0 for _ in specs]
        for batch_no, idx in enumerate(batches(list(range(len(task_ids))), batch_size)):
            outputs: list = [None] * len(specs)  # per decoder: its fastest run's (output, widths)
            for round_no in range(repeats):
                shift = (batch_no * repeats + round_no) % len(specs)
                for k in list(range(shift, len(specs))) + list(range(shift)):  # rotate who goes first
                    name, decoder_settings = specs[k]
                    reset_peak_memory(engine.device)
                    run = decode_recorded(engine, [task_ids[i] for i in idx], name, max_new_tokens, decoder_settings)
                    peaks[k] = max(peaks[k], peak_memory_mb(engine.device))
                    if outputs[k] is None or run[0].stats.wall_time_s < outputs[k][0].stats.wall_time_s:
                        outputs[k] = run
            greedy = outputs[0][0].sequences
            for k, (out, widths) in enumerate(outputs):
                scores[k].add(out, None if examples is None else [examples[i] for i in idx], greedy, widths)
                if prompts is not None:
                    texts[labels[k]] += out.texts
            bar.update(len(idx))
        measured.append((task, scores, peaks))
    bar.close()

    # The forward cost at the batch size each decoder ran at (prompt lookup decodes one prompt
    # at a time), over every width a decoder used and the tabulated ones.
    largest = max(len(task_ids) for _, task_ids, _ in suites)
    row_batch = [1 if name == PROMPT_LOOKUP else min(batch_size, largest) for name, _ in specs]
    context = cost_context(engine, suites, max_new_tokens)
    costs = {}
    for b in sorted(set(row_batch)):
        used = {w for _, scores, _ in measured for k, score in enumerate(scores) if row_batch[k] == b
                for w in score.widths}
        costs[b] = step_cost(model, sorted(used | set(COST_WIDTHS)), batch_size=b, context=context)

    lookup = next((k for k, (name, _) in enumerate(specs) if name == PROMPT_LOOKUP), None)
    # a reference only comes with a prompts file, whose one suite every text belongs to
    vs_reference = {label: compare_with_reference(texts[label], references, tokenizer)
                    for label in labels} if references is not None else {}
    rows: list[dict[str, Any]] = []
    for task, scores, peaks in measured:
        reference_tps = scores[0].stats.tokens_per_s
        lookup_tps = scores[lookup].stats.tokens_per_s if lookup is not None else 0.0
        for k, ((name, decoder_settings), score, peak) in enumerate(zip(specs, scores, peaks)):
            tps = score.stats.tokens_per_s
            rows.append(make_row(model_name, name, decoder_settings, task, score, peak,
                                 **vs_reference.get(labels[k], {}),
                                 forward_cost=score.forward_cost(costs[row_batch[k]]),
                                 speedup_vs_generate=tps / reference_tps if reference_tps > 0 else None,
                                 speedup_vs_prompt_lookup=tps / lookup_tps if lookup_tps > 0 else None))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(rows, indent=2))
    if prompts is not None:
        (out / "outputs.jsonl").write_text(outputs_jsonl(user_prompts, texts))
    call = command or _python_call(model_name, decoders, [task for task, _, _ in suites], n, batch_size,
                                   max_new_tokens, out, prompts, reference, repeats)
    (out / "bench.md").write_text(render_markdown(rows, call, engine.device, costs, context, repeats))
    plot(rows, out / "bench.png")
    return rows


def cost_context(engine: Engine, suites: list, max_new_tokens: int) -> int:
    """Cached tokens for the forward cost measurement: the mean prompt plus half the new tokens,
    where a decode step sits on average; within the model's positions."""
    lengths = [len(p) for _, task_ids, _ in suites for p in task_ids]
    context = round(sum(lengths) / len(lengths)) + max_new_tokens // 2
    if engine.max_positions is not None:
        context = min(context, engine.max_positions - max(COST_WIDTHS))
    return max(context, 1)


def _python_call(model_name, decoders, tasks, n, batch_size, max_new_tokens, out, prompts, reference,
                 repeats) -> str:
    source = f"prompts={str(prompts)!r}" if prompts is not None else f"tasks={tasks!r}"
    if reference is not None:
        source += f", reference={str(reference)!r}"
    if repeats > 1:
        source += f", repeats={repeats}"
    return (f"run_bench({model_name!r}, {decoders!r}, {source}, n={n}, batch_size={batch_size}, "
            f"max_new_tokens={max_new_tokens}, out_dir={str(out)!r})")


def machine_info(device: torch.device) -> dict[str, str]:
    """What the timings depend on: the processor, the threads torch used, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


BENCH_COLUMNS = [("decoder", "decoder"), ("decoder_settings", "settings"), ("task", "task"), ("n", "n"),
                 ("accuracy", "accuracy"), ("exact_match", "exact match"), ("token_agreement", "token agreement"),
                 ("reproduces_greedy", "reproduces greedy"),
                 ("exact_match_vs_reference", "exact match vs reference"),
                 ("token_agreement_vs_reference", "token agreement vs reference"),
                 ("tokens_per_forward", "tokens/forward"), ("forward_width", "forward width k"),
                 ("forward_cost", "k-token forward cost"), ("tokens_per_s", "tokens/s"),
                 ("speedup_vs_generate", "speedup vs generate"),
                 ("speedup_vs_prompt_lookup", "speedup vs prompt lookup"), ("peak_mem_mb", "peak mem MB")]


def measured_columns(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``columns`` without those no row measured (accuracy on a prompts file, prompt lookup on tasks, the
    ``*_vs_reference`` pair without a reference)."""
    return [c for c in columns if any(r[c[0]] is not None for r in rows)]


def render_markdown(rows: list[dict[str, Any]], command: str, device: torch.device,
                    costs: dict[int, dict[int, float]], context: int, repeats: int = 1) -> str:
    """``costs``: batch size -> :func:`~leaplm.inference.cost.step_cost` ratios, measured over ``context`` tokens."""
    model = rows[0]["model"] if rows else "?"
    machine = "\n".join(f"- {k}: {v}" for k, v in machine_info(device).items())
    cost_rows = [{"batch": b, **{f"k={k}": ratios[k] for k in COST_WIDTHS}} for b, ratios in sorted(costs.items())]
    cost_table = format_table(cost_rows, [("batch", "batch")] + [(f"k={k}", f"k={k}") for k in COST_WIDTHS])
    one_at_a_time = ("`hf_prompt_lookup` decodes one prompt at a time (Hugging Face runs prompt lookup on batch 1 "
                     "only), so above batch 1 its tokens/s is batch-1 speed; bench with `--batch-size 1` to compare "
                     "like for like. " if any(r["decoder"] == PROMPT_LOOKUP for r in rows) and max(costs) > 1 else "")
    vs_reference = ("Exact match and token agreement vs reference: the same measures against the `hf_generate` "
                    "texts of the earlier run passed as `--reference`, on text and on the texts retokenised. "
                    if any(r["exact_match_vs_reference"] is not None for r in rows) else "")
    fastest = (f"Each decoder decoded every batch {repeats} times, in rounds of rotating order; its time on a batch "
               "is its fastest run's. " if repeats > 1 else "")
    return (
        f"# leaplm bench: {model}\n\n"
        "Decoders and Hugging Face `generate` (greedy, KV cache) on the same prompts, interleaved batch by "
        f"batch in one process. {fastest}Exact match: the fraction of prompts whose tokens equal `generate`'s, stop "
        "token included; token agreement: the fraction of `generate`'s tokens reproduced before the first "
        f"difference; reproduces greedy: exact match on every prompt. {vs_reference}Forward width k: the mean new "
        "tokens per decode-step forward (prefills left out); k-token forward cost: the measured time of those "
        "forwards relative to a 1-token forward, so tokens/forward divided by that cost is about the speedup "
        f"to expect over one token per forward. {one_at_a_time}Peak memory: allocated GPU memory on CUDA; on "
        "CPU the process's peak resident set size.\n\n"
        f"```text\n{command}\n```\n\n{machine}\n\n{format_table(rows, measured_columns(rows, BENCH_COLUMNS))}\n\n"
        "## Cost of a k-token forward relative to 1 token\n\n"
        f"One forward of k new tokens over a cache of {context} tokens (about the mean prompt plus half the "
        "new tokens), timed against a 1-token forward at the batch sizes the decoders ran at; fastest of "
        f"{REPEATS} rounds, measured in this run (`inference/cost.py`). Where it stays near 1, a parallel "
        "decoder's tokens/forward turn into wall-clock speed; where it grows like k, they cannot.\n\n"
        f"{cost_table}\n"
    )


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy (exact match with ``generate`` on a prompts file) against speedup, one colour per
    decoder, points labelled by task."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    quality = "accuracy" if all(r["accuracy"] is not None for r in rows) else "exact_match"
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_label.setdefault(spec_label(r["decoder"], r["decoder_settings"]), []).append(r)
    for label, group in by_label.items():
        xs = [r["speedup_vs_generate"] or 0.0 for r in group]
        ys = [100 * r[quality] for r in group]
        ax.scatter(xs, ys, label=label, alpha=0.8)
        for x, y, r in zip(xs, ys, group):
            ax.annotate(r["task"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("speedup vs HF generate (tokens/s ratio)")
    ax.set_ylabel("accuracy (%)" if quality == "accuracy" else "exact match with generate (%)")
    ax.set_title(f"{rows[0]['model'] if rows else ''}: accuracy vs speed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
