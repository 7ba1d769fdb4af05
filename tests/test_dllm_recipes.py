"""The distillation recipes' data paths: decoded rollouts (reuse, sharding), the dParallel and
CD4LM batches, on a tiny random block-diffusion model."""

import copy

import pytest
import torch

from leaplm.config import ConfigError
from leaplm.inference.engine import Engine
from leaplm.losses.block_diffusion import NOISY_TARGET
from leaplm.losses.dllm_distill import semi_ar_masks
from leaplm.models.block_diffusion import spec_of, training_attention
from leaplm.models.noisy_weights import split_noisy_weights
from leaplm.models.two_stream import CLEAN, NOISY, two_stream_forward
from leaplm.train import cd4lm, dparallel
from leaplm.train.recipes import NOISE_SEED, load_config
from leaplm.train.rollouts import ANSWER_FEATURES, RolloutPrompt, collect_decoded_rollouts, load_rollouts

from tests.test_block_diffusion_decoder import converted, prompts_of
from tests.test_cllm import run_ranks
from tests.test_noisy_weights import perturb_noisy_weights


@pytest.fixture(scope="module")
def tiny_bd():
    return converted("llama", 4)


def test_decoded_rollouts_are_reused_and_keyed_by_decoder_settings(tiny_bd, tmp_path):
    model, tokenizer = tiny_bd
    prompts = [RolloutPrompt(ids) for ids in prompts_of(tokenizer)]
    settings = dict(model_id={"name": "tiny"}, decoder="block_diffusion", decoder_settings={"threshold": 1.0},
                    max_new_tokens=8, batch_size=2, progress=False)
    path = collect_decoded_rollouts(model, tokenizer, prompts, tmp_path, **settings)
    ds = load_rollouts(path, features=ANSWER_FEATURES)
    expected = Engine(model, tokenizer).generate([p.ids for p in prompts], "block_diffusion", 8, threshold=1.0).sequences
    assert ds["answer_ids"] == expected and ds["prompt_index"] == [0, 1, 2]
    mtime = (path / "dataset_info.json").stat().st_mtime_ns
    assert collect_decoded_rollouts(model, tokenizer, prompts, tmp_path, **settings) == path
    assert (path / "dataset_info.json").stat().st_mtime_ns == mtime  # reused, not rewritten
    other = collect_decoded_rollouts(model, tokenizer, prompts, tmp_path, **{**settings, "decoder_settings": {"threshold": 0.5}})
    assert other != path
    sharded = run_ranks(2, lambda acc: collect_decoded_rollouts(model, tokenizer, prompts, tmp_path / "two",
                                                                 **settings, accelerator=acc))[0]
    assert load_rollouts(sharded, features=ANSWER_FEATURES)["answer_ids"] == expected


def test_dparallel_batch_counts_its_targets_and_gives_a_finite_loss(tiny_bd, tmp_path, monkeypatch):
    model, tokenizer = tiny_bd
    cfg = load_config(None, ["recipe=dparallel", "rollout.decoder=block_diffusion", "method.blocks=one"])
    monkeypatch.setattr(dparallel, "load_model_config", lambda cfg: spec_of(model))
    prompts = prompts_of(tokenizer)
    samples = [{"prompt": p, "response": list(range(5, 5 + n)), NOISE_SEED: i}
               for i, (p, n) in enumerate(zip(prompts, (9, 4, 6)))]
    batch = dparallel.build_collator(cfg, tokenizer)(samples)
    targets = batch["targets"]
    noisy = targets.kinds == NOISY_TARGET
    # one block per answer, both copies together mask its slots but the first exactly once
    per_row = torch.bincount(targets.rows[noisy] % 3, minlength=3).tolist()
    assert all(1 <= n <= 3 for n in per_row)
    assert int(batch["n_targets"]) == len(targets.labels)
    loss, metrics = dparallel.loss(model, {**batch, "step": 0}, cfg)
    assert torch.isfinite(loss) and 0 <= metrics["masked_correct"] <= 1
    # method.entropy_mean reaches the loss (its two forms are checked by hand in test_dllm_distill.py)
    seen = {}
    monkeypatch.setattr(dparallel, "certainty_forcing_loss_sum",
                        lambda logits, targets, **settings: seen.update(settings) or (logits.sum(), {}))
    dparallel.loss(model, {**batch, "step": 0}, cfg)
    assert seen["entropy_mean"] == "correct"
    dparallel.loss(model, {**batch, "step": 0}, load_config(None, ["recipe=dparallel", "method.entropy_mean=targets"]))
    assert seen["entropy_mean"] == "targets"
    with pytest.raises(ConfigError, match="entropy_mean"):
        load_config(None, ["recipe=dparallel", "method.entropy_mean=masked"])


def test_dparallel_rate_range_reaches_the_masks_and_a_bad_range_is_refused(tiny_bd, monkeypatch):
    model, tokenizer = tiny_bd
    monkeypatch.setattr(dparallel, "load_model_config", lambda cfg: spec_of(model))
    seen = []
    monkeypatch.setattr(dparallel, "semi_ar_masks", lambda lengths, block, rate, blocks, generator:
                        seen.append(rate) or semi_ar_masks(lengths, block, rate, blocks, generator))
    samples = [{"prompt": p, "response": list(range(5, 5 + 16)), NOISE_SEED: i}
               for i, p in enumerate(prompts_of(tokenizer))]
    for overrides, rate in [([], 0.5), (["method.max_rate=1.0"], (0.5, 1.0))]:
        cfg = load_config(None, ["recipe=dparallel", "rollout.decoder=block_diffusion", "method.rate=0.5", *overrides])
        dparallel.build_collator(cfg, tokenizer)(samples)
        assert seen[-1] == rate
    for bad in ("0.4", "1.5"):
        with pytest.raises(ConfigError, match="max_rate"):
            load_config(None, ["recipe=dparallel", "method.rate=0.5", f"method.max_rate={bad}"])


def test_dparallel_loss_routes_noisy_tokens_through_separate_weights(tiny_bd, monkeypatch):
    """A split model's loss equals the shared model's until its noisy copies move; then only the
    noisy copies get gradients, and the clean rows' logits stay the original model's."""
    model, tokenizer = tiny_bd
    cfg = load_config(None, ["recipe=dparallel", "rollout.decoder=block_diffusion", "method.blocks=all"])
    monkeypatch.setattr(dparallel, "load_model_config", lambda cfg: spec_of(model))
    samples = [{"prompt": p, "response": list(range(5, 5 + n)), NOISE_SEED: i}
               for i, (p, n) in enumerate(zip(prompts_of(tokenizer), (9, 4, 6)))]
    batch = {**dparallel.build_collator(cfg, tokenizer)(samples), "step": 0}
    split = copy.deepcopy(model)
    split_noisy_weights(split)
    with torch.no_grad():
        assert torch.equal(dparallel.loss(split, batch, cfg)[0], dparallel.loss(model, batch, cfg)[0])
    perturb_noisy_weights(split)
    loss, _ = dparallel.loss(split, batch, cfg)
    assert not torch.isclose(loss, dparallel.loss(model, batch, cfg)[0])
    loss.backward()
    trained = {name for name, p in split.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all(name.endswith(("noisy_weight", "noisy_bias")) for name in trained)
    layout = batch["layout"]
    with torch.no_grad():
        ours = two_stream_forward(split, layout, "dense", training_attention)
        want = two_stream_forward(model, layout, "dense", training_attention)
    clean = layout.stream == CLEAN
    assert torch.equal(ours[clean], want[clean]) and not torch.allclose(ours[layout.stream == NOISY],
                                                                         want[layout.stream == NOISY])


def test_cd4lm_teacher_sees_a_nested_less_masked_input(tiny_bd, monkeypatch):
    model, tokenizer = tiny_bd
    cfg = load_config(None, ["recipe=cd4lm"])
    monkeypatch.setattr(cd4lm, "load_model_config", lambda cfg: spec_of(model))
    mask_id = spec_of(model).mask_token_id
    prompts = prompts_of(tokenizer)
    samples = [{"prompt": p, "response": list(range(5, 5 + n)), NOISE_SEED: i}
               for i, (p, n) in enumerate(zip(prompts, (12, 8, 10)))]
    batch = cd4lm.build_collator(cfg, tokenizer)(samples)
    student, teacher = batch["student"], batch["teacher"]
    noisy = student.stream == NOISY
    s_masked, t_masked = (student.input_ids == mask_id) & noisy, (teacher.input_ids == mask_id) & noisy
    assert not (t_masked & ~s_masked).any() and t_masked.sum() < s_masked.sum()
    # outside the student's masks both see the same tokens
    assert torch.equal(student.input_ids[~s_masked], teacher.input_ids[~s_masked])
    # the KL is taken exactly at the teacher's masked answer slots (the padding past an answer is masked too)
    padding = int(s_masked.sum()) - int((batch["targets"].kinds == NOISY_TARGET).sum())
    assert int(batch["distilled"].sum()) == int(t_masked.sum()) - padding > 0
    assert not (batch["distilled"] & (batch["targets"].kinds != NOISY_TARGET)).any()
    object.__setattr__(model, cd4lm.TEACHER, model)
    try:
        loss, metrics = cd4lm.loss(model, {**batch, "step": 0}, cfg)
    finally:
        object.__delattr__(model, cd4lm.TEACHER)
    assert torch.isfinite(loss) and metrics["lambda"] == 0.9
