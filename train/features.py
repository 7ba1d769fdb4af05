"""Offline features: a frozen model's hidden states of every training sample, computed once and cached.

Recipes that train a drafter on a frozen model (draft heads, EAGLE-3) can skip the model's forward
at every step by reading its states from this cache (as Hydra's ``hydra/data/build_hidden_states.py``
and SpecForge's offline training do). A recipe names what it caches with a ``states`` function,
``(model, input_ids [b, T], attention_mask [b, T]) -> [b, T, X]``, the same function its online step
calls, so a cached state is exactly what the online step computes.

Layout: ``OUTPUT_DIR/features/<key>/shard-NNNNN.safetensors`` (plus a settings file), the key a
hash of everything the states depend on (:func:`feature_settings`); a pointer file names the
current one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from leaplm.config import Config, ConfigError
from leaplm.data.sft import PadCollator
from leaplm.train.rollouts import (
    CURRENT_FILE,
    SETTINGS_FILE,
    current_rollouts,
    model_fingerprint,
    rollout_key,
    rollouts_dir,
)

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what a shard holds changes: older caches are then recomputed
SHARD_SAMPLES = 256  # samples per shard file, the unit a process computes and writes at once

States = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]


def features_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / "features"


def shard_file(directory: Path, shard: int) -> Path:
    return directory / f"shard-{shard:05d}.safetensors"


def feature_settings(cfg: Config, samples: list[dict], what: str) -> dict:
    """What the cached states depend on: which states (``what``), the model's weights and how it
    runs, and the samples (so the rollouts they come from, and ``rollout.drop_wrong``)."""
    ids = hashlib.sha256(json.dumps([s["input_ids"] for s in samples]).encode()).hexdigest()
    return {"format": FORMAT, "states": what, "model": model_fingerprint(cfg.model.name_or_path),
            "dtype": cfg.model.dtype, "attn_implementation": cfg.model.attn_implementation,
            "mixed_precision": cfg.train.mixed_precision, "rollouts": current_rollouts(rollouts_dir(cfg)).name,
            "samples": len(samples), "samples_sha256": ids, "shard_samples": SHARD_SAMPLES}


def extract_features(cfg: Config, model, samples: list[dict], states: States, accelerator, *, what: str,
                     pad_token_id: int) -> Path:
    """Compute (or reuse) ``states`` of every sample of ``samples`` (each with an ``index``, its
    place in the list); the directory. ``what`` names the states in the settings and the log.

    Stored in the dtype the model computes them in (the model's, or float32 under autocast): the
    cache then holds exactly what online training computes, so offline training is the same run,
    only faster. Samples are cut into shards of :data:`SHARD_SAMPLES` in dataset order and batched
    within a shard by ``train.micro_batch_size``, so each shard is the same whatever the process
    count (another batching moves the states by float rounding only, so the key leaves it out);
    process r computes shards r, r + P, ... (each written atomically, so a rerun after a crash keeps
    the finished ones), and training looks a sample's states up by its dataset index.
    """
    acc = accelerator
    settings = feature_settings(cfg, samples, what)
    root = features_dir(cfg)
    key = rollout_key(settings)
    final, partial = root / key, root / f"{key}.partial"
    if (final / SETTINGS_FILE).is_file():
        log.info("features: reusing %s (same model, rollouts and settings)", final)
    else:
        batch = cfg.train.micro_batch_size
        count = math.ceil(len(samples) / SHARD_SAMPLES)
        shards = list(range(acc.process_index, count, acc.num_processes))
        if acc.is_main_process:
            tokens = sum(len(s["input_ids"]) for s in samples)
            log.info("features: the model's %s of %d samples (%d tokens), %d shards of %d over %d processes, "
                     "batches of %d -> %s", what, len(samples), tokens, count, SHARD_SAMPLES, acc.num_processes,
                     batch, final)
        partial.mkdir(parents=True, exist_ok=True)
        collate = PadCollator(pad_token_id)
        mine = [i for j in shards for i in range(j * SHARD_SAMPLES, min((j + 1) * SHARD_SAMPLES, len(samples)))]
        bar = tqdm(total=sum(len(samples[i]["input_ids"]) for i in mine), desc="features", unit="tok",
                   disable=not (cfg.logging.progress_bar and acc.is_main_process))
        model.eval()
        for j in shards:
            part = samples[j * SHARD_SAMPLES:(j + 1) * SHARD_SAMPLES]
            if shard_file(partial, j).is_file():  # written by an interrupted run with the same settings
                bar.update(sum(len(s["input_ids"]) for s in part))
                continue
            tmp = shard_file(partial, j).with_suffix(".tmp")
            save_file(shard_states(model, part, states, collate, batch, acc, bar), str(tmp))
            os.replace(tmp, shard_file(partial, j))
        bar.close()
        acc.wait_for_everyone()
        if acc.is_main_process:
            (partial / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
            partial.rename(final)
            log.info("features: %d shards -> %s", count, final)
    if acc.is_main_process:
        (root / CURRENT_FILE).write_text(key + "\n")
    acc.wait_for_everyone()
    return final


def shard_states(model, part: list[dict], states: States, collate: PadCollator, batch: int, acc,
                 bar) -> dict[str, torch.Tensor]:
    """The states [T_i, X] of the samples ``part``, ``batch`` at a time, keyed by sample index."""
    out: dict[str, torch.Tensor] = {}
    for first in range(0, len(part), batch):
        rows = part[first:first + batch]
        padded = collate(rows)
        with acc.autocast():  # as the prepared model runs the online step
            computed = states(model, padded["input_ids"].to(acc.device),
                              padded["attention_mask"].to(acc.device))  # [b, T, X]
        for row, h in zip(rows, computed):
            out[str(row["index"])] = h[:len(row["input_ids"])].cpu().contiguous()
        bar.update(sum(len(r["input_ids"]) for r in rows))
    return out


def current_features(cfg: Config) -> Path:
    """The feature directory the last :func:`extract_features` into this run's output_dir made or reused."""
    pointer = features_dir(cfg) / CURRENT_FILE
    if not pointer.is_file():
        raise ConfigError(f"method.offline trains from cached hidden states, and {features_dir(cfg)} has none: "
                          "the recipe's rollout step computes them before training")
    return features_dir(cfg) / pointer.read_text().strip()


class FeatureCollator:
    """:class:`PadCollator`'s batch plus ``hidden`` [b, T, X]: each sample's cached states, read by
    its ``index`` from the shards in ``directory`` and zero-padded like its tokens."""

    def __init__(self, pad_token_id: int, directory: Path):
        self.pad = PadCollator(pad_token_id)
        self.directory = directory
        self.shard_samples = json.loads((directory / SETTINGS_FILE).read_text())["shard_samples"]
        self._shards: dict[int, Any] = {}  # memory-mapped: a shard is read only where its samples are used

    def states(self, index: int) -> torch.Tensor:
        shard = index // self.shard_samples
        if shard not in self._shards:
            self._shards[shard] = safe_open(str(shard_file(self.directory, shard)), framework="pt")
        return self._shards[shard].get_tensor(str(index))

    def __call__(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        batch = self.pad(samples)
        states = [self.states(s["index"]) for s in samples]
        hidden = states[0].new_zeros(*batch["input_ids"].shape, states[0].shape[-1])  # [b, T, X]
        for row, (sample, h) in enumerate(zip(samples, states)):
            if len(h) != len(sample["input_ids"]):
                raise ValueError(f"the cached states of sample {sample['index']} in {self.directory} cover "
                                 f"{len(h)} tokens, the sample has {len(sample['input_ids'])}: the cache is stale. "
                                 f"Delete {self.directory} and rerun to compute it again")
            hidden[row, :len(h)] = h
        batch["hidden"] = hidden
        return batch


def build_collator(cfg: Config, tokenizer):
    """The collator of a recipe with ``method.offline``: cached states joined to each batch when it
    is on, plain padding otherwise."""
    if cfg.method.offline:
        return FeatureCollator(tokenizer.pad_token_id, current_features(cfg))
    return PadCollator(tokenizer.pad_token_id)
