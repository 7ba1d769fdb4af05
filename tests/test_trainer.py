"""The shared trainer: golden losses, topology invariance, resume, DDP, divergence."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from leaplm.ship import checkpoint as ckpt
from leaplm.train.recipes import get_recipe, load_config
from leaplm.train.trainer import StepSampler, Trainer, TrainingDiverged, train

REPO = Path(__file__).resolve().parents[1]
TEACHER_CONFIG = REPO / "configs" / "pretrain" / "tiny_teacher.yaml"

# A 1-layer, 32-wide Llama on 96 synthetic samples: the real recipe, config file and CLI
# overrides, shrunk until a step takes milliseconds.
TINY = [
    "model.tokenizer=tiny-teacher",
    "model.init.hidden_size=32",
    "model.init.intermediate_size=64",
    "model.init.num_hidden_layers=1",
    "model.init.num_attention_heads=2",
    "model.init.num_key_value_heads=1",
    "data.train_per_task=16",
    "train.lr=1e-3",
    "train.warmup_steps=0",
    "train.save_every=0",
    "eval.at_end=false",
    "export.dir=null",
    "logging.wandb=false",
    "logging.progress_bar=false",
]

# First three losses of the tiny run (seed 0, effective batch 8, the embedded teacher's tokenizer:
# retraining the teacher re-pins them). Pinned so that a change to data order, masking, loss
# normalisation or initialisation shows up as a failure.
GOLDEN = [6.218578, 6.197828, 6.156044]


def tiny_config(tmp_path: Path, *extra: str):
    return load_config(TEACHER_CONFIG, [*TINY, f"output_dir={tmp_path}", *extra])


def test_step_sampler_covers_each_epoch_once_and_splits_steps_identically():
    full = StepSampler(20, micro_batch=4, grad_accum=1, world=1, rank=0, seed=3)
    split = [StepSampler(20, micro_batch=2, grad_accum=1, world=2, rank=r, seed=3) for r in range(2)]
    epoch = [i for step in range(5) for mb in full.micro_batches(step) for i in mb]
    assert sorted(epoch) == list(range(20))
    for step in range(7):  # crosses an epoch boundary
        merged = sorted(i for s in split for mb in s.micro_batches(step) for i in mb)
        assert merged == sorted(full.micro_batches(step)[0])


def test_step_sampler_groups_by_length_within_a_window():
    lengths = [i % 10 for i in range(64)]
    sampler = StepSampler(64, micro_batch=4, grad_accum=1, world=1, rank=0, seed=0, lengths=lengths, group_window=4)
    first_window = [lengths[i] for step in range(4) for i in sampler.micro_batches(step)[0]]
    assert first_window == sorted(first_window, reverse=True)


@pytest.mark.parametrize("micro,accum", [(8, 1), (4, 2), (2, 4)])
def test_golden_losses_equal_across_microbatch_and_accumulation(tmp_path, micro, accum):
    cfg = tiny_config(tmp_path, "train.max_steps=3", f"train.micro_batch_size={micro}", f"train.grad_accum={accum}")
    losses = train(cfg).losses
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(GOLDEN), rtol=1e-5, atol=1e-5)


def test_every_trainable_parameter_changes_and_loss_falls(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=25", "train.micro_batch_size=8", "train.lr=3e-3"))
    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    result = trainer.fit()
    after = dict(trainer.model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, f"parameters not updated: {unchanged}"
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 0.5


def test_lora_trains_only_the_adapter(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=2", "model.lora.r=4"))
    trainer.setup()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == {n for n in trainable if "lora_B" in n or "lora_A" in n}


# LoRA: its checkpoints hold the adapter alone, over the frozen base rebuilt on resume
@pytest.mark.parametrize("extra", [[], ["model.lora.r=4", "model.lora.alpha=64"]], ids=["full", "lora"])
def test_resume_continues_the_same_loss_curve(tmp_path, extra):
    full = train(tiny_config(tmp_path / "full", "train.max_steps=6", *extra)).losses
    run = tmp_path / "interrupted"
    train(tiny_config(run, "train.max_steps=6", "train.save_every=3", "train.keep_last=5", *extra))
    assert (ckpt.list_checkpoints(run)[0] / ckpt.BASE_FILE).is_file() == bool(extra)
    # Simulate a crash after step 3: the step-6 checkpoint never got written.
    (ckpt.checkpoint_root(run) / ckpt.step_dir_name(6)).rename(run / "lost")
    resumed = train(tiny_config(run, "train.max_steps=6", "train.resume_from=latest", *extra))
    assert len(resumed.losses) == 3
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full[3:]), rtol=1e-6, atol=1e-6)
    # The interrupted run's rows for the replayed steps 4-6 are dropped: each step is logged once.
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_frozen_base_run_checkpoints_only_what_trains_and_resumes_exactly(tmp_path):
    """Draft heads on a frozen base: the checkpoints hold the heads and a record of the base, resume
    continues the same curve on the rebuilt base, and a base changed since is refused by name."""
    from safetensors import safe_open

    from leaplm.cli import main
    from leaplm.models.zoo import EMBEDDED_TEACHER_DIR

    from conftest import RECIPE_SMOKE

    base = tmp_path / "base"
    shutil.copytree(EMBEDDED_TEACHER_DIR, base)

    def heads_config(out: Path, *extra: str):
        return load_config(REPO / "configs" / "draft_heads" / "tiny_teacher.yaml",
                           [*RECIPE_SMOKE["draft_heads"], f"model.name_or_path={base}", f"output_dir={out}",
                            "train.max_steps=4", *extra])

    full = train(heads_config(tmp_path / "full")).losses
    run = tmp_path / "interrupted"
    train(heads_config(run, "train.save_every=2", "train.keep_last=5"))
    (ckpt.checkpoint_root(run) / ckpt.step_dir_name(4)).rename(run / "lost")
    step2 = ckpt.list_checkpoints(run)[-1]
    record = json.loads((step2 / ckpt.BASE_FILE).read_text())
    assert record["name_or_path"] == str(base) and record["frozen"]
    assert sorted(p.name for p in (step2 / "model").iterdir() if p.suffix == ".safetensors") == [ckpt.TRAINED_FILE]
    for weights in (step2 / "model" / ckpt.TRAINED_FILE, step2 / "state" / "model.safetensors"):
        with safe_open(str(weights), "pt") as saved:
            assert saved.keys() and all(".draft_heads." in f".{key}" for key in saved.keys())
    resumed = train(heads_config(run, "train.resume_from=latest"))
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full[2:]), rtol=1e-6, atol=1e-6)

    # The base changes under the checkpoint: resume and export name it instead of loading other weights.
    from safetensors.torch import load_file, save_file

    weights = load_file(str(base / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ckpt.CheckpointError, match=f"frozen base '{re.escape(str(base))}'.* has other weights"):
        train(heads_config(run, "train.resume_from=latest"))
    with pytest.raises(ckpt.CheckpointError, match=f"frozen base '{re.escape(str(base))}'.* has other weights"):
        main(["export", str(run), "--out", str(tmp_path / "export")])


def test_checkpoint_is_complete_hf_loadable_and_pruned(tmp_path):
    train(tiny_config(tmp_path, "train.max_steps=4", "train.save_every=1", "train.keep_last=2"))
    found = ckpt.list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step-000003", "step-000004"]
    assert ckpt.validate(found[-1])["step"] == 4
    assert not list(ckpt.checkpoint_root(tmp_path).glob(".tmp-*"))
    assert AutoModelForCausalLM.from_pretrained(found[-1] / "model").config.hidden_size == 32
    saved = load_config(found[-1] / "config.yaml")
    assert saved.train.keep_last == 2 and saved.model.init["hidden_size"] == 32


def test_incomplete_checkpoint_is_rejected_with_a_clear_message(tmp_path):
    train(tiny_config(tmp_path, "train.max_steps=2"))
    (ckpt.checkpoint_root(tmp_path) / "step-000002" / ckpt.STATE_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        train(tiny_config(tmp_path, "train.max_steps=3", "train.resume_from=latest"))


def test_corrupt_checkpoint_files_are_named_before_loading(tmp_path):
    train(tiny_config(tmp_path, "train.max_steps=2"))
    found = ckpt.list_checkpoints(tmp_path)[-1]
    optimizer = next((found / "state").glob("optimizer*"))
    data = optimizer.read_bytes()
    optimizer.write_bytes(data[: len(data) // 2])  # a partial copy / full disk
    with pytest.raises(ckpt.CheckpointError, match=rf"corrupt: state/{optimizer.name} has {len(data) // 2} bytes"):
        train(tiny_config(tmp_path, "train.max_steps=3", "train.resume_from=latest"))
    optimizer.write_bytes(b"\0" * len(data))  # right size, wrong bytes: caught by the recorded checksum
    with pytest.raises(ckpt.CheckpointError, match=rf"corrupt: state/{optimizer.name} does not match the sha256"):
        train(tiny_config(tmp_path, "train.max_steps=3", "train.resume_from=latest"))
    (found / "model" / "config.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing model/config.json"):
        ckpt.validate(found)


def test_sigterm_saves_a_checkpoint_and_the_resumed_curve_is_unchanged(tmp_path):
    full = train(tiny_config(tmp_path / "full", "train.max_steps=6")).losses
    run = tmp_path / "preempted"
    trainer = Trainer(tiny_config(run, "train.max_steps=6"))
    recipe_loss = trainer.recipe.loss

    def preempt_in_step_3(model, batch, cfg):
        if batch["step"] == 2:  # the scheduler's signal arrives in the middle of step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return recipe_loss(model, batch, cfg)

    trainer.recipe = dataclasses.replace(trainer.recipe, loss=preempt_in_step_3)
    result = trainer.fit()
    assert result.preempted and result.steps == 3  # the step in flight finished, none after it
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-000003"]
    resumed = train(tiny_config(run, "train.max_steps=6", "train.resume_from=latest"))
    torch.testing.assert_close(torch.tensor(result.losses + resumed.losses), torch.tensor(full), rtol=1e-6, atol=1e-6)


def test_sigterm_to_the_train_command_exits_cleanly_with_a_checkpoint(tmp_path):
    cmd = [sys.executable, "-m", "leaplm.train", str(TEACHER_CONFIG), *TINY, "train.max_steps=100000",
           "train.log_every=1", f"output_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    last = ckpt.list_checkpoints(tmp_path)[-1]
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert ckpt.validate(last)["step"] == logged[-1] < 100000
    assert f"preempted: checkpoint at step {logged[-1]}" in out


# Runs a training and SIGKILLs itself while the step-4 checkpoint is being written: its state is on
# disk in the temporary directory, the marker that completes it is not.
KILLED_IN_CHECKPOINT = """
import os, signal, sys
from leaplm.train.recipes import load_config
from leaplm.ship import checkpoint as ckpt
from leaplm.train.trainer import train

finalize = ckpt.finalize

def killed_at_step_4(output_dir, step, *args, **kwargs):
    if step == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return finalize(output_dir, step, *args, **kwargs)

ckpt.finalize = killed_at_step_4
train(load_config(sys.argv[1], sys.argv[2:]))
"""


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    full = train(tiny_config(tmp_path / "full", "train.max_steps=6")).losses
    run = tmp_path / "killed"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_IN_CHECKPOINT)
    args = [*TINY, "train.max_steps=6", "train.save_every=2", "train.keep_last=5", f"output_dir={run}"]
    proc = subprocess.run([sys.executable, str(script), str(TEACHER_CONFIG), *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-000002"]
    assert (ckpt.temporary_dir(run, 4) / "state").is_dir()  # the half-written one is there, and ignored
    resumed = train(tiny_config(run, "train.max_steps=6", "train.save_every=2", "train.resume_from=latest"))
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full[2:]), rtol=1e-6, atol=1e-6)
    assert not list(ckpt.checkpoint_root(run).glob(".tmp-*"))


def test_non_finite_loss_stops_training(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=3"))

    def nan_loss(model, batch, cfg):
        loss, metrics = trainer_loss(model, batch, cfg)
        return loss * float("nan"), metrics

    trainer_loss = trainer.recipe.loss
    trainer.recipe = dataclasses.replace(trainer.recipe, loss=nan_loss)
    with pytest.raises(TrainingDiverged, match="step 1"):
        trainer.fit()


def test_two_process_ddp_matches_one_process(tmp_path):
    """`accelerate launch` with the cpu config: 2 gloo ranks see half the batch each, and the
    loss curve equals a single process with the same effective batch."""
    args = [*TINY, "train.max_steps=3", "train.micro_batch_size=4", f"output_dir={tmp_path / 'ddp'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "launch" / "accelerate" / "cpu.yaml"), "-m", "leaplm.train", str(TEACHER_CONFIG), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    ddp_losses = [r["loss"] for r in rows]
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(GOLDEN), rtol=1e-5, atol=1e-5)
    assert ddp_losses[-1] < ddp_losses[0]
    # Every trainable parameter moved away from its (seeded, hence reproducible) initial value.
    cfg = load_config(tmp_path / "ddp" / "config.yaml")
    initial, _ = get_recipe(cfg.recipe).build_model(cfg)
    trained = AutoModelForCausalLM.from_pretrained(ckpt.list_checkpoints(tmp_path / "ddp")[-1] / "model")
    after = dict(trained.named_parameters())
    unchanged = [n for n, p in initial.named_parameters() if torch.equal(p, after[n])]
    assert not unchanged, f"parameters not updated under DDP: {unchanged}"


def test_max_length_beyond_the_model_context_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        train(tiny_config(tmp_path, "model.init.max_position_embeddings=64", "data.max_length=128"))


def test_wandb_logs_offline_without_an_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    train(tiny_config(tmp_path, "train.max_steps=2", "logging.wandb=true"))
    assert list((tmp_path / "wandb").glob("offline-run-*")), "expected an offline wandb run directory"


def test_metrics_rows_carry_the_step_time_and_the_wall_clock(tmp_path):
    before = time.time()
    train(tiny_config(tmp_path, "train.max_steps=3"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["step_s"] > 0 for r in rows)
    clocks = [r["time"] for r in rows]
    assert before <= clocks[0] <= clocks[1] <= clocks[2] <= time.time()


def test_only_the_main_process_logs_progress():
    import logging

    from leaplm.cli import log_level

    assert log_level({}) == log_level({"RANK": "0"}) == logging.INFO
    assert log_level({"RANK": "1"}) == logging.WARNING
