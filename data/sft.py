"""Supervised chat data: load prompt/response pairs, apply the chat template, mask the prompt.

Sources: the synthetic suite (``source: synth``), or any ``datasets`` source — a Hub id, a
``save_to_disk`` directory, or a .json/.jsonl/.parquet/.csv file — with either
``prompt``/``response`` columns or a chat ``messages`` column (names configurable).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from leaplm.config import DataConfig
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


def load_source(cfg: DataConfig, split: str | None = None) -> datasets.Dataset:
    """Load ``cfg.source`` and check it has the columns a chat sample needs."""
    split = split or cfg.split
    if cfg.source == "synth":
        return synthetic_dataset(cfg, split)
    path = Path(cfg.source)
    if path.suffix in _FILE_BUILDERS:
        if not path.is_file():
            raise DataError(f"data.source file {path} does not exist")
        if _holds_no_rows(path):
            raise DataError(f"data.source file {path} holds no rows; point data.source at a file with samples")
        ds = datasets.load_dataset(_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    elif path.is_dir() and (path / "dataset_info.json").is_file():
        ds = datasets.load_from_disk(str(path))
    else:
        ds = datasets.load_dataset(cfg.source, split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"data.source {cfg.source!r} has no split {split!r}; splits: {list(ds)}")
        ds = ds[split]
    if len(ds) == 0:
        raise DataError(f"data.source {cfg.source!r} (split {split!r}) is empty")
    has_pair = cfg.prompt_column in ds.column_names and cfg.response_column in ds.column_names
    if not has_pair and cfg.messages_column not in ds.column_names:
        raise DataError(
            f"data.source {cfg.source!r} needs columns {cfg.prompt_column!r} and {cfg.response_column!r}, "
            f"or a chat column {cfg.messages_column!r}; it has {ds.column_names}. "
            "Rename the columns, or set data.prompt_column / data.response_column / data.messages_column."
        )
    return ds


def _holds_no_rows(path: Path) -> bool:
    """datasets fails on an empty file with errors that do not say so (StopIteration, ArrowInvalid)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_metadata(path).num_rows == 0
    with path.open("rb") as f:
        return not any(line.strip() for line in f)  # stops at the first non-blank line


def to_messages(row: dict[str, Any], cfg: DataConfig) -> list[dict[str, str]]:
    if cfg.messages_column in row and row[cfg.messages_column] is not None:
        return list(row[cfg.messages_column])
    return [
        {"role": "user", "content": row[cfg.prompt_column]},
        {"role": "assistant", "content": row[cfg.response_column]},
    ]


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
