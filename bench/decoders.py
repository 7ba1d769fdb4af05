"""Decoders side by side with Hugging Face ``generate``: accuracy and speed on the same prompts.

Everything runs in one process on one loaded model. After a warm-up of every decoder, each
task's prompts are split into batches and every decoder (``hf_generate`` included) decodes
batch 1, then every decoder decodes batch 2, and so on, rotating the order each batch, so a
noisy neighbour or a thermal dip slows all decoders alike. ``speedup_vs_generate`` is a
decoder's tokens/s over ``hf_generate``'s tokens/s on the same task.

Writes ``bench.json`` (rows with :data:`~leaplm.inference.evaluate.ROW_KEYS`), ``bench.md``
(table, command, machine) and ``bench.png`` (accuracy against speedup per decoder).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Union

import torch
import transformers

from leaplm.data.tasks import make_split
from leaplm.inference.engine import Engine
from leaplm.inference.evaluate import (
    TaskScore,
    batches,
    format_table,
    load_for_eval,
    make_row,
    peak_memory_mb,
    reset_peak_memory,
    resolve_tasks,
    task_prompts,
)

REFERENCE = "hf_generate"
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
    n: int = 50,
    batch_size: int = 32,
    max_new_tokens: int = 160,
    out_dir: str | Path = "runs/bench",
    *,
    seed: int = 0,
    model=None,
    tokenizer=None,
    command: str | None = None,
) -> list[dict[str, Any]]:
    """Benchmark ``decoders`` against ``hf_generate``; write bench.json/.md/.png; return the rows.

    ``model``/``tokenizer`` may be passed already loaded; otherwise ``model_name`` (a path or
    ``tiny-teacher``) is loaded with :func:`load_for_eval`.
    """
    specs = [(REFERENCE, {})] + [parse_spec(s) for s in decoders if s != REFERENCE]
    labels = [spec_label(name, decoder_settings) for name, decoder_settings in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"decoder specs repeat: {labels}; list each decoder (with its settings) once")
    if model is None:
        model, tokenizer = load_for_eval(model_name)
    engine = Engine(model, tokenizer)
    task_names = resolve_tasks(tasks)

    # Warm-up: first calls pay for allocator growth and lazy initialisation; also surfaces a
    # bad decoder name or setting before any timing starts.
    warm_prompts = task_prompts(tokenizer, make_split(task_names[0], "test", min(n, batch_size), seed))
    for name, decoder_settings in specs:
        engine.generate(warm_prompts, name, min(WARMUP_TOKENS, max_new_tokens), **decoder_settings)

    rows: list[dict[str, Any]] = []
    for task in task_names:
        examples = make_split(task, "test", n, seed)
        prompts = task_prompts(tokenizer, examples)
        scores = [TaskScore() for _ in specs]
        peaks = [0.0 for _ in specs]
        for batch_no, idx in enumerate(batches(list(range(len(examples))), batch_size)):
            shift = batch_no % len(specs)
            for k in list(range(shift, len(specs))) + list(range(shift)):  # rotate who goes first
                name, decoder_settings = specs[k]
                reset_peak_memory(engine.device)
                out = engine.generate([prompts[i] for i in idx], name, max_new_tokens, **decoder_settings)
                scores[k].add(out.texts, [examples[i] for i in idx], out.stats)
                peaks[k] = max(peaks[k], peak_memory_mb(engine.device))
        reference_tps = scores[0].stats.tokens_per_s
        for (name, decoder_settings), score, peak in zip(specs, scores, peaks):
            speedup = score.stats.tokens_per_s / reference_tps if reference_tps > 0 else None
            rows.append(make_row(model_name, name, decoder_settings, task, score, peak, speedup))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(rows, indent=2))
    (out / "bench.md").write_text(render_markdown(rows, command or _python_call(model_name, decoders, task_names, n,
                                                                                 batch_size, max_new_tokens, out),
                                                  engine.device))
    plot(rows, out / "bench.png")
    return rows


def _python_call(model_name, decoders, tasks, n, batch_size, max_new_tokens, out) -> str:
    return (f"run_bench({model_name!r}, {decoders!r}, tasks={tasks!r}, n={n}, batch_size={batch_size}, "
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
                 ("accuracy", "accuracy"), ("tokens_per_forward", "tokens/forward"), ("tokens_per_s", "tokens/s"),
                 ("speedup_vs_generate", "speedup vs generate"), ("peak_mem_mb", "peak mem MB")]


def render_markdown(rows: list[dict[str, Any]], command: str, device: torch.device) -> str:
    model = rows[0]["model"] if rows else "?"
    machine = "\n".join(f"- {k}: {v}" for k, v in machine_info(device).items())
    return (
        f"# leaplm bench: {model}\n\n"
        "Decoders and Hugging Face `generate` (greedy, KV cache) on the same prompts, interleaved batch by "
        "batch in one process. Peak memory: allocated GPU memory on CUDA; on CPU the process's peak "
        "resident set size.\n\n"
        f"```text\n{command}\n```\n\n{machine}\n\n{format_table(rows, BENCH_COLUMNS)}\n"
    )


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against speedup, one colour per decoder, points labelled by task."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_label.setdefault(spec_label(r["decoder"], r["decoder_settings"]), []).append(r)
    for label, group in by_label.items():
        xs = [r["speedup_vs_generate"] or 0.0 for r in group]
        ys = [100 * r["accuracy"] for r in group]
        ax.scatter(xs, ys, label=label, alpha=0.8)
        for x, y, r in zip(xs, ys, group):
            ax.annotate(r["task"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("speedup vs HF generate (tokens/s ratio)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{rows[0]['model'] if rows else ''}: accuracy vs speed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
