"""Two processes train the same run as one: every recipe under `accelerate launch` with 2 CPU ranks.

For each recipe (and each draft-heads variant), a few steps on 2 gloo ranks with micro-batch m are
compared with one process at micro-batch 2m, the same global batch:
- the ranks hold bit-identical trained weights (the fingerprints every checkpoint records, which
  the trainer also checks before writing it);
- the loss curve equals the single process's to 1e-5;
- the trained weights equal the single process's up to the order of floating-point sums (to a
  quarter of one step's update).

Recipes that make their own data roll out sharded over the ranks, and Jacobi rollouts start from
random guesses drawn per rank: the single process is given the 2-rank run's rollouts, so both
train on identical data (the rollouts themselves are tested in test_cllm.py and friends).

Slow (about 30 s a recipe): CI runs it as a step of its own (`python -m pytest -m slow tests/test_parity.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from leaplm.losses.block_diffusion import sample_masks
from leaplm.losses.dllm_distill import nested_masks, semi_ar_masks
from leaplm.ship import checkpoint as ckpt
from leaplm.train.recipes import load_config, noise_seed, sample_generators
from leaplm.train.trainer import StepSampler, train

from conftest import RECIPE_SMOKE

REPO = Path(__file__).resolve().parents[1]
STEPS = 3

# variant -> (config, overrides, micro-batch per rank on 2 ranks). The single process takes the
# same global batch as one micro-batch twice the size, except where noted in ONE_PROCESS.
VARIANTS = {
    "pretrain": ("configs/pretrain/tiny_teacher.yaml", RECIPE_SMOKE["pretrain"], 4),
    "ar2bd": ("configs/ar2bd/tiny_teacher.yaml", RECIPE_SMOKE["ar2bd"], 2),
    "cllm": ("configs/cllm/tiny_teacher.yaml", RECIPE_SMOKE["cllm"], 2),
    "jacobi_forcing": ("configs/jacobi_forcing/tiny_teacher.yaml", RECIPE_SMOKE["jacobi_forcing"], 1),
    "dparallel": ("configs/dparallel/tiny_teacher.yaml", RECIPE_SMOKE["dparallel"], 1),
    "cd4lm": ("configs/cd4lm/tiny_teacher.yaml", RECIPE_SMOKE["cd4lm"], 1),
    "learn2pd": ("configs/learn2pd/tiny_teacher.yaml", RECIPE_SMOKE["learn2pd"], 32),
    "acceptance_head": ("configs/acceptance_head/tiny_teacher.yaml", RECIPE_SMOKE["acceptance_head"], 1),
    "medusa1": ("configs/draft_heads/tiny_teacher.yaml", RECIPE_SMOKE["draft_heads"], 1),
    "medusa2": ("configs/draft_heads/tiny_teacher_medusa2.yaml", RECIPE_SMOKE["draft_heads"], 1),
    "hydra_pp": ("configs/draft_heads/tiny_teacher_hydra_pp.yaml", RECIPE_SMOKE["draft_heads"], 1),
    # each rank caches the hidden states of its shards; the single process caches them all itself
    "medusa1_offline": ("configs/draft_heads/tiny_teacher.yaml",
                        [*RECIPE_SMOKE["draft_heads"], "method.offline=true", "method.shared_lm_head=true"], 1),
    "hydra_pp_offline": ("configs/draft_heads/tiny_teacher_hydra_pp.yaml",
                         [*RECIPE_SMOKE["draft_heads"], "method.offline=true"], 1),
    "clover2": ("configs/draft_heads/tiny_teacher_clover2.yaml", RECIPE_SMOKE["draft_heads"], 1),
    "eagle3": ("configs/eagle3/tiny_teacher.yaml", RECIPE_SMOKE["eagle3"], 1),
    "kangaroo": ("configs/kangaroo/tiny_teacher.yaml", RECIPE_SMOKE["kangaroo"], 1),
    "kangaroo_offline": ("configs/kangaroo/tiny_teacher.yaml", [*RECIPE_SMOKE["kangaroo"], "method.offline=true"], 1),
}


# ----- the pieces: a sample's noise is its own ---------------------------------------------------


def test_a_samples_seed_is_its_place_in_the_sample_stream_whatever_the_split():
    """Two ranks x micro 2 and one rank x micro 4 see the same samples at the same global positions,
    so every sample gets the same noise seed."""
    one = StepSampler(40, micro_batch=4, grad_accum=1, world=1, rank=0, seed=3)
    two = [StepSampler(40, micro_batch=2, grad_accum=1, world=2, rank=r, seed=3) for r in (0, 1)]
    for step in range(12):  # past the first epoch's end
        (positions,) = one.positions(step)
        split = two[0].positions(step)[0] + two[1].positions(step)[0]
        assert positions == split == list(range(4 * step, 4 * step + 4))
        assert [one.index(p) for p in positions] == [two[0].index(p) for p in split]
    assert len({noise_seed(0, p) for p in range(1000)}) == 1000
    assert noise_seed(0, 5) != noise_seed(1, 5)


LENGTHS = [9, 17, 4, 30]


@pytest.mark.parametrize("sampler", [
    lambda lengths, gen: sample_masks(lengths, 4, 0.1, 0.9, complementary=False, generator=gen)[0],
    lambda lengths, gen: semi_ar_masks(lengths, 4, (0.5, 1.0), "one", generator=gen)[:len(lengths)],
    lambda lengths, gen: nested_masks(lengths, 4, generator=gen)[0],
], ids=["ar2bd", "dparallel", "cd4lm"])
def test_a_rows_masks_depend_on_its_own_generator_not_on_its_batch_mates(sampler):
    seeds = [noise_seed(0, p) for p in range(len(LENGTHS))]
    together = sampler(LENGTHS, sample_generators(seeds))
    alone = [sampler([n], sample_generators([s]))[0] for n, s in zip(LENGTHS, seeds)]
    assert all(torch.equal(a, b) for a, b in zip(together, alone))
    # and a shared generator (what every process drew from before) makes a row's masks depend on its place
    shared = sampler(LENGTHS, torch.Generator().manual_seed(0))
    moved = sampler(LENGTHS[1:], torch.Generator().manual_seed(0))
    assert not torch.equal(shared[1], moved[0])


# ----- whole runs --------------------------------------------------------------------------------


# dParallel's entropy term is a mean over each micro-batch's correct tokens (as the reference takes
# it per device), so its loss follows the micro-batch size: the single process keeps the ranks'
# micro-batch and accumulates two of them instead.
ONE_PROCESS = {"dparallel": lambda micro: [f"train.micro_batch_size={micro}", "train.grad_accum=2"]}


def _run_dir(output_dir: Path) -> Path:
    """Where a run's checkpoints and metrics are: its last stage's directory for staged recipes."""
    stages = sorted(output_dir.glob("stage_*"))
    return stages[-1] if stages else output_dir


def _trained_state(run: Path) -> dict[str, torch.Tensor]:
    """The prepared module's whole state (weights and buffers) as its last checkpoint saved it."""
    return load_file(ckpt.list_checkpoints(run)[-1] / "state" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_processes_train_the_same_run_as_one(tmp_path, variant):
    config, overrides, micro = VARIANTS[variant]
    common = [*overrides, f"train.max_steps={STEPS}", "train.log_every=1", "train.lr=1e-3"]
    two, one = tmp_path / "two", tmp_path / "one"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/accelerate/cpu.yaml",
           "-m", "leaplm.train", config, *common, f"train.micro_batch_size={micro}", f"output_dir={two}"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    if (two / "rollouts").is_dir():
        shutil.copytree(two / "rollouts", one / "rollouts")
    split = ONE_PROCESS.get(variant, lambda m: [f"train.micro_batch_size={2 * m}"])(micro)
    cfg = load_config(REPO / config, [*common, *split, f"output_dir={one}"])
    one_losses = train(cfg).losses

    run_two, run_one = _run_dir(two), _run_dir(one)
    state = ckpt.validate(ckpt.list_checkpoints(run_two)[-1])
    first, second = state["process_fingerprints"]
    assert first == second, f"the two ranks trained different weights: {state['process_fingerprints']}"

    two_losses = [json.loads(line)["loss"] for line in (run_two / "metrics.jsonl").read_text().splitlines()]
    assert len(two_losses) == len(one_losses) == STEPS
    torch.testing.assert_close(torch.tensor(two_losses), torch.tensor(one_losses), rtol=1e-5, atol=1e-5)

    # Summing the gradient over 2 processes rounds differently from summing it in one. Where an
    # element's gradient is near zero, that rounding can move Adam's normalised update by up to
    # ~15% of the learning rate (1e-3 here; measured on LoRA factors): so the weights must agree to
    # a quarter of one step, while a process that trained on other samples or skipped a reduction
    # is off by whole steps.
    trained_two, trained_one = _trained_state(run_two), _trained_state(run_one)
    assert trained_two.keys() == trained_one.keys()
    for name, value in trained_one.items():
        torch.testing.assert_close(trained_two[name], value, rtol=0, atol=2.5e-4, msg=lambda m: f"{name}: {m}")


DRIFT = """
import sys

import torch

from leaplm.train.recipes import load_config
from leaplm.ship import checkpoint as ckpt
from leaplm.train.trainer import ProcessesDiverged, Trainer, end_processes

trainer = Trainer(load_config(sys.argv[1], sys.argv[2:]))
trainer.setup()
if trainer.accelerator.process_index == 1:  # what unsynchronised gradients leave behind
    with torch.no_grad():
        next(p for p in trainer.model.parameters() if p.requires_grad).add_(1e-3)
try:
    trainer.save_checkpoint(1)
    outcome = "saved"
except ProcessesDiverged as err:
    outcome = f"refused: {err}"
written = len(ckpt.list_checkpoints(trainer.output_dir))
(trainer.output_dir / f"rank{trainer.accelerator.process_index}.txt").write_text(f"{outcome} | checkpoints: {written}")
end_processes()
"""


@pytest.mark.slow
def test_a_checkpoint_is_refused_when_the_processes_hold_different_weights(tmp_path):
    script = tmp_path / "drift.py"
    script.write_text(DRIFT)
    config, overrides, micro = VARIANTS["pretrain"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/accelerate/cpu.yaml",
           str(script), config, *overrides, f"output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        outcome = (tmp_path / "run" / f"rank{rank}.txt").read_text()
        assert "refused:" in outcome and "hold different trained weights" in outcome, outcome
        assert outcome.endswith("checkpoints: 0")
