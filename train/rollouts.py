"""Rollouts: training data made by the model itself through the shared engine.

Two kinds share the prompts, the sharding, the settings key and the reuse: Jacobi trajectories
(CLLM, Jacobi Forcing; described below) and the final answers of any engine decoder
(:func:`collect_decoded_rollouts`, columns :data:`ANSWER_FEATURES`: dParallel's self-generated
targets from the ``block_diffusion`` decoder, keyed by the decoder and its settings too; the greedy
answers of draft heads, :func:`collect_greedy_answers`, by ``ar`` or by the faster of ``ar`` and
``jacobi``).

1. :func:`choose_prompts` draws prompts from the configured data (a seeded shuffle, chat
   formatted as the decoders see them), keeping each synthetic prompt's task and reference answer
   for the answer checker.
2. :func:`collect_jacobi_rollouts` decodes them with greedy Jacobi decoding through the shared
   engine (KV cache, batched prompts; :func:`~leaplm.inference.decoders.jacobi.collect_jacobi_trajectories`)
   and records, per block of each answer, every Jacobi state from the initial guess to the fixed
   point. Under ``accelerate launch`` each rank decodes one contiguous slice of the prompts and
   saves it as a shard; rank 0 merges the shards into one ``datasets`` dataset.
3. :func:`load_rollouts` loads it, checks it, and optionally drops the answers that fail their
   task's checker.

The dataset lives in ``<dir>/<key>/``, where the key hashes what determines the rollouts: the model
(name and, for local weights, their files' sizes and times), tokenizer, dtype, the prompts' token
ids, block size, initial-guess strategy, token budget and seed. A rerun with the same settings
reuses the dataset; different settings collect a new one next to it. Each batch is saved as it
finishes, so a collection that is stopped part way resumes at its first undecoded batch.

Columns, one row per block of an answer: ``prompt_index``, ``prompt_ids``, ``prefix_ids`` (the
answer before the block), ``block_index``, ``states`` (token lists, the last equal to the fixed
point), ``fixed_point``, ``task`` ("" when the data has no checker) and ``correct`` (the whole
answer passes its task's checker; null without a checker).

Where we differ from the reference (CLLM ``generate_trajectory.py``): see
``inference/decoders/jacobi.py`` for the collection itself (cached, batched, first token from the previous
forward). The fixed points are the model's own greedy answers, as in the reference; with
``drop_wrong`` we additionally drop the prompts whose answer fails its checker (the reference
keeps them and instead drops answers with 10 identical tokens in a row, which we do not). The
initial guesses are random, and the random draws depend on how prompts are batched and sharded,
so a collection with another batch size or rank count gives other (equally valid) states; the
key ignores both.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import datasets
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from leaplm.config import Config, ConfigError, DataConfig
from leaplm.data.sft import IGNORE_INDEX, load_source, prompt_ids, to_messages
from leaplm.data.tasks import TASKS, get_task
from leaplm.inference.decoders.jacobi import collect_jacobi_trajectories
from leaplm.inference.engine import Engine, GenerationOutput
from leaplm.models.zoo import resolve

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the collection changes what it writes: old datasets are then recollected
_TOKENS = datasets.Sequence(datasets.Value("int32"))
FEATURES = datasets.Features({
    "prompt_index": datasets.Value("int64"),
    "prompt_ids": _TOKENS,
    "prefix_ids": _TOKENS,
    "block_index": datasets.Value("int64"),
    "states": datasets.Sequence(_TOKENS),
    "fixed_point": _TOKENS,
    "task": datasets.Value("string"),
    "correct": datasets.Value("bool"),
})
# Final answers of a decoder (``collect_decoded_rollouts``), one row per prompt.
ANSWER_FEATURES = datasets.Features({
    "prompt_index": datasets.Value("int64"),
    "prompt_ids": _TOKENS,
    "answer_ids": _TOKENS,
    "task": datasets.Value("string"),
    "correct": datasets.Value("bool"),
})
SETTINGS_FILE = "settings.json"
CURRENT_FILE = "current"
# Decoders whose greedy answers are the model's greedy answers token for token (collect_greedy_answers).
GREEDY_DECODERS = ("ar", "jacobi")


class RolloutError(ValueError):
    """Rollouts that cannot be collected or used; the message says what to change."""


# ----- Prompts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutPrompt:
    ids: list[int]  # chat-formatted prompt tokens, ending with the assistant header
    task: str = ""  # synthetic task whose checker grades the answer; "" = none
    reference: str = ""  # the data's own answer, for the checker


def choose_prompts(data: DataConfig, tokenizer: PreTrainedTokenizerBase, max_prompts: int, max_new_tokens: int,
                   seed: int) -> list[RolloutPrompt]:
    """Up to ``max_prompts`` (0 = all) prompts of ``data`` in a seeded random order.

    A chat sample's prompt is its conversation before the last assistant turn. Prompts that leave
    no room for ``max_new_tokens`` within ``data.max_length`` are skipped (and counted).
    """
    ds = load_source(data, require_response=False)  # the recipe makes the answers
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    wanted = max_prompts or len(ds)
    prompts: list[RolloutPrompt] = []
    too_long = 0
    for index in order:
        if len(prompts) == wanted:
            break
        row = ds[index]
        messages = to_messages(row, data)
        reference = ""
        if messages[-1]["role"] == "assistant":
            reference = messages[-1]["content"]
            messages = messages[:-1]
        ids = prompt_ids(tokenizer, messages)
        if len(ids) + max_new_tokens > data.max_length:
            too_long += 1
            continue
        task = row.get("task") or ""
        prompts.append(RolloutPrompt(ids, task if task in TASKS else "", reference))
    if too_long:
        log.warning("rollouts: skipped %d prompts longer than data.max_length=%d minus rollout.max_new_tokens=%d",
                    too_long, data.max_length, max_new_tokens)
    if not prompts:
        raise RolloutError(
            f"no prompt of data.source {data.source!r} leaves room for rollout.max_new_tokens={max_new_tokens} "
            f"within data.max_length={data.max_length}; raise data.max_length or lower rollout.max_new_tokens"
        )
    return prompts


# ----- Settings key -------------------------------------------------------------------------


def model_fingerprint(name_or_path: str) -> dict[str, Any]:
    """What identifies a model's weights: a Hub id by name; local files by name, size and time."""
    path = Path(resolve(name_or_path))
    if not path.is_dir():
        return {"name": name_or_path}
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.is_file())
    return {"name": name_or_path, "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def rollout_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def base_settings(model_id: dict[str, Any], prompts: list[RolloutPrompt], *, max_new_tokens: int,
                  seed: int) -> dict[str, Any]:
    """What every kind of rollout depends on: format, model, prompts, token budget, seed."""
    prompt_hash = hashlib.sha256(json.dumps([p.ids for p in prompts]).encode()).hexdigest()
    return {"format": FORMAT_VERSION, "model": model_id, "prompts": len(prompts), "prompts_sha256": prompt_hash,
            "max_new_tokens": max_new_tokens, "seed": seed}


def rollout_settings(model_id: dict[str, Any], prompts: list[RolloutPrompt], *, jacobi_block_size: int,
                     max_new_tokens: int, init: str, seed: int) -> dict[str, Any]:
    return {**base_settings(model_id, prompts, max_new_tokens=max_new_tokens, seed=seed),
            "jacobi_block_size": jacobi_block_size, "init": init}


# ----- Collection ---------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bar per shard saved or loaded: the collection has its own."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


class _OneProcess:
    """The parts of an ``accelerate.Accelerator`` the collection uses, for a single process."""

    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self) -> None:
        pass


def collect_jacobi_rollouts(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[RolloutPrompt], out_dir: str | Path,
    *, model_id: dict[str, Any], jacobi_block_size: int = 16, max_new_tokens: int = 256, init: str = "prompt",
    seed: int = 0, batch_size: int = 32, accelerator: Any = None, progress: bool = True,
) -> Path:
    """Collect (or reuse) the Jacobi rollouts of ``prompts``; return the dataset directory.

    ``model_id`` names the weights in the settings key (:func:`model_fingerprint`). Every rank of
    ``accelerator`` must call this with the same arguments: rank r decodes the r-th contiguous
    slice of the prompts, rank 0 merges the slices. Also records the key as the directory's
    current rollouts (:func:`current_rollouts`).
    """
    def decode(engine: Engine, ids: list[list[int]], rank_seed: int):
        found = collect_jacobi_trajectories(engine, ids, jacobi_block_size, max_new_tokens, init=init,
                                            seed=rank_seed, batch_size=batch_size)
        answers: dict[int, list[int]] = {}
        for row in found:
            answers.setdefault(row["prompt_index"], []).extend(row["fixed_point"])
        return found, answers

    settings = rollout_settings(model_id, prompts, jacobi_block_size=jacobi_block_size,
                                max_new_tokens=max_new_tokens, init=init, seed=seed)
    return collect_rollouts(model, tokenizer, prompts, out_dir, settings=settings, features=FEATURES, decode=decode,
                            batch_size=batch_size, accelerator=accelerator, progress=progress)


def collect_decoded_rollouts(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[RolloutPrompt], out_dir: str | Path,
    *, model_id: dict[str, Any], decoder: str, decoder_settings: dict[str, Any], max_new_tokens: int = 256,
    seed: int = 0, batch_size: int = 32, accelerator: Any = None, progress: bool = True,
) -> Path:
    """Collect (or reuse) the final answers ``decoder`` writes for ``prompts`` (columns
    :data:`ANSWER_FEATURES`, one row per prompt): the self-generated targets of dParallel-style
    distillation. Sharding, reuse and the settings key as :func:`collect_jacobi_rollouts`; the
    key holds the decoder and its settings."""
    def decode(engine: Engine, ids: list[list[int]], rank_seed: int):
        torch.manual_seed(rank_seed)  # for decoders that sample; greedy ones ignore it
        answers: dict[int, list[int]] = {}
        for first in range(0, len(ids), batch_size):
            out = engine.generate(ids[first:first + batch_size], decoder, max_new_tokens, **decoder_settings)
            answers.update({first + i: seq for i, seq in enumerate(out.sequences)})
        rows = [{"prompt_index": i, "prompt_ids": ids[i], "answer_ids": answers[i]} for i in range(len(ids))]
        return rows, answers

    settings = {**base_settings(model_id, prompts, max_new_tokens=max_new_tokens, seed=seed),
                "decoder": decoder, "decoder_settings": decoder_settings}
    return collect_rollouts(model, tokenizer, prompts, out_dir, settings=settings, features=ANSWER_FEATURES,
                            decode=decode, batch_size=batch_size, accelerator=accelerator, progress=progress)


def collect_greedy_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[RolloutPrompt], out_dir: str | Path,
    *, model_id: dict[str, Any], decoder: str = "ar", pick_faster: bool = True, jacobi_block_size: int = 16,
    max_new_tokens: int = 256, seed: int = 0, batch_size: int = 32, accelerator: Any = None, progress: bool = True,
) -> Path:
    """Collect (or reuse) the model's greedy answers to ``prompts`` (columns :data:`ANSWER_FEATURES`).

    ``ar`` and greedy ``jacobi`` (blocks of ``jacobi_block_size``) write the same answers, so they are
    keyed as ``ar``'s (:func:`collect_decoded_rollouts`) whichever decodes them, and a rerun reuses
    them. ``decoder`` decodes them; with ``pick_faster`` each process decodes its first batch with both,
    keeps the faster (:func:`pick_faster_decoder`) and decodes the rest with it.
    """
    if decoder not in GREEDY_DECODERS:
        raise RolloutError(f"greedy answers are collected with {' or '.join(GREEDY_DECODERS)}, not {decoder!r}")
    settings_of = {"ar": {}, "jacobi": {"jacobi_block_size": jacobi_block_size}}
    chosen: list[str] = [] if pick_faster else [decoder]

    def decode(engine: Engine, ids: list[list[int]], rank_seed: int):
        if chosen:
            out = engine.generate(ids, chosen[0], max_new_tokens, **settings_of[chosen[0]])
        else:
            name, out = pick_faster_decoder(engine, ids, max_new_tokens, settings_of)
            chosen.append(name)
        rows = [{"prompt_index": i, "prompt_ids": ids[i], "answer_ids": seq} for i, seq in enumerate(out.sequences)]
        return rows, dict(enumerate(out.sequences))

    settings = {**base_settings(model_id, prompts, max_new_tokens=max_new_tokens, seed=seed),
                "decoder": "ar", "decoder_settings": {}}
    return collect_rollouts(model, tokenizer, prompts, out_dir, settings=settings, features=ANSWER_FEATURES,
                            decode=decode, batch_size=batch_size, accelerator=accelerator, progress=progress)


PROBE_TOKENS = 32  # new tokens each candidate writes to be timed: two Jacobi blocks of 16, a fraction of an answer


def pick_faster_decoder(engine: Engine, ids: list[list[int]], max_new_tokens: int,
                        settings_of: dict[str, dict[str, Any]]) -> tuple[str, GenerationOutput]:
    """Time each decoder of ``settings_of`` (name -> settings) on the first :data:`PROBE_TOKENS` new
    tokens of ``ids``; decode ``ids`` in full with the one of the most tokens per second, and return
    its name and output. Logs each one's tokens per forward and speed.

    Meant for decoders that write the same tokens (greedy ``ar`` and ``jacobi``), where the faster one
    is the better one. The probe is short because a slow candidate can cost several times the batch's
    real decode: on SmolLM2-135M with 2 CPU cores a batch of 32 took Jacobi over 6 minutes to
    answer in full. Probe answers that differ anyway (the numerics of a multi-token forward in low
    precision) are counted in a warning, and the faster decoder's are kept.
    """
    probe = min(max_new_tokens, PROBE_TOKENS)
    for name, settings in settings_of.items():  # the first forwards of a process pay for allocations
        engine.generate(ids[:1], name, 2, **settings)
    outs = {name: engine.generate(ids, name, probe, **settings) for name, settings in settings_of.items()}
    best = max(outs, key=lambda name: outs[name].stats.tokens_per_s)
    runner_up = max((name for name in outs if name != best), key=lambda name: outs[name].stats.tokens_per_s)
    measured = "; ".join(f"{name} {out.stats.tokens_per_forward:.2f} tokens/forward, {out.stats.tokens_per_s:.0f} "
                         "tokens/s" for name, out in outs.items())
    log.info("rollouts: the first batch's first %d tokens of %d prompts, decoded both ways: %s; collecting with %s, "
             "%.2fx the tokens/s of %s (the answers are the same either way)", probe, len(ids), measured, best,
             outs[best].stats.tokens_per_s / max(outs[runner_up].stats.tokens_per_s, 1e-9), runner_up)
    differ = sum(a != b for a, b in zip(outs[best].sequences, outs[runner_up].sequences))
    if differ:
        log.warning("rollouts: %d of %d probe answers differ between %s and %s (the numerics of their "
                    "forwards); keeping %s's", differ, len(ids), best, runner_up, best)
    if probe == max_new_tokens:
        return best, outs[best]
    return best, engine.generate(ids, best, max_new_tokens, **settings_of[best])


# (engine, prompt ids of a part, seed) -> (rows with a part-local ``prompt_index``, answer tokens per prompt)
Decode = Callable[[Engine, list[list[int]], int], tuple[list[dict[str, Any]], dict[int, list[int]]]]


def collect_rollouts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[RolloutPrompt],
                     out_dir: str | Path, *, settings: dict[str, Any], features: datasets.Features, decode: Decode,
                     batch_size: int, accelerator: Any = None, progress: bool = True) -> Path:
    """Decode ``prompts`` with ``decode`` into a dataset of ``features`` keyed by ``settings`` (or
    reuse it), sharded over the ranks of ``accelerator``; return the dataset directory."""
    if not prompts:
        raise RolloutError("no prompts to roll out; check the data section (data.source, data.tasks)")
    acc = accelerator or _OneProcess()
    out_dir = Path(out_dir)
    key = rollout_key(settings)
    final = out_dir / key
    with _quiet_datasets():
        _collect_or_reuse(model, tokenizer, prompts, out_dir, key, settings, features=features, decode=decode,
                          batch_size=batch_size, acc=acc, progress=progress)
    if acc.is_main_process:
        (out_dir / CURRENT_FILE).write_text(key + "\n")
    acc.wait_for_everyone()
    return final


def _collect_or_reuse(model, tokenizer, prompts: list[RolloutPrompt], out_dir: Path, key: str,
                      settings: dict[str, Any], *, features: datasets.Features, decode: Decode, batch_size: int,
                      acc: Any, progress: bool) -> None:
    final = out_dir / key
    if (final / SETTINGS_FILE).is_file():
        log.info("rollouts: reusing %s (same model, prompts and settings)", final)
        return
    shards = out_dir / f"{key}.shards"
    rank, world = acc.process_index, acc.num_processes
    lo, hi = rank * len(prompts) // world, (rank + 1) * len(prompts) // world
    if acc.is_main_process:
        shown = {k: v for k, v in settings.items() if k not in ("format", "model", "prompts", "prompts_sha256")}
        log.info("rollouts: decoding %d prompts (%d per process on %d), batches of %d, settings %s -> %s",
                 len(prompts), hi - lo, world, batch_size, shown, final)
    start = time.perf_counter()
    rows = _collect_slice(Engine(model, tokenizer), prompts, lo, hi, decode=decode, seed=settings["seed"] + rank,
                          batch_size=batch_size, progress=progress and acc.is_main_process,
                          done=_BatchStore(shards / "batches", features))
    # datasets can save a dataset of no rows but not load it back: a rank without prompts saves nothing.
    if rows:
        shard = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)
        shard.save_to_disk(str(shards / f"rank-{rank:05d}"))
    acc.wait_for_everyone()
    if acc.is_main_process:
        saved = [shards / f"rank-{r:05d}" for r in range(world) if (shards / f"rank-{r:05d}").is_dir()]
        merged = datasets.concatenate_datasets([datasets.load_from_disk(str(path)) for path in saved])
        tmp = out_dir / f"{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        merged.save_to_disk(str(tmp))
        seconds = time.perf_counter() - start
        stats = {"rows": len(merged), "ranks": world, "batch_size": batch_size, "collect_s": round(seconds, 2),
                 "trajectories_per_s": round(len(merged) / seconds, 3)}
        (tmp / SETTINGS_FILE).write_text(json.dumps({**settings, "stats": stats}, indent=2))
        tmp.rename(final)
        shutil.rmtree(shards, ignore_errors=True)
        log.info("rollouts: %d rows of %d prompts in %.0fs (%.1f rows/s) -> %s",
                 len(merged), len(prompts), seconds, len(merged) / seconds, final)


class _BatchStore:
    """Each decoded batch's rows, saved as soon as the batch is done, so that a collection stopped
    part way (preempted, killed, out of time) resumes at its first undecoded batch instead of
    decoding everything again. A batch is named by its prompts and its seed: a rerun that batches
    or shards the prompts differently decodes anew rather than mixing in rows of other batches."""

    def __init__(self, root: Path, features: datasets.Features):
        self.root, self.features = root, features

    def _path(self, index: list[int], seed: int) -> Path:
        name = hashlib.sha256(json.dumps([index, seed]).encode()).hexdigest()[:16]
        return self.root / f"batch-{index[0]:06d}-{name}"

    def load(self, index: list[int], seed: int) -> list[dict[str, Any]] | None:
        path = self._path(index, seed)
        return datasets.load_from_disk(str(path)).to_list() if path.is_dir() else None

    def save(self, index: list[int], seed: int, rows: list[dict[str, Any]]) -> None:
        path = self._path(index, seed)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        columns = {k: [r[k] for r in rows] for k in self.features}
        datasets.Dataset.from_dict(columns, features=self.features).save_to_disk(str(tmp))
        tmp.rename(path)  # whole or absent: a batch interrupted while saving is decoded again


def _collect_slice(engine: Engine, prompts: list[RolloutPrompt], lo: int, hi: int, *, decode: Decode, seed: int,
                   batch_size: int, progress: bool, done: _BatchStore | None = None) -> list[dict[str, Any]]:
    """Rows of prompts[lo:hi] in prompt order, ``prompt_index`` global, each with its answer's task and grade.

    Batches group prompts of similar length (a batch is padded to its longest prompt, and on a real
    model the padded prefill dominates: SmolLM2's standard-library prompts run from 75 to 500 tokens).
    Decoded one batch at a time, so the bar (and its ETA) moves from the first batch on; each batch
    draws from ``seed`` plus its position in the slice, the same whatever the progress display.
    Batches already in ``done`` (from an interrupted collection of the same settings) are read back.
    """
    order = sorted(range(lo, hi), key=lambda i: (len(prompts[i].ids), i))
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=hi - lo, desc="rollouts", unit="prompt", disable=not progress)
    resumed = 0
    for first in range(0, hi - lo, batch_size):
        index = order[first:first + batch_size]  # global prompt index of each row of the batch
        batch_seed = seed + lo + first
        kept = done.load(index, batch_seed) if done else None
        if kept is None:
            part = [prompts[i] for i in index]
            found, answers = decode(engine, [p.ids for p in part], batch_seed)
            grades = {i: _grade(engine.tokenizer, part[i], answer) for i, answer in answers.items()}
            kept = [{**row, "prompt_index": index[row["prompt_index"]], "task": part[row["prompt_index"]].task,
                     "correct": grades[row["prompt_index"]]} for row in found]
            if done:
                done.save(index, batch_seed, kept)
        else:
            resumed += len(index)
        rows.extend(kept)
        bar.update(len(index))
    bar.close()
    if resumed:
        log.info("rollouts: %d of %d prompts read back from an interrupted collection (%s)", resumed, hi - lo,
                 done.root)
    return sorted(rows, key=lambda row: row["prompt_index"])  # stable: a prompt's rows keep their order


def _grade(tokenizer: PreTrainedTokenizerBase, prompt: RolloutPrompt, answer: list[int]) -> bool | None:
    if not prompt.task:
        return None
    return get_task(prompt.task).check(tokenizer.decode(answer, skip_special_tokens=True), prompt.reference)


# ----- Loading ------------------------------------------------------------------------------


def current_rollouts(out_dir: str | Path) -> Path:
    """The dataset directory the last :func:`collect_jacobi_rollouts` into ``out_dir`` made or reused."""
    pointer = Path(out_dir) / CURRENT_FILE
    if not pointer.is_file():
        raise RolloutError(f"no rollouts in {out_dir}: the recipe's rollout step writes them before training")
    return Path(out_dir) / pointer.read_text().strip()


def load_rollouts(path: str | Path, drop_wrong: bool = False,
                  features: datasets.Features | None = None) -> datasets.Dataset:
    """Load a rollout dataset, check it has the columns of ``features`` (None: those of its kind, decoded
    answers or Jacobi trajectories), and with ``drop_wrong`` drop the rows of answers that fail their
    checker (answers without a checker stay)."""
    path = Path(path)
    if not (path / "dataset_info.json").is_file():
        raise RolloutError(f"{path} is not a saved rollout dataset (no dataset_info.json); collect rollouts first")
    ds = datasets.load_from_disk(str(path))
    if features is None:
        features = ANSWER_FEATURES if "answer_ids" in ds.column_names else FEATURES
    missing = [c for c in features if c not in ds.column_names]
    if missing:
        raise RolloutError(f"rollout dataset {path} lacks columns {missing}; it has {ds.column_names}. "
                           "Collect it again (rerun the recipe's rollout step)")
    if drop_wrong:
        with _quiet_datasets():
            kept = ds.filter(lambda correct: correct is not False, input_columns="correct")
        wrong = len({i for i, c in zip(ds["prompt_index"], ds["correct"]) if c is False})
        if wrong:
            log.warning("rollouts: dropped the %d rows of %d answers that fail their task's checker",
                        len(ds) - len(kept), wrong)
        if len(kept) == 0:
            raise RolloutError(f"every rollout answer in {path} fails its task's checker; the model does not solve "
                               "these prompts. Set rollout.drop_wrong=false to train on its answers anyway")
        ds = kept
    return ds


def answer_samples(ds: datasets.Dataset) -> list[dict[str, list[int]]]:
    """One sample per answered prompt: ``prompt_ids`` and ``answer_ids`` (the model's whole answer, a
    Jacobi trajectory's blocks joined), in prompt order."""
    if "answer_ids" in ds.column_names:
        rows = sorted(zip(ds["prompt_index"], ds["prompt_ids"], ds["answer_ids"]))
        return [{"prompt_ids": prompt, "answer_ids": answer} for _, prompt, answer in rows]
    answers: dict[int, tuple[list[int], list[int]]] = {}
    for index, prompt, block in zip(ds["prompt_index"], ds["prompt_ids"], ds["fixed_point"]):
        answers.setdefault(index, (prompt, []))[1].extend(block)  # a prompt's blocks are stored in order
    return [{"prompt_ids": prompt, "answer_ids": answer} for _, (prompt, answer) in sorted(answers.items())]


def answer_dataset(cfg: Config) -> list[dict[str, list[int]]]:
    """The run's current greedy answers as training samples, one per answered prompt: prompt +
    answer, labels on the answer (the rest ``IGNORE_INDEX``), and its ``index`` in this list
    (where offline training finds its cached hidden states)."""
    samples = answer_samples(load_rollouts(current_rollouts(rollouts_dir(cfg)), cfg.rollout.drop_wrong))
    return [{"input_ids": s["prompt_ids"] + s["answer_ids"],
             "labels": [IGNORE_INDEX] * len(s["prompt_ids"]) + s["answer_ids"], "index": i}
            for i, s in enumerate(samples)]


# ----- The rollout step of a run -------------------------------------------------------------
# Shared by the recipes that train on the model's own outputs: Jacobi trajectories (CLLM, Jacobi
# Forcing, draft heads) or a decoder's final answers (dParallel, Learn2PD): the rules that tie their
# `method` to the shared config sections, and the step that collects (or reuses) the rollouts
# into ``OUTPUT_DIR/rollouts``.


def check_rollout_sections(cfg: Config, recipe: str, jacobi_block_size: int,
                           decoder: str | tuple[str, ...] = "jacobi") -> None:
    """Refuse shared-section settings a rollout recipe cannot use, naming the fix. ``decoder``: the
    rollout decoder the recipe takes (or those it takes, e.g. :data:`GREEDY_DECODERS`)."""
    r = cfg.rollout
    allowed = (decoder,) if isinstance(decoder, str) else decoder
    if r.decoder not in allowed:
        raise ConfigError(f"{recipe} collects {' or '.join(allowed)} rollouts: set rollout.decoder={allowed[0]} "
                          f"(got {r.decoder!r})")
    if r.decoder in GREEDY_DECODERS and r.decoder_settings:
        source = "its Jacobi rollouts from `method`" if r.decoder == "jacobi" else "greedy rollouts"
        raise ConfigError(f"{recipe} sets {source}: remove rollout.decoder_settings {r.decoder_settings}")
    if r.temperature != 0:
        raise ConfigError(f"{recipe} needs greedy rollouts (its targets are the model's own greedy answers): "
                          "set rollout.temperature=0")
    if r.max_new_tokens < jacobi_block_size:
        raise ConfigError(f"rollout.max_new_tokens={r.max_new_tokens} is shorter than one Jacobi block "
                          f"of the rollouts ({jacobi_block_size} tokens)")
    if r.max_new_tokens >= cfg.data.max_length:
        raise ConfigError(f"rollout.max_new_tokens={r.max_new_tokens} leaves no room for a prompt within "
                          f"data.max_length={cfg.data.max_length}")
    if cfg.model.init is not None:
        raise ConfigError(f"{recipe} distills an existing model: set model.name_or_path and remove model.init")
    if cfg.data.packing or cfg.train.group_by_length:
        raise ConfigError(f"{recipe} trains on rollout blocks: data.packing and train.group_by_length do not apply; "
                          "set both to false")


def rollouts_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / "rollouts"


def _prompts_and_model(cfg: Config, model, tokenizer, accelerator,
                       model_name: str | None = None) -> tuple[list[RolloutPrompt], dict]:
    prompts = choose_prompts(cfg.data, tokenizer, cfg.rollout.max_prompts, cfg.rollout.max_new_tokens, cfg.seed)
    model.to(accelerator.device)
    model_id = {**model_fingerprint(model_name or cfg.model.name_or_path), "tokenizer": cfg.model.tokenizer,
                "dtype": cfg.model.dtype}
    return prompts, model_id


def collect_run_trajectories(cfg: Config, model, tokenizer, accelerator, *, jacobi_block_size: int, init: str,
                             model_name: str | None = None) -> Path:
    """Collect (or reuse) the model's Jacobi rollouts on the accelerator's device, one slice per rank.

    ``model_name`` names ``model`` when it is not ``cfg.model`` (e.g. a target answering for a draft).
    """
    prompts, model_id = _prompts_and_model(cfg, model, tokenizer, accelerator, model_name)
    return collect_jacobi_rollouts(model, tokenizer, prompts, rollouts_dir(cfg), model_id=model_id,
                                   jacobi_block_size=jacobi_block_size, max_new_tokens=cfg.rollout.max_new_tokens,
                                   init=init, seed=cfg.seed, batch_size=cfg.rollout.batch_size, accelerator=accelerator,
                                   progress=cfg.logging.progress_bar)


def collect_run_greedy_answers(cfg: Config, model, tokenizer, accelerator, *, jacobi_block_size: int,
                               model_name: str | None = None) -> Path:
    """Collect (or reuse) the model's greedy answers with ``rollout.decoder`` (``ar`` or ``jacobi`` in blocks of
    ``jacobi_block_size``), or under ``rollout.pick_faster`` the faster of the two.

    ``model_name`` names ``model`` when it is not ``cfg.model`` (e.g. a target answering for a draft)."""
    prompts, model_id = _prompts_and_model(cfg, model, tokenizer, accelerator, model_name)
    return collect_greedy_answers(model, tokenizer, prompts, rollouts_dir(cfg), model_id=model_id,
                                  decoder=cfg.rollout.decoder, pick_faster=cfg.rollout.pick_faster,
                                  jacobi_block_size=jacobi_block_size, max_new_tokens=cfg.rollout.max_new_tokens,
                                  seed=cfg.seed, batch_size=cfg.rollout.batch_size, accelerator=accelerator,
                                  progress=cfg.logging.progress_bar)


def collect_answers(cfg: Config, model, tokenizer, accelerator) -> Path:
    """Collect (or reuse) the final answers of ``rollout.decoder`` with ``rollout.decoder_settings``."""
    prompts, model_id = _prompts_and_model(cfg, model, tokenizer, accelerator)
    return collect_decoded_rollouts(model, tokenizer, prompts, rollouts_dir(cfg), model_id=model_id,
                                    decoder=cfg.rollout.decoder, decoder_settings=cfg.rollout.decoder_settings,
                                    max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed,
                                    batch_size=cfg.rollout.batch_size, accelerator=accelerator,
                                    progress=cfg.logging.progress_bar)
