"""Atomic checkpoints: write into a temporary directory, then rename; keep the last K.

Layout of ``OUTPUT_DIR/checkpoints/step-000100/``:
  state/               accelerate.save_state: model, optimizer, scheduler, per-rank RNG
  model/               HF layout (safetensors + config + tokenizer), loadable by transformers
  base.json            a run that keeps part of the model frozen (draft heads on a frozen base, LoRA,
                       separate noisy weights): the frozen base's record (:func:`base_record`)
  config.yaml          the resolved config of the run
  trainer_state.json   step, consumed samples and the size and sha256 of every file above;
                       written last, its presence marks completion

A run with frozen weights saves only what trains, in ``state/`` and in ``model/``: there
``trained.safetensors`` (the trained parameters and their modules' buffers, e.g. draft heads and
their accuracies) beside the tokenizer, or a LoRA adapter. The frozen weights are rebuilt from
``model.name_or_path`` on resume and export, and must hash to the sha256 in ``base.json``
(:func:`check_base`); the export still writes the whole model.

A crash (SIGKILL, node loss) while writing leaves only ``.tmp-step-N/``, which is never listed,
so ``resume_from=latest`` takes the previous checkpoint. A checkpoint damaged afterwards (a file
truncated or deleted by a full disk or a partial copy, or bytes overwritten in place) no longer
matches its recorded sizes and checksums, and :func:`validate` names the file instead of letting
a load fail deep inside torch, or succeed on damaged weights.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
BASE_FILE = "base.json"
TRAINED_FILE = "trained.safetensors"


class CheckpointError(RuntimeError):
    pass


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary directories are never listed)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks so a multi-GB shard never sits in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_records(path: Path) -> dict[str, dict]:
    """``{"bytes", "sha256"}`` of every file under ``path``, keyed by its relative POSIX path."""
    return {f.relative_to(path).as_posix(): {"bytes": f.stat().st_size, "sha256": sha256(f)}
            for f in sorted(path.rglob("*")) if f.is_file()}


def validate(path: str | Path) -> dict:
    """Return the trainer state of a complete, undamaged checkpoint, or raise naming the problem.

    Every file recorded at save time must be there with its size and sha256; the size is compared
    first, so a truncated file is named without being read. Checkpoints written before checksums
    were recorded (their record is a bare size) are checked by size only.
    """
    path = Path(path)
    fix = "Delete it, or resume from an earlier one with train.resume_from=<dir>."
    state_file = path / STATE_FILE
    if not state_file.is_file() or not (path / "state").is_dir():
        raise CheckpointError(
            f"checkpoint {path} is incomplete (no {STATE_FILE} or state/); it was not written to the end. {fix}"
        )
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {path} has a corrupt {STATE_FILE}: {err}. {fix}") from err
    for name, record in state.get("files", {}).items():
        record = record if isinstance(record, dict) else {"bytes": record}
        found = path / name
        if not found.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}, which it was written with. {fix}")
        if found.stat().st_size != record["bytes"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} has {found.stat().st_size} bytes, "
                                  f"it was written with {record['bytes']}. {fix}")
        if "sha256" in record and sha256(found) != record["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match the sha256 it was "
                                  f"written with (same size, different bytes). {fix}")
    return state


def resolve_resume(output_dir: str | Path, resume_from: str) -> Path | None:
    """``"latest"`` -> newest finished checkpoint (None if there is none); else the given path."""
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not path.is_dir():
        raise CheckpointError(f"train.resume_from={resume_from!r} is not a directory")
    return path


def temporary_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f".tmp-{step_dir_name(step)}"


def finalize(output_dir: str | Path, step: int, trainer_state: dict, keep_last: int) -> Path:
    """Record the files' sizes and checksums, mark the temporary checkpoint complete, rename it into place,
    prune old ones."""
    tmp = temporary_dir(output_dir, step)
    (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "files": file_records(tmp)}, indent=2))
    final = checkpoint_root(output_dir) / step_dir_name(step)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)  # atomic on one filesystem: a crash leaves either the old set or the new one
    for old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ----- Checkpoints of the trained parts -------------------------------------------------------


def trained_keys(model: torch.nn.Module) -> set[str]:
    """The state-dict keys of ``model`` that train: parameters with ``requires_grad``, and the
    buffers of modules whose parameters all train (e.g. the draft heads' running accuracies)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    keys = {name for name, p in params.items() if p.requires_grad}
    for name, _ in model.named_buffers(remove_duplicate=False):
        owner = name.rpartition(".")[0]
        owned = [p for n, p in params.items() if n.startswith(f"{owner}.")] if owner else list(params.values())
        if owned and all(p.requires_grad for p in owned):
            keys.add(name)
    return keys


def frozen_keys(model: torch.nn.Module) -> list[str]:
    """The state-dict keys of ``model`` that do not train (sorted); empty when everything trains."""
    return sorted(set(model.state_dict()) - trained_keys(model))


def tensors_sha256(model: torch.nn.Module, keys: list[str]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``model``'s state-dict entries ``keys``."""
    state = model.state_dict()
    digest = hashlib.sha256()
    for key in keys:
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{list(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def base_record(model: torch.nn.Module, name_or_path: str, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint of the trained parts records about the frozen rest of ``model``: where it was
    loaded from, that model's ``fingerprint`` (files, sizes, times), the frozen keys and their sha256."""
    frozen = frozen_keys(model)
    return {"name_or_path": name_or_path, "fingerprint": fingerprint, "frozen": frozen,
            "frozen_sha256": tensors_sha256(model, frozen)}


def check_base(model: torch.nn.Module, record: dict[str, Any], checkpoint: Path) -> None:
    """Raise unless the frozen weights of ``model`` (rebuilt from ``record["name_or_path"]``) are
    those ``checkpoint`` was trained on."""
    name = record["name_or_path"]
    missing = [key for key in record["frozen"] if key not in model.state_dict()]
    if missing or tensors_sha256(model, record["frozen"]) != record["frozen_sha256"]:
        what = f"lacks {missing[0]}" if missing else "has other weights than the one it was trained on"
        raise CheckpointError(
            f"checkpoint {checkpoint} holds only the trained parts of its run, over the frozen base {name!r}; the "
            f"base loaded from {name!r} now {what} (recorded: {record['fingerprint']}). Restore that base under "
            "model.name_or_path, or resume or export from another run's checkpoint."
        )
