"""The Jacobi Forcing recipe: rollout -> train -> export through the trainer, progressive stages
(each from the previous stage's export, with its own rollouts; resume skips finished stages), the
dataset and collator, the quickstart stage, and the errors for bad config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from leaplm.bench.commands import quickstart_jacobi_forcing
from leaplm.config import ConfigError
from leaplm.losses.jacobi_forcing import noise_ratio
from leaplm.models.zoo import load_model
from leaplm.train import jacobi_forcing
from leaplm.train import rollouts as rollouts_module
from leaplm.train import trainer as trainer_module
from leaplm.train.recipes import load_config
from leaplm.train.rollouts import RolloutError
from leaplm.train.trainer import train

from conftest import SMALL_ROLLOUT_RUN

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "jacobi_forcing" / "tiny_teacher.yaml"

SMALL = [*SMALL_ROLLOUT_RUN, "rollout.max_prompts=4", "method.jacobi_block_size=8", "method.window_size=2",
         "method.min_noise_ratio=0.0", "train.micro_batch_size=2"]
STAGES = "method.stages=[{jacobi_block_size: 4, max_steps: 1}, {jacobi_block_size: 8, max_steps: 2, lr: 1.0e-4}]"


def _settings(output_dir: Path) -> dict:
    (path,) = (output_dir / "rollouts").glob("*/settings.json")
    return json.loads(path.read_text())


def test_recipe_rolls_out_trains_and_exports(tmp_path):
    cfg = load_config(CONFIG, [*SMALL, f"output_dir={tmp_path}", f"export.dir={tmp_path / 'model'}",
                               "train.max_steps=2"])
    result = train(cfg)
    assert len(result.losses) == 2 and all(math.isfinite(x) and x > 0 for x in result.losses)
    assert (tmp_path / "model" / "model.safetensors").is_file()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("ce_ar" in m and m["consistency_fraction"] > 0 for m in metrics)
    assert _settings(tmp_path)["jacobi_block_size"] == 8

    # The dataset: one sample per kept prompt, its blocks in order, states chosen by the schedule.
    _, tokenizer = load_model("tiny-teacher")
    samples = jacobi_forcing.build_dataset(cfg, tokenizer)
    assert 0 < len(samples) <= 4
    starts = set()
    for s in samples:
        assert all(len(fixed) == 8 for _, fixed in s["pairs"][:-1])
        # window 2 from 0 to 1, entered at each answer's own offset: its blocks alternate between the
        # fixed point (ratio 0) and the noisiest state, from either one
        ratios = [noise_ratio(*pair) for pair in s["pairs"]]
        assert all(r == 0 for r in ratios[::2]) or all(r == 0 for r in ratios[1::2])
        starts.add(ratios[0] == 0)
    assert starts == {True, False}  # both offsets occur among the answers
    reference = load_config(CONFIG, [*SMALL, f"output_dir={tmp_path}", "method.window_offset=start"])
    assert all(noise_ratio(*s["pairs"][0]) == 0 for s in jacobi_forcing.build_dataset(reference, tokenizer))
    batch = jacobi_forcing.build_collator(cfg, tokenizer)(samples[:2])
    assert int(batch["n_targets"]) == sum(len(f) for s in samples[:2] for _, f in s["pairs"])

    # Rollouts of another block size than the method's are refused.
    with pytest.raises(RolloutError, match="collected with jacobi_block_size 8, but method.jacobi_block_size is 4"):
        jacobi_forcing.build_dataset(load_config(CONFIG, [*SMALL, f"output_dir={tmp_path}", "method.jacobi_block_size=4"]),
                                     tokenizer)


def test_stages_chain_from_the_previous_export_and_resume_skips_finished_ones(tmp_path, monkeypatch):
    overrides = [*SMALL, f"output_dir={tmp_path}", f"export.dir={tmp_path / 'final'}", STAGES]
    train(load_config(CONFIG, overrides))
    stage_1, stage_2 = tmp_path / "stage_1", tmp_path / "stage_2"
    assert (stage_1 / "model" / "model.safetensors").is_file() and (tmp_path / "final" / "model.safetensors").is_file()
    config_2 = yaml.safe_load((stage_2 / "config.yaml").read_text())
    assert config_2["model"]["name_or_path"] == str(stage_1 / "model")
    assert config_2["method"]["jacobi_block_size"] == 8 and config_2["train"]["lr"] == 1.0e-4
    assert config_2["train"]["max_steps"] == 2 and config_2["method"]["stages"] == []
    # Each stage rolled out with its own model and block size.
    assert _settings(stage_1)["jacobi_block_size"] == 4 and _settings(stage_1)["model"]["name"] == "tiny-teacher"
    assert _settings(stage_2)["jacobi_block_size"] == 8 and _settings(stage_2)["model"]["name"] == str(stage_1 / "model")
    assert len((stage_1 / "metrics.jsonl").read_text().splitlines()) == 1
    assert len((stage_2 / "metrics.jsonl").read_text().splitlines()) == 2

    # Resuming a finished run trains and collects nothing.
    monkeypatch.setattr(rollouts_module, "collect_jacobi_trajectories", lambda *a, **k: pytest.fail("recollected"))
    monkeypatch.setattr(trainer_module, "Trainer", lambda *a, **k: pytest.fail("retrained"))
    result = train(load_config(CONFIG, [*overrides, "train.resume_from=latest"]))
    assert result.output_dir == stage_2


def test_stage_configs_without_stages_is_the_config_itself():
    cfg = load_config(CONFIG)
    assert jacobi_forcing.stage_configs(cfg) == [cfg]


def test_quickstart_stage_trains_exports_and_benches(tmp_path):
    rows = quickstart_jacobi_forcing(tmp_path, 1, 24, [*SMALL, "train.max_steps=1"])
    labels = {r["decoder"] for r in rows}
    assert {"hf_generate", "ar", "jacobi", "jacobi_multiblock"} <= labels
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "bench.md").is_file()


# ----- Config errors ------------------------------------------------------------------------


@pytest.mark.parametrize("override,message", [
    ("method.window_size=0", "method.window_size must be >= 1"),
    ("method.jacobi_block_size=1", "method.jacobi_block_size must be >= 2"),
    ("method.min_noise_ratio=1.5", r"need 0 <= method.min_noise_ratio <= method.max_noise_ratio <= 1"),
    ("method.strategy=random", "method.strategy must be one of progressive, reverse"),
    ("method.window_offset=middle", "method.window_offset must be one of random, start"),
    ("method.noisy_context=both", "method.noisy_context must be one of noisy, clean"),
    ("train.attention=sdpa", "train.attention must be one of auto, flex, dense"),
    ("method.init=random", "method.init must be one of prompt, pad, repeat, lookup"),
    ("method.distill_temperature=0", "method.distill_temperature must be positive"),
    ("method.ar_weight=-1", "method.ar_weight must be >= 0"),
    ("method.stages=[{jacobi_block_size: 16, max_steps: 5}, {jacobi_block_size: 32, max_steps: 5}]",
     "method.jacobi_block_size=16 but the last of method.stages trains jacobi_block_size=32"),
    ("method.stages=[{jacobi_block_size: 16}]", "each method.stages entry needs jacobi_block_size >= 2 and max_steps >= 1"),
    ("method.stages=[{jacobi_block_size: 16, max_steps: 1, steps: 2}]", "unknown config key 'method.stages\\[0\\].steps'"),
    ("method.windowsize=8", "unknown config key 'method.windowsize'"),
])
def test_method_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, [override])


@pytest.mark.parametrize("overrides,message", [
    (["rollout.max_new_tokens=24", "method.jacobi_block_size=32",
      "method.stages=[{jacobi_block_size: 16, max_steps: 1}, {jacobi_block_size: 32, max_steps: 1}]"], "shorter than one Jacobi block"),
    (["rollout.decoder=ar"], "set rollout.decoder=jacobi"),
    (["rollout.temperature=0.7"], "needs greedy rollouts"),
    (["data.packing=true"], "data.packing and train.group_by_length do not apply"),
    (["method.stages=[{jacobi_block_size: 16, max_steps: 1}]", "train.resume_from=runs/x/checkpoints/step-000001"],
     "with method.stages, train.resume_from can only be latest"),
])
def test_section_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        jacobi_forcing.stage_configs(load_config(CONFIG, overrides))


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "jacobi_forcing").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    stages = jacobi_forcing.stage_configs(cfg)
    assert stages[-1].method.jacobi_block_size == cfg.method.jacobi_block_size
    assert stages[-1].export.dir == cfg.export.dir
