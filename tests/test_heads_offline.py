"""Offline draft-head training (``method.offline``): the cached hidden states equal the online ones,
an offline step gives the online step's loss and gradients without running the base, the cache is
reused, resumed and sharded over processes, and a whole offline run decodes losslessly."""

from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from leaplm.config import ConfigError
from leaplm.data.tasks import make_split
from leaplm.inference.engine import Engine
from leaplm.inference.evaluate import task_prompts
from leaplm.models.zoo import load_model
from leaplm.train import draft_heads, features
from leaplm.train.recipes import load_config
from leaplm.train.rollouts import SETTINGS_FILE, rollout_key
from leaplm.train.trainer import train

from conftest import SMALL_ROLLOUT_RUN

WHAT = "final hidden states"  # what the draft-heads recipe caches

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "draft_heads"
SMALL = [*SMALL_ROLLOUT_RUN, "rollout.max_prompts=6", "method.rollout_block_size=8", "train.micro_batch_size=4"]


def offline_run(tmp_path: Path, config: str = "tiny_teacher.yaml", *overrides: str):
    """(cfg, model, tokenizer) of an offline run whose rollout step (answers, then features) has run."""
    cfg = load_config(CONFIGS / config, [*SMALL, f"output_dir={tmp_path}", "method.offline=true", *overrides])
    model, tokenizer = draft_heads.build_model(cfg)
    draft_heads.rollout(cfg, model, tokenizer, Accelerator(cpu=True))
    return cfg, model, tokenizer


def test_cached_features_are_the_online_hidden_states(tmp_path):
    cfg, model, tokenizer = offline_run(tmp_path)
    samples = draft_heads.build_dataset(cfg, tokenizer)
    batch = draft_heads.RECIPE.build_collator(cfg, tokenizer)(samples)
    assert len(samples) > 1 and batch["hidden"].shape == (*batch["input_ids"].shape, model.config.hidden_size)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        with torch.no_grad():  # each sample alone: no padding, nothing shared with the extraction's batches
            online = model(torch.tensor([sample["input_ids"]]), output_hidden_states=True).hidden_states[-1][0]
        torch.testing.assert_close(batch["hidden"][row, :n], online, rtol=1e-5, atol=1e-5)
        assert not batch["hidden"][row, n:].any()


class CountForwards:
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1


@pytest.mark.parametrize("config,shared", [("tiny_teacher.yaml", True), ("tiny_teacher_hydra_pp.yaml", False)])
def test_an_offline_step_gives_the_online_loss_and_gradients_without_the_base(config, shared, tmp_path):
    cfg, model, tokenizer = offline_run(tmp_path, config, "method.num_heads=3", f"method.shared_lm_head={shared}")
    online_cfg = load_config(CONFIGS / config, [*SMALL, f"output_dir={tmp_path}", "method.num_heads=3",
                                                f"method.shared_lm_head={shared}"])
    heads = model.draft_heads
    with torch.no_grad():  # heads (and prefix layer) that differ from their identity start
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    samples = draft_heads.build_dataset(cfg, tokenizer)[:4]
    base = CountForwards(model.model)
    results = []
    for run_cfg in (online_cfg, cfg):
        batch = {**draft_heads.RECIPE.build_collator(run_cfg, tokenizer)(samples), "step": 0}
        heads.zero_grad()
        total, _ = draft_heads.loss(model, batch, run_cfg)
        total.backward()
        results.append((total.detach(), [p.grad.clone() for p in heads.parameters()], base.calls))
    base.handle.remove()
    (online, online_grads, online_calls), (offline, offline_grads, offline_calls) = results
    assert online_calls == 1 and offline_calls == 1  # the offline step ran no base forward
    torch.testing.assert_close(offline, online, rtol=1e-5, atol=1e-5)
    for a, b in zip(offline_grads, online_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_cache_is_reused_resumed_and_keyed_by_samples_and_base(tmp_path):
    cfg, model, tokenizer = offline_run(tmp_path)
    path = features.current_features(cfg)
    shard = features.shard_file(path, 0)
    stamp = shard.stat().st_mtime_ns
    assert draft_heads.extract_features(cfg, model, tokenizer, Accelerator(cpu=True)) == path
    assert shard.stat().st_mtime_ns == stamp
    # an extraction interrupted after its shards were written keeps them
    (path / SETTINGS_FILE).unlink()
    path.rename(path.with_name(path.name + ".partial"))
    assert draft_heads.extract_features(cfg, model, tokenizer, Accelerator(cpu=True)) == path
    assert shard.stat().st_mtime_ns == stamp and (path / SETTINGS_FILE).is_file()
    samples = draft_heads.build_dataset(cfg, tokenizer)
    key = rollout_key(features.feature_settings(cfg, samples, WHAT))
    assert path.name == key != rollout_key(features.feature_settings(cfg, samples[1:], WHAT))
    other_base = load_config(CONFIGS / "tiny_teacher.yaml", [*SMALL, f"output_dir={tmp_path}", "model.dtype=bfloat16"])
    assert rollout_key(features.feature_settings(other_base, samples, WHAT)) != key


class OneOfTwo:
    """The parts of an Accelerator extraction uses, as one of two processes run one after the other."""

    num_processes, device = 2, torch.device("cpu")

    def __init__(self, rank: int):
        self.process_index, self.is_main_process = rank, rank == 0

    def wait_for_everyone(self) -> None:
        pass

    def autocast(self):
        return contextlib.nullcontext()


def test_two_processes_write_the_shards_one_process_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(features, "SHARD_SAMPLES", 2)  # 6 samples: shards 0, 2 on rank 0 and 1 on rank 1
    cfg, model, tokenizer = offline_run(tmp_path / "one")
    one = features.current_features(cfg)
    two_cfg = load_config(CONFIGS / "tiny_teacher.yaml", [*SMALL, f"output_dir={tmp_path / 'two'}", "method.offline=true"])
    shutil.copytree(tmp_path / "one" / "rollouts", tmp_path / "two" / "rollouts")
    for rank in (1, 0):  # rank 0 finishes the cache once every rank wrote its shards
        two = draft_heads.extract_features(two_cfg, model, tokenizer, OneOfTwo(rank))
    assert one.name == two.name
    samples = draft_heads.build_dataset(cfg, tokenizer)
    assert len(samples) > 4
    for a, b in zip(features.FeatureCollator(0, one)(samples)["hidden"],
                    features.FeatureCollator(0, two)(samples)["hidden"]):
        assert torch.equal(a, b)


def test_stale_features_and_medusa2_are_refused(tmp_path):
    cfg, _, tokenizer = offline_run(tmp_path)
    sample = draft_heads.build_dataset(cfg, tokenizer)[0]
    shorter = {**sample, "input_ids": sample["input_ids"][:-1], "labels": sample["labels"][:-1]}
    with pytest.raises(ValueError, match="the cache is stale"):
        draft_heads.RECIPE.build_collator(cfg, tokenizer)([shorter])
    with pytest.raises(ConfigError, match="medusa2 trains the base"):
        load_config(CONFIGS / "tiny_teacher_medusa2.yaml", ["method.offline=true"])


def test_an_offline_run_trains_exports_and_decodes_losslessly(tmp_path):
    out = tmp_path / "model"
    result = train(load_config(CONFIGS / "tiny_teacher_hydra_pp.yaml",
                               [*SMALL, f"output_dir={tmp_path}", "train.max_steps=2", f"export.dir={out}",
                                "method.offline=true", "method.shared_lm_head=true"]))
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    model, tokenizer = load_model(str(out))
    assert model.draft_heads.config.shared_lm_head and model.draft_heads.accuracy.any()
    engine = Engine(model, tokenizer)
    prompts = task_prompts(tokenizer, make_split("copy", "test", 2) + make_split("sort", "test", 1))
    assert engine.generate(prompts, "hydra", 24).sequences == engine.generate(prompts, "hf_generate", 24).sequences
