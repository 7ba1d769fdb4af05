"""Per-task accuracy and speed of a model under a decoder, through the one engine.

Each task is decoded on its held-out test split (``make_split(task, "test", n, seed)``), chat
formatted exactly as training formats prompts, and graded by the task's own checker. The
trainer's end-of-run eval, ``leaplm eval``, ``leaplm bench`` and ``leaplm quickstart`` all use
these functions, so their rows share one schema (:data:`ROW_KEYS`).
"""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from leaplm.data.sft import prompt_ids
from leaplm.data.tasks import TASKS, Example, get_task, make_split
from leaplm.inference.engine import Engine, GenerationStats
from leaplm.models.zoo import EMBEDDED_TEACHER, load_model

# Every eval and bench row has exactly these keys; later decoders add rows, never keys.
ROW_KEYS = ("model", "decoder", "decoder_settings", "task", "n", "accuracy", "tokens_per_forward", "tokens_per_s",
            "speedup_vs_generate", "peak_mem_mb")


def resolve_tasks(tasks: list[str] | str | None) -> list[str]:
    """``None``, ``"synth"`` or ``["synth"]`` mean the whole suite; otherwise check the names."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not tasks or tasks == ["synth"]:
        return list(TASKS)
    for name in tasks:
        get_task(name)  # raises with the list of available tasks
    return list(tasks)


def task_prompts(tokenizer: PreTrainedTokenizerBase, examples: list[Example]) -> list[list[int]]:
    """Chat-formatted prompt ids, as the decoders see them in training rollouts too."""
    return [prompt_ids(tokenizer, [{"role": "user", "content": ex.prompt}]) for ex in examples]


@dataclass
class TaskScore:
    """Correct answers and decode cost accumulated over the batches of one task."""

    correct: int = 0
    total: int = 0
    stats: GenerationStats = field(default_factory=GenerationStats)

    def add(self, texts: list[str], examples: list[Example], stats: GenerationStats) -> None:
        task = get_task(examples[0].task)
        self.correct += sum(task.check(text, ex.answer) for text, ex in zip(texts, examples))
        self.total += len(examples)
        self.stats = self.stats + stats

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: allocated GPU memory on CUDA (reset per task); on CPU the peak
    resident set size of the whole process since it started (the OS keeps no resettable peak)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def make_row(model_name: str, decoder: str, decoder_settings: dict[str, Any], task: str, score: TaskScore,
             peak_mem_mb: float, speedup_vs_generate: float | None = None) -> dict[str, Any]:
    return {
        "model": model_name,
        "decoder": decoder,
        "decoder_settings": dict(decoder_settings),
        "task": task,
        "n": score.total,
        "accuracy": score.accuracy,
        "tokens_per_forward": score.stats.tokens_per_forward,
        "tokens_per_s": score.stats.tokens_per_s,
        "speedup_vs_generate": speedup_vs_generate,
        "peak_mem_mb": peak_mem_mb,
    }


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows``; ``columns`` are (key, header) pairs."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        if isinstance(value, dict):
            return json.dumps(value, sort_keys=True) if value else ""
        return str(value)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[k]) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


EVAL_COLUMNS = [("task", "task"), ("n", "n"), ("accuracy", "accuracy"),
                ("tokens_per_forward", "tokens/forward"), ("tokens_per_s", "tokens/s")]


def batches(items: list, size: int) -> list[list]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return [items[i:i + size] for i in range(0, len(items), size)]


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str] | None = None,
    n: int = 100,
    decoder: str = "ar",
    decoder_settings: dict[str, Any] | None = None,
    max_new_tokens: int = 160,
    batch_size: int = 32,
    seed: int = 0,
    model_name: str = "model",
) -> list[dict[str, Any]]:
    """Accuracy, tokens/forward and tokens/s per task; one row per task (keys: :data:`ROW_KEYS`).

    ``speedup_vs_generate`` is None here: only ``run_bench`` times HF ``generate`` alongside.
    """
    decoder_settings = dict(decoder_settings or {})
    engine = Engine(model, tokenizer)
    rows = []
    for task in resolve_tasks(tasks):
        examples = make_split(task, "test", n, seed)
        prompts = task_prompts(tokenizer, examples)
        score = TaskScore()
        reset_peak_memory(engine.device)
        for idx in batches(list(range(len(examples))), batch_size):
            out = engine.generate([prompts[i] for i in idx], decoder, max_new_tokens, **decoder_settings)
            score.add(out.texts, [examples[i] for i in idx], out.stats)
        rows.append(make_row(model_name, decoder, decoder_settings, task, score, peak_memory_mb(engine.device)))
    return rows


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_eval(name_or_path: str = EMBEDDED_TEACHER, dtype: str = "float32", device: str | None = None):
    """Load a model for decoding (eval mode, on CUDA when there is one) with its tokenizer."""
    model, tokenizer = load_model(name_or_path, dtype=dtype, device=device or default_device())
    return model.eval(), tokenizer
