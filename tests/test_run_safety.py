"""What a run refuses or reports instead of silently doing the wrong thing: reusing an output_dir,
changing settings on resume, damaged or non-finite checkpoints, replayed metrics, early SIGTERM."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from test_trainer import REPO, TEACHER_CONFIG, TINY, tiny_config

from leaplm.config import ConfigError
from leaplm.ship import checkpoint as ckpt
from leaplm.train.trainer import SetupInterrupted, Trainer, TrainingDiverged, train


def _snapshot(run):
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_new_run_into_an_earlier_runs_output_dir_is_refused_before_writing(tmp_path):
    train(tiny_config(tmp_path, "train.max_steps=2"))
    before = _snapshot(tmp_path)
    with pytest.raises(ConfigError, match="holds an earlier run") as refused:
        train(tiny_config(tmp_path, "train.max_steps=1", "train.lr=1e-4"))
    assert "train.resume_from=latest" in str(refused.value) and "train.overwrite=true" in str(refused.value)
    assert _snapshot(tmp_path) == before  # not even config.yaml was rewritten

    train(tiny_config(tmp_path, "train.max_steps=1", "train.lr=1e-4", "train.overwrite=true"))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000001"]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["lr"] == 1e-4

    # A directory with only the config of a run stopped during setup holds nothing to mix with.
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "config.yaml").write_text("recipe: pretrain\n")
    assert train(tiny_config(stopped, "train.max_steps=1")).steps == 1

    with pytest.raises(ConfigError, match="set only one of them"):
        tiny_config(tmp_path, "train.overwrite=true", "train.resume_from=latest")


def test_every_rank_refuses_an_earlier_run_before_any_writes(tmp_path):
    """Two gloo ranks: both decide before the main process writes config.yaml, and both stop."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 6.2}\n')
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "launch" / "accelerate" / "cpu.yaml"), "-m", "leaplm.train", str(TEACHER_CONFIG), *TINY,
           "train.max_steps=1", "train.micro_batch_size=4", f"output_dir={tmp_path}"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("holds an earlier run (metrics.jsonl)") == 2, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_settings_that_resume_cannot_apply_are_refused_with_each_change(tmp_path):
    train(tiny_config(tmp_path, "train.max_steps=2"))
    config = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError) as refused:
        train(tiny_config(tmp_path, "train.max_steps=3", "train.lr=1e-6", "train.resume_from=latest"))
    message = str(refused.value)
    assert "train.lr: 0.001 -> 1e-06" in message and "train.max_steps: 2 -> 3" in message  # cosine decays over it
    assert "may change on resume: output_dir, train.resume_from" in message
    assert (tmp_path / "config.yaml").read_text() == config

    # Where and how often it logs and saves may change; what is recorded is what ran.
    resumed = train(tiny_config(tmp_path, "train.max_steps=2", "train.log_every=1", "train.keep_last=1",
                                "train.resume_from=latest"))
    assert resumed.steps == 2
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["keep_last"] == 1


def test_max_steps_may_grow_on_resume_under_a_constant_schedule(tmp_path):
    train(tiny_config(tmp_path, "train.max_steps=2", "train.lr_schedule=constant"))
    resumed = train(tiny_config(tmp_path, "train.max_steps=3", "train.lr_schedule=constant", "train.log_every=1",
                                "train.resume_from=latest"))
    assert len(resumed.losses) == 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["lr"] == pytest.approx(1e-3)
    assert ckpt.validate(ckpt.list_checkpoints(tmp_path)[-1])["step"] == 3


def test_same_size_corruption_is_caught_by_the_recorded_checksums(tmp_path):
    train(tiny_config(tmp_path, "train.max_steps=2"))
    found = ckpt.list_checkpoints(tmp_path)[-1]
    files = json.loads((found / ckpt.STATE_FILE).read_text())["files"]
    assert "model/model.safetensors" in files
    assert all(len(record["sha256"]) == 64 and record["bytes"] > 0 for record in files.values())

    weights = found / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    start = len(data) // 4  # past the safetensors header: the file still parses, its tensors are wrong
    data[start:start + min(1 << 20, len(data) // 2)] = bytes(min(1 << 20, len(data) // 2))
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="model/model.safetensors does not match the sha256"):
        ckpt.validate(found)
    with pytest.raises(ckpt.CheckpointError, match="does not match the sha256"):
        train(tiny_config(tmp_path, "train.max_steps=2", "train.resume_from=latest"))


def test_checkpoints_written_before_checksums_are_still_checked_by_size(tmp_path):
    train(tiny_config(tmp_path, "train.max_steps=1"))
    found = ckpt.list_checkpoints(tmp_path)[-1]
    state = json.loads((found / ckpt.STATE_FILE).read_text())
    state["files"] = {name: record["bytes"] for name, record in state["files"].items()}
    (found / ckpt.STATE_FILE).write_text(json.dumps(state))
    assert ckpt.validate(found)["step"] == 1
    (found / "config.yaml").write_text("")
    with pytest.raises(ckpt.CheckpointError, match="corrupt: config.yaml has 0 bytes"):
        ckpt.validate(found)


def test_non_finite_weights_or_optimizer_state_are_never_checkpointed(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=1"))
    trainer.fit()
    good = ckpt.list_checkpoints(tmp_path)[-1]
    param = next(p for p in trainer.model.parameters() if p.requires_grad)
    moment = trainer.optimizer.state[param]["exp_avg"]
    for tensor in (param, moment):
        kept = tensor.detach().clone()
        with torch.no_grad():
            tensor.view(-1)[0] = float("inf")
        with pytest.raises(TrainingDiverged, match="not finite after step 2") as refused:
            trainer.save_checkpoint(2)
        assert str(good) in str(refused.value)
        assert ckpt.list_checkpoints(tmp_path) == [good] and not list(ckpt.checkpoint_root(tmp_path).glob(".tmp-*"))
        with torch.no_grad():
            tensor.copy_(kept)
    assert ckpt.validate(trainer.save_checkpoint(2))["step"] == 2


def test_divergence_points_at_the_last_checkpoint_written_before_it(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=6", "train.save_every=1", "train.keep_last=5"))
    recipe_loss = trainer.recipe.loss

    def nan_at_step_4(model, batch, cfg):
        loss, metrics = recipe_loss(model, batch, cfg)
        return loss * float("nan") if batch["step"] == 3 else loss, metrics

    trainer.recipe = dataclasses.replace(trainer.recipe, loss=nan_at_step_4)
    with pytest.raises(TrainingDiverged, match="not finite at step 4") as diverged:
        trainer.fit()
    message = str(diverged.value)
    # The step-3 checkpoint holds the weights that gave the non-finite loss: step 2 is the last good one.
    assert f"{ckpt.checkpoint_root(tmp_path) / 'step-000002'} (its weights" in message
    assert "diverges again" in message and "resume_from=latest" not in message


def test_resume_without_a_checkpoint_drops_the_rows_of_the_stopped_attempt(tmp_path):
    train(tiny_config(tmp_path, "train.max_steps=2", "train.log_every=1"))
    metrics = tmp_path / "metrics.jsonl"
    rows = metrics.read_text().splitlines()
    metrics.write_text("\n".join(rows) + '\n{"step": 3, "lo')  # the torn row of a killed write
    (ckpt.checkpoint_root(tmp_path) / "step-000002").rename(tmp_path / "lost")
    train(tiny_config(tmp_path, "train.max_steps=2", "train.log_every=1", "train.resume_from=latest"))
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]


def test_sigterm_during_setup_exits_with_a_message_and_nothing_written(tmp_path, caplog):
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=3"))
    build_dataset = trainer.recipe.build_dataset

    def terminated_while_building(cfg, tokenizer):  # e.g. during a long rollout
        os.kill(os.getpid(), signal.SIGTERM)
        return build_dataset(cfg, tokenizer)

    trainer.recipe = dataclasses.replace(trainer.recipe, build_dataset=terminated_while_building)
    seen = []

    def outside_fit(signum, frame):  # stands in for the default kill, which would end pytest
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, outside_fit)
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(SetupInterrupted) as stopped:
            trainer.fit()
        assert signal.getsignal(signal.SIGTERM) is outside_fit  # fit put the handler it found back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert isinstance(stopped.value, SystemExit) and stopped.value.code == 128 + signal.SIGTERM and not seen
    assert "SIGTERM during setup: nothing trained yet, no checkpoint written" in caplog.text
    assert not ckpt.list_checkpoints(tmp_path) and not (tmp_path / "metrics.jsonl").exists()
