"""Atomic checkpoints: write into a temporary directory, then rename; keep the last K.

Layout of ``OUTPUT_DIR/checkpoints/step-000100/``:
  state/               accelerate.save_state: model, optimizer, scheduler, per-rank RNG
  model/               HF layout (safetensors + config + tokenizer), loadable by transformers
  config.yaml          the resolved config of the run
  trainer_state.json   step, consumed samples and the size and sha256 of every file above;
                       written last, its presence marks completion

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

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


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
