"""Supervised chat data: load prompt/response pairs, apply the chat template, mask the prompt.

Sources: the synthetic suite (``source: synth``), prompts built from the Python standard library
(``source: stdlib``, ``stdlib_code`` or ``stdlib_chat``; data/prompts.py), or any ``datasets``
source — a Hub id, a ``save_to_disk`` directory, or a .json/.jsonl/.parquet/.csv file — with either
``prompt``/``response`` columns or a chat ``messages`` column (names configurable).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import datasets
import torch
from datasets.exceptions import DatasetGenerationError
from pyarrow import ArrowException
from transformers import PreTrainedTokenizerBase

from leaplm.config import DataConfig
from leaplm.data.prompts import SOURCES as STDLIB_SOURCES, stdlib_prompts
from leaplm.data.tasks import TASKS, make_split

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    pass


def task_names(cfg: DataConfig) -> list[str]:
    names = list(cfg.tasks or TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise DataError(f"unknown synthetic task {unknown[0]!r} in data.tasks; available: {', '.join(TASKS)}")
    return names


def synthetic_dataset(cfg: DataConfig, split: str, n_per_task: int | None = None) -> datasets.Dataset:
    """The synthetic suite as a dataset with ``task``, ``prompt`` and ``response`` columns."""
    n = n_per_task if n_per_task is not None else (cfg.train_per_task if split == "train" else cfg.test_per_task)
    rows = [
        {"task": ex.task, "prompt": ex.prompt, "response": ex.answer}
        for name in task_names(cfg)
        for ex in make_split(name, split, n, cfg.seed)
    ]
    return datasets.Dataset.from_list(rows)


def stdlib_dataset(cfg: DataConfig, split: str) -> datasets.Dataset:
    """Standard-library prompts (``cfg.source`` one of ``stdlib``, ``stdlib_code``, ``stdlib_chat``) as
    a dataset with ``task``, ``id``, ``prompt`` and ``response`` columns, up to ``cfg.train_per_task``
    or ``cfg.test_per_task`` rows per kind."""
    if cfg.tasks:
        raise DataError(f"data.tasks picks synthetic tasks, but data.source is {cfg.source!r}; unset data.tasks "
                        f"(choose stdlib kinds with data.source: {', '.join(STDLIB_SOURCES)})")
    if split not in ("train", "test"):
        raise DataError(f"data.source {cfg.source!r} has the splits 'train' and 'test', not {split!r}")
    n = cfg.train_per_task if split == "train" else cfg.test_per_task
    return datasets.Dataset.from_list(stdlib_prompts(cfg.source, split, n, cfg.seed))


def load_source(cfg: DataConfig, split: str | None = None, *, require_response: bool = True) -> datasets.Dataset:
    """Load ``cfg.source`` and check that every row holds what a chat sample needs.

    ``require_response=False`` accepts rows with a prompt alone, for callers that make the answers
    themselves (rollouts); a response that is there must still be a string. A bad row is an error
    naming the file, line (or row) and field, or under ``data.bad_rows=skip`` left out and counted.
    """
    split = split or cfg.split
    if cfg.source == "synth":
        return synthetic_dataset(cfg, split)
    if cfg.source in STDLIB_SOURCES:
        return stdlib_dataset(cfg, split)
    path = Path(cfg.source)
    if cfg.source.startswith("stdlib") and not path.exists():  # else the Hub is asked for it, slowly
        raise DataError(f"unknown data.source {cfg.source!r}; the standard-library sources are "
                        f"{', '.join(STDLIB_SOURCES)}")
    skipped: list[str] = []  # what was wrong with each row left out

    def locate(i: int) -> str:
        return f"data.source {cfg.source!r} row {i + 1}"

    if path.suffix in _FILE_BUILDERS:
        if not path.is_file():
            raise DataError(f"data.source file {path} does not exist")
        if _holds_no_rows(path):
            raise DataError(f"data.source file {path} holds no rows; point data.source at a file with samples")
        ds, locate = _load_file(path, cfg, require_response, skipped)
    elif path.is_dir() and (path / "dataset_info.json").is_file():
        ds = datasets.load_from_disk(str(path))
    else:
        ds = datasets.load_dataset(cfg.source, split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"data.source {cfg.source!r} has no split {split!r}; splits: {list(ds)}")
        ds = ds[split]
    if len(ds) == 0:
        raise DataError(f"every row of data.source {cfg.source!r} is bad, e.g. {skipped[0]}" if skipped
                        else f"data.source {cfg.source!r} (split {split!r}) is empty")
    columns = ds.column_names
    has_pair = cfg.prompt_column in columns and (cfg.response_column in columns or not require_response)
    if not has_pair and cfg.messages_column not in columns:
        pair = f"{cfg.prompt_column!r} and {cfg.response_column!r}" if require_response else repr(cfg.prompt_column)
        raise DataError(
            f"data.source {cfg.source!r} needs columns {pair}, or a chat column {cfg.messages_column!r}; it has "
            f"{columns}. Rename the columns, or set data.prompt_column / data.response_column / "
            "data.messages_column."
        )
    bad: set[int] = set()
    for i, problem in _row_problems(ds, cfg, require_response):
        _bad_row(cfg, f"{locate(i)}: {problem}", skipped)
        bad.add(i)
    if bad:
        ds = ds.select([i for i in range(len(ds)) if i not in bad])
    if skipped:
        if len(ds) == 0:
            raise DataError(f"every row of data.source {cfg.source!r} is bad, e.g. {skipped[0]}")
        log.warning("data: skipped %d bad rows of %s (data.bad_rows=skip), kept %d; the first: %s",
                    len(skipped), cfg.source, len(ds), skipped[0])
    return ds


def _bad_row(cfg: DataConfig, problem: str, skipped: list[str]) -> None:
    """Raise for a bad row (``problem`` says where and what), or under data.bad_rows=skip note it."""
    if cfg.bad_rows == "skip":
        skipped.append(problem)
        return
    raise DataError(
        f"{problem}. Each row needs string fields {cfg.prompt_column!r} and {cfg.response_column!r}, or "
        f"{cfg.messages_column!r}: a list of {{role, content}} strings. Fix the row, or set data.bad_rows=skip "
        "to leave such rows out"
    )


def _load_file(path: Path, cfg: DataConfig, require_response: bool,
               skipped: list[str]) -> tuple[datasets.Dataset, Callable[[int], str]]:
    """Load a data file through ``datasets``; also say where each row is (a line of JSON lines).

    ``datasets`` reports a broken JSON line, or a field whose type changes between rows, without
    the file or line, so on failure the file is read again here to name them (or, under
    data.bad_rows=skip, to leave them out) and the good rows are loaded from what was read.
    """
    builder = _FILE_BUILDERS[path.suffix]
    json_lines = builder == "json" and _first_char(path) != "["
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except (DatasetGenerationError, ValueError) as err:
        if builder != "json":
            cause = err.__cause__ or err
            raise DataError(f"data.source file {path} could not be read: {cause}; fix the file") from None
        rows, places = [], []
        for place, row, problem in _json_rows(path, json_lines):
            problem = problem or _row_problem(row, cfg, require_response)
            if problem:
                _bad_row(cfg, f"{place}: {problem}", skipped)
                continue
            rows.append(row)
            places.append(place)
        columns = list(dict.fromkeys(k for row in rows for k in row))
        try:
            ds = datasets.Dataset.from_list([{k: row.get(k) for k in columns} for row in rows])
        except (ArrowException, ValueError, TypeError) as again:  # e.g. an extra field whose type varies
            raise DataError(f"data.source file {path} could not be read: {again}; fix the file") from None
        return ds, places.__getitem__
    if not json_lines:
        return ds, lambda i: f"{path} row {i + 1}"
    lines: list[int] = []  # file line of each row, read only when a row needs naming

    def locate_line(i: int) -> str:
        if not lines:
            with path.open("rb") as f:
                lines.extend(n for n, line in enumerate(f, 1) if line.strip())  # datasets skips blank lines
        return f"{path} line {lines[i]}"

    return ds, locate_line


def _first_char(path: Path) -> str:
    """The first non-blank character: "[" for a JSON array, otherwise the file holds JSON lines."""
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                return line.strip()[:1].decode("latin-1")
    return ""


def _json_rows(path: Path, json_lines: bool) -> Iterator[tuple[str, Any, str | None]]:
    """(where, row, None) for each row of a JSON file; (where, None, what is wrong) for one that is
    not a JSON object. A broken JSON array has no rows to go on with, so it is an error."""
    if not json_lines:
        try:
            items = json.loads(path.read_bytes())
        except ValueError as err:  # the message holds the line and column
            raise DataError(f"{path}: not valid JSON ({err}); fix the file (a broken row of a JSON array cannot be "
                            "skipped; one of a JSON-lines file can, with data.bad_rows=skip)") from None
        for i, item in enumerate(items if isinstance(items, list) else [items]):
            yield f"{path} row {i + 1}", item, None if isinstance(item, dict) else _not_an_object(item)
        return
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip(b"\r\n"))  # a truncated string then reads as unterminated
            except json.JSONDecodeError as err:
                yield f"{path} line {n} column {err.colno}", None, f"not valid JSON ({err.msg})"
            except UnicodeDecodeError as err:
                yield f"{path} line {n}", None, f"not UTF-8 text ({err})"
            else:
                yield f"{path} line {n}", row, None if isinstance(row, dict) else _not_an_object(row)


def _not_an_object(value: Any) -> str:
    return f"a row must be a JSON object of fields, got {type(value).__name__} {_short(value)}"


def _row_problems(ds: datasets.Dataset, cfg: DataConfig, require_response: bool) -> Iterator[tuple[int, str]]:
    """(index, what is wrong) for each row that cannot make a chat sample."""
    columns = [c for c in (cfg.prompt_column, cfg.response_column, cfg.messages_column) if c in ds.column_names]
    start = 0
    for batch in ds.select_columns(columns).iter(batch_size=1024):
        n = len(batch[columns[0]])
        for j in range(n):
            problem = _row_problem({c: batch[c][j] for c in columns}, cfg, require_response)
            if problem is not None:
                yield start + j, problem
        start += n


def _row_problem(row: dict[str, Any], cfg: DataConfig, require_response: bool) -> str | None:
    messages = row.get(cfg.messages_column)
    if messages is not None:
        name = cfg.messages_column
        if not isinstance(messages, list) or not messages:
            return f"field {name!r} must be a non-empty list of messages, got {_short(messages)}"
        for k, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                return f"field {name!r} item {k} must hold string 'role' and 'content', got {_short(m)}"
        if require_response and messages[-1]["role"] != "assistant":
            return f"field {name!r} must end with the assistant's answer, its last role is {messages[-1]['role']!r}"
        return None
    for column in (cfg.prompt_column, cfg.response_column):
        value = row.get(column)
        if value is None and (require_response or column == cfg.prompt_column):
            return f"field {column!r} is missing"
        if value is not None and not isinstance(value, str):
            return f"field {column!r} must be a string, got {type(value).__name__} {_short(value)}"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _holds_no_rows(path: Path) -> bool:
    """datasets fails on an empty file with errors that do not say so (StopIteration, ArrowInvalid)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_metadata(path).num_rows == 0
    with path.open("rb") as f:
        return not any(line.strip() for line in f)  # stops at the first non-blank line


def to_messages(row: dict[str, Any], cfg: DataConfig) -> list[dict[str, str]]:
    """The row as a chat; a prompt-only row (see ``require_response``) as the user turn alone."""
    if row.get(cfg.messages_column) is not None:
        return list(row[cfg.messages_column])
    messages = [{"role": "user", "content": row[cfg.prompt_column]}]
    if row.get(cfg.response_column) is not None:
        messages.append({"role": "assistant", "content": row[cfg.response_column]})
    return messages


def require_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template, which chat data needs; "
            "use an instruct/chat checkpoint's tokenizer or set tokenizer.chat_template"
        )


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation so far plus the assistant header, as decoders see a prompt."""
    require_chat_template(tokenizer)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` with every token but the final assistant turn masked.

    Prompt and response are tokenized separately and concatenated, so training sees exactly the
    prompt tokens a decoder is given at inference time.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError("a chat sample must end with an assistant message")
    require_chat_template(tokenizer)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if not full.startswith(prompt):
        raise DataError("the chat template renders the prompt differently inside the full conversation")
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    return {"input_ids": p_ids + r_ids, "labels": [IGNORE_INDEX] * len(p_ids) + r_ids}


@dataclass
class TokenizedData:
    samples: list[dict[str, list[int]]]
    n_dropped: int
    n_truncated: int


def tokenize_dataset(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> TokenizedData:
    """Tokenize every row, applying ``cfg.overlong`` to samples longer than ``cfg.max_length``."""
    samples, dropped, truncated = [], 0, 0
    for i, row in enumerate(ds):
        sample = tokenize_chat(tokenizer, to_messages(row, cfg))
        overlong = len(sample["input_ids"]) > cfg.max_length
        if overlong:
            if cfg.overlong == "error":
                raise DataError(
                    f"sample {i} has {len(sample['input_ids'])} tokens > data.max_length={cfg.max_length}; "
                    "raise data.max_length or set data.overlong to 'drop' or 'truncate'"
                )
            if cfg.overlong == "drop":
                dropped += 1
                continue
            sample = {k: v[: cfg.max_length] for k, v in sample.items()}
        if all(t == IGNORE_INDEX for t in sample["labels"]):
            dropped += 1  # nothing left to supervise (response truncated away); counted once, as dropped
            continue
        truncated += overlong
        samples.append(sample)
    if dropped or truncated:
        log.warning("data: %d samples dropped and %d truncated at data.max_length=%d", dropped, truncated, cfg.max_length)
    if not samples:
        raise DataError(f"no sample fits data.max_length={cfg.max_length}; raise it or set data.overlong=truncate")
    return TokenizedData(samples, dropped, truncated)


def pack(samples: Sequence[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Greedy packing of whole samples into rows of at most ``max_length`` tokens.

    Each row carries ``position_ids`` that restart at 0 for every sample. Given those and no
    2D attention mask, transformers builds a block-diagonal causal mask, so packed samples do
    not attend to each other and the loss equals the unpacked one (tests/test_data.py).
    """
    rows: list[dict[str, list[int]]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for s in samples:
        if current["input_ids"] and len(current["input_ids"]) + len(s["input_ids"]) > max_length:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += s["input_ids"]
        current["labels"] += s["labels"]
        current["position_ids"] += list(range(len(s["input_ids"])))
    if current["input_ids"]:
        rows.append(current)
    return rows


class PadCollator:
    """Right-pads ``input_ids``/``labels`` into a batch; counts the supervised tokens.

    Packed rows (with ``position_ids``) also get ``position_ids``; their padding tail restarts
    at position 0, so it forms its own block and never mixes with a real sample. Models must
    then be called with ``attention_mask=None`` (``model_inputs`` does this); ``attention_mask``
    still marks real tokens, for counting.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)  # [b, s]
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)  # [b, s]
        attention_mask = torch.zeros((len(samples), width), dtype=torch.long)  # [b, s]
        packed = "position_ids" in samples[0]
        position_ids = torch.zeros((len(samples), width), dtype=torch.long)  # [b, s]
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[i, :n] = torch.tensor(s["input_ids"])
            labels[i, :n] = torch.tensor(s["labels"])
            attention_mask[i, :n] = 1
            if packed:
                position_ids[i, :n] = torch.tensor(s["position_ids"])
                position_ids[i, n:] = torch.arange(width - n)
        # Targets are labels[:, 1:]; the trainer normalises the loss by this count over the
        # whole optimizer step, so micro-batch size and accumulation do not change the loss.
        n_targets = (labels[:, 1:] != IGNORE_INDEX).sum()
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "n_targets": n_targets}
        if packed:
            batch["position_ids"] = position_ids
        return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """Forward kwargs for a padded or a packed batch (see PadCollator)."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "attention_mask": None}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
