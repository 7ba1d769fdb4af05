"""Per-task accuracy and speed of a model under a decoder, through the one engine.

Each task is decoded on its held-out test split (``make_split(task, "test", n, seed)``), chat
formatted exactly as training formats prompts, and graded by the task's own checker. A user's
own prompts (:func:`read_prompts`, a JSON-lines file) have no checker: a decoder's output on
them is compared with the same model's greedy output from Hugging Face ``generate``. The
trainer's end-of-run eval, ``leaplm eval``, ``leaplm bench`` and ``leaplm quickstart`` all use
these functions, so their rows share one schema (:data:`ROW_KEYS`).
"""

from __future__ import annotations

import json
import resource
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from leaplm.data.sft import DataError, prompt_ids
from leaplm.data.tasks import TASKS, Example, get_task, make_split
from leaplm.inference.cost import decode_widths, record_forwards
from leaplm.inference.engine import (
    Engine,
    GenerationOutput,
    GenerationStats,
)
from leaplm.models.zoo import EMBEDDED_TEACHER, load_model

REFERENCE = "hf_generate"  # the greedy output every decoder's output is compared with

# Every eval and bench row has exactly these keys; later decoders add rows, never keys. A key a
# run does not measure is None: ``accuracy`` needs a task's checker, ``exact_match``,
# ``token_agreement`` and ``reproduces_greedy`` the greedy reference (bench, eval on prompts), the
# ``*_vs_reference`` pair an earlier run's outputs (bench --reference), ``forward_cost`` and the
# speedups a bench.
ROW_KEYS = ("model", "decoder", "decoder_settings", "task", "n", "accuracy", "exact_match", "token_agreement",
            "reproduces_greedy", "exact_match_vs_reference", "token_agreement_vs_reference", "tokens_per_forward",
            "forward_width", "forward_cost", "tokens_per_s", "speedup_vs_generate", "speedup_vs_prompt_lookup",
            "peak_mem_mb")


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


class PromptFileError(ValueError):
    """A prompts file that cannot be read; the message names the file, the line and the fix."""


PROMPT_FIELDS = ("prompt", "messages", "text")
PROMPT_ROW_HELP = ('each line is one JSON object: {"prompt": "..."} (a chat user turn), {"messages": [{"role": '
                   '"user", "content": "..."}]} (chat turns ending with a user turn) or {"text": "..."} (plain '
                   'completion, no chat template), with an optional "id"')


@dataclass
class UserPrompt:
    id: str | int  # the row's "id", or its line number
    tokens: list[int]


def read_prompts(path: str | Path, tokenizer: PreTrainedTokenizerBase, n: int | None = None,
                 max_tokens: int | None = None) -> list[UserPrompt]:
    """The prompts of a JSON-lines file as token ids; ``n`` caps the rows read (None = all).

    ``{"prompt": str}`` is one chat user turn and ``{"messages": [...]}`` a conversation ending
    with a user turn; both get the chat template with the generation prompt, exactly as
    :func:`task_prompts` formats the synthetic tasks. ``{"text": str}`` is a plain completion,
    tokenized as is: no template, a BOS only if the tokenizer adds one by default (never an EOS,
    which would end the decode at once). An optional ``"id"`` (string or integer) names the row;
    the line number names it otherwise. Blank lines are skipped. ``max_tokens`` is the longest
    prompt allowed (the model's positions less the new tokens).
    """
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompts file {path} does not exist; {PROMPT_ROW_HELP}")
    prompts: list[UserPrompt] = []
    seen: dict[str | int, int] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if n is not None and len(prompts) >= n:
            break
        if not line.strip():
            continue
        try:
            prompt = _prompt_row(line, line_no, tokenizer, max_tokens)
            if prompt.id in seen:
                raise _BadRow(f"id {prompt.id!r} is already used on line {seen[prompt.id]}; give every row its own id")
        except _BadRow as err:
            raise PromptFileError(f"{path}:{line_no}: {err}") from None
        seen[prompt.id] = line_no
        prompts.append(prompt)
    if not prompts:
        raise PromptFileError(f"prompts file {path} has no rows; {PROMPT_ROW_HELP}")
    return prompts


class _BadRow(Exception):
    """What is wrong with one row of a prompts file; read_prompts adds the file and line."""


def _prompt_row(line: str, line_no: int, tokenizer: PreTrainedTokenizerBase, max_tokens: int | None) -> UserPrompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise _BadRow(f"not valid JSON ({err}); {PROMPT_ROW_HELP}") from None
    if not isinstance(row, dict):
        raise _BadRow(f"expected a JSON object, got {type(row).__name__}; {PROMPT_ROW_HELP}")
    kinds = [k for k in PROMPT_FIELDS if k in row]
    unknown = sorted(set(row) - {*PROMPT_FIELDS, "id"})
    if unknown or len(kinds) != 1:
        found = f"unknown field(s) {unknown}" if unknown else f"fields {kinds or sorted(row)}"
        raise _BadRow(f"{found}; give exactly one of 'prompt', 'messages' or 'text'; {PROMPT_ROW_HELP}")
    row_id = row.get("id", line_no)
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        raise _BadRow(f'"id" must be a string or an integer, got {row_id!r}')
    kind, value = kinds[0], row[kinds[0]]
    if kind == "messages":
        if (not isinstance(value, list) or not value
                or not all(isinstance(m, dict) and set(m) == {"role", "content"}
                           and all(isinstance(v, str) for v in m.values()) for m in value)):
            raise _BadRow('"messages" must be a non-empty list of {"role": str, "content": str} objects')
        if value[-1]["role"] != "user":
            raise _BadRow(f'"messages" must end with a user turn for the model to answer, not {value[-1]["role"]!r}')
    elif not isinstance(value, str) or not value:
        raise _BadRow(f'"{kind}" must be a non-empty string, got {value!r}')
    if kind == "text":
        tokens = plain_prompt_ids(tokenizer, value)
    else:
        try:
            tokens = prompt_ids(tokenizer, value if kind == "messages" else [{"role": "user", "content": value}])
        except DataError as err:
            raise _BadRow(f'{err}; or write the row as {{"text": ...}} to decode it without a template') from None
    if not tokens:
        raise _BadRow("the prompt tokenizes to no tokens; every prompt needs at least one")
    if max_tokens is not None and len(tokens) > max_tokens:
        raise _BadRow(f"the prompt has {len(tokens)} tokens, more than the {max_tokens} that leave room for the "
                      "new tokens in the model's positions; shorten it or lower --max-new-tokens")
    return UserPrompt(row_id, tokens)


def plain_prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """``text`` tokenized as is, with the BOS the tokenizer adds by default and no other special token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer(text)["input_ids"][:1] == [bos] and ids[:1] != [bos]:
        ids = [bos] + ids
    return ids


@dataclass
class TaskScore:
    """A decoder's answers on one task (or prompts file), accumulated over batches: graded by the
    task's checker, compared with the greedy reference, and what decoding them cost."""

    correct: int = 0
    graded: int = 0  # answers a task's checker graded
    total: int = 0
    matches: int = 0  # answers whose tokens equal the reference's exactly (stop token included)
    compared: int = 0  # answers compared with a reference
    agreed_tokens: int = 0  # reference tokens reproduced before the first difference
    reference_tokens: int = 0
    widths: Counter = field(default_factory=Counter)  # new tokens per decode-step forward -> forwards
    stats: GenerationStats = field(default_factory=GenerationStats)

    def add(self, output: GenerationOutput, examples: list[Example] | None = None,
            reference: list[list[int]] | None = None, widths: list[int] = ()) -> None:
        """Add a batch's ``output``, graded when ``examples`` come with a checker, compared when a
        ``reference`` (the greedy token sequences of the same prompts) is given."""
        self.total += len(output.sequences)
        if examples is not None:
            task = get_task(examples[0].task)
            self.correct += sum(task.check(text, ex.answer) for text, ex in zip(output.texts, examples))
            self.graded += len(examples)
        if reference is not None:
            for tokens, expected in zip(output.sequences, reference):
                self.matches += tokens == expected
                self.agreed_tokens += agreed_prefix(tokens, expected)
                self.reference_tokens += len(expected)
            self.compared += len(reference)
        self.widths.update(widths)
        self.stats = self.stats + output.stats

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.graded if self.graded else None

    @property
    def exact_match(self) -> float | None:
        """Fraction of answers equal to the reference token for token, up to and including the stop token."""
        return self.matches / self.compared if self.compared else None

    @property
    def token_agreement(self) -> float | None:
        """Fraction of the reference's tokens reproduced: per answer, the tokens before the first
        position where it differs from the reference, summed over answers, over the reference's tokens."""
        return self.agreed_tokens / self.reference_tokens if self.compared else None

    @property
    def reproduces_greedy(self) -> bool | None:
        """Whether every answer equals the reference: lossless on these prompts."""
        return self.matches == self.compared if self.compared else None

    @property
    def forward_width(self) -> float | None:
        """Mean new tokens per decode-step forward (prefills left out): the k of its forwards."""
        count = sum(self.widths.values())
        return sum(k * c for k, c in self.widths.items()) / count if count else None

    def forward_cost(self, ratios: dict[int, float]) -> float | None:
        """Mean cost of the decode-step forwards relative to a 1-token forward, ``ratios`` being
        :func:`~leaplm.inference.cost.step_cost`'s measurement covering every width made."""
        count = sum(self.widths.values())
        return sum(ratios[k] * c for k, c in self.widths.items()) / count if count else None


def agreed_prefix(tokens: list[int], expected: list[int]) -> int:
    """The tokens of ``expected`` that ``tokens`` reproduces before the first position where they differ."""
    return next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), min(len(tokens), len(expected)))


def decode_recorded(engine: Engine, prompts: list[list[int]], decoder: str, max_new_tokens: int,
                    decoder_settings: dict[str, Any]) -> tuple[GenerationOutput, list[int]]:
    """``engine.generate`` and the widths of the decode-step forwards it made (prefills left out)."""
    with record_forwards(engine.model) as calls:
        out = engine.generate(prompts, decoder, max_new_tokens, **decoder_settings)
    return out, decode_widths(calls)


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
             peak_mem_mb: float, *, exact_match_vs_reference: float | None = None,
             token_agreement_vs_reference: float | None = None, forward_cost: float | None = None,
             speedup_vs_generate: float | None = None, speedup_vs_prompt_lookup: float | None = None
             ) -> dict[str, Any]:
    return {
        "model": model_name,
        "decoder": decoder,
        "decoder_settings": dict(decoder_settings),
        "task": task,
        "n": score.total,
        "accuracy": score.accuracy,
        "exact_match": score.exact_match,
        "token_agreement": score.token_agreement,
        "reproduces_greedy": score.reproduces_greedy,
        "exact_match_vs_reference": exact_match_vs_reference,
        "token_agreement_vs_reference": token_agreement_vs_reference,
        "tokens_per_forward": score.stats.tokens_per_forward,
        "forward_width": score.forward_width,
        "forward_cost": forward_cost,
        "tokens_per_s": score.stats.tokens_per_s,
        "speedup_vs_generate": speedup_vs_generate,
        "speedup_vs_prompt_lookup": speedup_vs_prompt_lookup,
        "peak_mem_mb": peak_mem_mb,
    }


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows``; ``columns`` are (key, header) pairs."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
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
PROMPT_EVAL_COLUMNS = [("task", "prompts"), ("n", "n"), ("exact_match", "exact match"),
                       ("token_agreement", "token agreement"), ("reproduces_greedy", "reproduces greedy"),
                       ("tokens_per_forward", "tokens/forward"), ("forward_width", "forward width"),
                       ("tokens_per_s", "tokens/s")]


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

    The columns that need the greedy reference, ``forward_cost`` and the speedups are None here:
    only ``run_bench`` decodes with HF ``generate`` alongside.
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
            out, widths = decode_recorded(engine, [prompts[i] for i in idx], decoder, max_new_tokens, decoder_settings)
            score.add(out, [examples[i] for i in idx], widths=widths)
        rows.append(make_row(model_name, decoder, decoder_settings, task, score, peak_memory_mb(engine.device)))
    return rows


def prompt_room(engine: Engine, max_new_tokens: int) -> int | None:
    """The longest prompt that leaves ``max_new_tokens`` within the model's positions (None = no limit)."""
    return None if engine.max_positions is None else engine.max_positions - max_new_tokens


def outputs_jsonl(prompts: list[UserPrompt], texts: dict[str, list[str]]) -> str:
    """``outputs.jsonl``: a line per prompt with its id and every decoder's text for it
    (``texts``: decoder -> texts in prompt order)."""
    rows = [{"id": p.id, "outputs": {label: t[i] for label, t in texts.items()}} for i, p in enumerate(prompts)]
    return "".join(json.dumps(row) + "\n" for row in rows)


REFERENCE_HELP = ("the outputs.jsonl of an earlier `leaplm bench --prompts` (or `leaplm eval --prompts --out`) run "
                  "on the same prompts file and --n")


def read_reference(path: str | Path, prompts: list[UserPrompt]) -> list[str]:
    """The ``hf_generate`` texts of an earlier run's :func:`outputs_jsonl` file, in the order of
    ``prompts``; raises ValueError, saying what differs, unless it holds one for each of ``prompts``'
    ids, in the same order, and no others."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"reference {path} does not exist; pass {REFERENCE_HELP}")
    ids, texts = [], []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row_id, text = row["id"], row["outputs"][REFERENCE]
        except (ValueError, KeyError, TypeError):  # not JSON, a key missing, not an object
            text = None
        if not isinstance(text, str):
            raise ValueError(f'{path}:{line_no}: no {REFERENCE} text; expected {{"id": ..., "outputs": '
                             f'{{"{REFERENCE}": "...", ...}}}}, a line of {REFERENCE_HELP}')
        ids.append(row_id)
        texts.append(text)
    expected = [p.id for p in prompts]
    if len(ids) != len(expected):
        raise ValueError(f"reference {path} has {len(ids)} prompts, the bench {len(expected)}; pass {REFERENCE_HELP}")
    if ids != expected:
        i = next(i for i, (a, b) in enumerate(zip(ids, expected)) if a != b)
        order = " (the same ids in another order)" if set(ids) == set(expected) else ""
        raise ValueError(f"reference {path}: prompt {i + 1} has id {ids[i]!r}, the prompts file's {expected[i]!r}"
                         f"{order}; pass {REFERENCE_HELP}")
    return texts


def compare_with_reference(texts: list[str], references: list[str],
                           tokenizer: PreTrainedTokenizerBase) -> dict[str, float | None]:
    """``exact_match_vs_reference``: the fraction of ``texts`` equal to their reference text;
    ``token_agreement_vs_reference``: :attr:`TaskScore.token_agreement` of the texts against the
    references, both tokenized with ``tokenizer`` without special tokens.

    Exact match is on text. Agreement is on token ids retokenised from text, on both sides alike
    (the reference run's tokens are not stored), so equal texts always agree in full; a
    retokenised text may split differently from the tokens the model generated at rare spots, and
    the stop token, absent from the text, is not compared.
    """
    expected = tokenizer(references, add_special_tokens=False)["input_ids"]
    tokens = tokenizer(texts, add_special_tokens=False)["input_ids"]
    total = sum(len(r) for r in expected)
    agreed = sum(agreed_prefix(t, r) for t, r in zip(tokens, expected))
    return {"exact_match_vs_reference": sum(t == r for t, r in zip(texts, references)) / len(references),
            "token_agreement_vs_reference": agreed / total if total else None}


def evaluate_prompts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    n: int | None = None,
    decoder: str = "ar",
    decoder_settings: dict[str, Any] | None = None,
    max_new_tokens: int = 160,
    batch_size: int = 32,
    model_name: str = "model",
) -> tuple[list[dict[str, Any]], str]:
    """``decoder`` on the prompts of a JSON-lines file (:func:`read_prompts`; ``n`` caps the rows)
    against the same model's greedy output (``hf_generate`` on the same batches).

    Returns one row (keys: :data:`ROW_KEYS`; ``task`` is the file's name, ``accuracy`` None as
    there is no checker) and the :func:`outputs_jsonl` text of the decoder and the reference.
    """
    decoder_settings = dict(decoder_settings or {})
    engine = Engine(model, tokenizer)
    prompts = read_prompts(path, tokenizer, n, prompt_room(engine, max_new_tokens))
    score, peak = TaskScore(), 0.0
    texts: dict[str, list[str]] = {REFERENCE: [], decoder: []}
    for chunk in batches(prompts, batch_size):
        ids = [p.tokens for p in chunk]
        reset_peak_memory(engine.device)
        out, widths = decode_recorded(engine, ids, decoder, max_new_tokens, decoder_settings)
        peak = max(peak, peak_memory_mb(engine.device))
        reference = out if decoder == REFERENCE else engine.generate(ids, REFERENCE, max_new_tokens)
        score.add(out, reference=reference.sequences, widths=widths)
        texts[REFERENCE] += reference.texts
        texts[decoder] += out.texts
    row = make_row(model_name, decoder, decoder_settings, Path(path).name, score, peak)
    return [row], outputs_jsonl(prompts, texts)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_eval(name_or_path: str = EMBEDDED_TEACHER, dtype: str = "float32", device: str | None = None):
    """Load a model for decoding (eval mode, on CUDA when there is one) with its tokenizer."""
    model, tokenizer = load_model(name_or_path, dtype=dtype, device=device or default_device())
    return model.eval(), tokenizer
