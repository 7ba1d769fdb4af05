"""Separate noisy-stream weights (ar2bd ``method.noisy_weights=separate``): token routing, the clean
stream stays the original model in training and decoding, verified decoding equals the original's
``generate``, save and load, config errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_block_diffusion_decoder import converted, prompts_of
from test_block_diffusion_training import ar2bd_run

from leaplm.config import ConfigError
from leaplm.inference.engine import Engine
from leaplm.models.noisy_weights import (
    NOISY_WEIGHTS_FILE,
    StreamRoles,
    TwoStreamLinear,
    has_noisy_weights,
    noisy_state_dict,
    noisy_tokens,
    save_noisy_weights,
    split_noisy_weights,
)
from leaplm.models.zoo import load_model
from leaplm.train.recipes import load_config
from leaplm.train.trainer import Trainer


def perturb_noisy_weights(model, seed: int = 1, scale: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("noisy_weight"):
                param.add_(torch.randn(param.shape, generator=generator) * scale / param.shape[-1] ** 0.5)


def split_copy(family: str):
    """(the original converted model, a split copy with perturbed noisy weights, tokenizer)."""
    model, tokenizer = converted(family, block_size=4)
    split = copy.deepcopy(model)
    split_noisy_weights(split)
    perturb_noisy_weights(split)
    return model, split, tokenizer


def test_a_two_stream_linear_routes_each_token_to_its_weights():
    layer = torch.nn.Linear(6, 5)
    clean_weight, clean_bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    model = torch.nn.Sequential(layer)
    split_noisy_weights(model)
    assert isinstance(layer, TwoStreamLinear) and not layer.weight.requires_grad and layer.noisy_weight.requires_grad
    with torch.no_grad():
        layer.noisy_weight.mul_(-2.0)
        layer.noisy_bias.add_(1.0)
    x = torch.randn(2, 4, 6)  # [b, s, in]
    noisy = torch.tensor([[True, False, False, True], [False, True, True, True]])  # [b, s]
    clean_out = F.linear(x, clean_weight, clean_bias)
    noisy_out = F.linear(x, -2.0 * clean_weight, clean_bias + 1.0)
    with noisy_tokens(model, noisy):
        assert torch.allclose(model(x), torch.where(noisy[..., None], noisy_out, clean_out))
        # a layer fed fewer tokens (the LM head under logits_to_keep) takes the mask's last columns
        assert torch.allclose(model(x[:, -2:]), torch.where(noisy[:, -2:, None], noisy_out[:, -2:], clean_out[:, -2:]))
    assert torch.equal(model(x), clean_out)  # outside the context every token is clean
    with noisy_tokens(model, torch.ones(2, 4, dtype=torch.bool)):
        assert torch.allclose(model(x), noisy_out)
    split = torch.arange(4) >= 1
    with noisy_tokens(model, split.expand(2, 4)):
        assert torch.allclose(model(x), torch.where(split[:, None], noisy_out, clean_out))


def test_stream_roles_plan_once_per_token_count():
    roles = StreamRoles()
    roles.set(torch.tensor([[False, True, True], [True, False, True]]))
    kind, _, clean, noisy, inverse = roles.plan(3)
    assert kind == "mixed" and clean.tolist() == [0, 4] and noisy.tolist() == [1, 2, 3, 5]
    assert torch.cat([clean, noisy])[inverse].tolist() == list(range(6))
    assert roles.plan(1)[0] == "noisy" and roles.plan(3)[2] is clean
    roles.set(torch.tensor([[False, False, True]] * 2))  # the decoder's fused pass: clean columns, then noisy
    assert roles.plan(3)[:2] == ("split", 2) and roles.plan(2)[:2] == ("split", 1)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_the_clean_stream_is_the_original_model(family):
    model, split, tokenizer = split_copy(family)
    ids = torch.tensor([prompts_of(tokenizer, 1)[0]])
    with torch.no_grad():
        original = model(ids).logits
        assert torch.equal(split(ids).logits, original)
        with noisy_tokens(split, torch.zeros_like(ids, dtype=torch.bool)):
            assert torch.equal(split(ids).logits, original)
        with noisy_tokens(split, torch.ones_like(ids, dtype=torch.bool)):
            assert not torch.allclose(split(ids).logits, original, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma2"])
def test_verified_decoding_with_noisy_weights_equals_the_original_generate(family):
    """The noisy copies draft, the untouched model verifies: the output is the original model's
    greedy output, alone and in a padded batch, while the unverified drafts are the copies' own."""
    model, split, tokenizer = split_copy(family)
    prompts = prompts_of(tokenizer)
    original, engine = Engine(model, tokenizer), Engine(split, tokenizer)
    want = original.generate(prompts, "hf_generate", 20).sequences
    assert engine.generate(prompts, "hf_generate", 20).sequences == want
    for settings in (dict(threshold=0.1), dict(rule="top_k", top_k=2, sub_block_size=2, sub_block_cache=True)):
        assert engine.generate(prompts, "block_diffusion", 20, verify=True, **settings).sequences == want
        assert engine.generate(prompts[1:2], "block_diffusion", 20, verify=True, **settings).sequences == want[1:2]
    drafts = engine.generate(prompts, "block_diffusion", 20, threshold=0.1).sequences
    assert drafts != want and drafts != original.generate(prompts, "block_diffusion", 20, threshold=0.1).sequences


def test_saved_noisy_weights_load_back_and_plain_transformers_gets_the_original(tmp_path):
    from transformers import AutoModelForCausalLM

    model, split, tokenizer = split_copy("llama")
    split.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert save_noisy_weights(split, tmp_path, torch.float16) == [NOISY_WEIGHTS_FILE]
    ids = torch.tensor([prompts_of(tokenizer, 1)[0]])
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # no noisy keys in model.safetensors
    assert torch.equal(plain(ids).logits, model(ids).logits)
    loaded, _ = load_model(str(tmp_path))
    assert set(noisy_state_dict(loaded)) == set(noisy_state_dict(split))
    with torch.no_grad():
        for param in noisy_state_dict(split).values():  # what the float16 file holds
            param.copy_(param.half().float())
    noisy = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad(), noisy_tokens(loaded, noisy):
        ours = loaded(ids).logits
    with torch.no_grad(), noisy_tokens(split, noisy):
        assert torch.equal(ours, split(ids).logits)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    from leaplm.train.block_diffusion import load_block_diffusion_model

    with pytest.raises(ConfigError, match="distill a model adapted with shared weights"):
        load_block_diffusion_model(load_config(None, ["recipe=cd4lm", f"model.name_or_path={tmp_path}"]), "cd4lm")
    dparallel_cfg = load_config(None, ["recipe=dparallel", f"model.name_or_path={tmp_path}", "model.lora.r=0"])
    assert has_noisy_weights(load_block_diffusion_model(dparallel_cfg, "dparallel", allow_noisy_weights=True)[0])
    with pytest.raises(ConfigError, match="set model.lora.r=0"):
        Trainer(load_config(None, ["recipe=dparallel", f"model.name_or_path={tmp_path}", "model.lora.r=8",
                                   "rollout.decoder=block_diffusion", f"output_dir={tmp_path / 'run'}"])).setup()
    assert load_block_diffusion_model(load_config(None, ["recipe=learn2pd", f"model.name_or_path={tmp_path}"]),
                                      "learn2pd", allow_noisy_weights=True)[0] is not None


def test_ar2bd_with_separate_noisy_weights_trains_only_them(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    result, cfg = ar2bd_run(tmp_path, tiny_model_dir, "method.noisy_weights=separate", "method.ar_weight=0")
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    exported = tmp_path / "model"
    assert (exported / NOISY_WEIGHTS_FILE).is_file()
    base, tokenizer = load_model(str(tiny_model_dir))
    plain = AutoModelForCausalLM.from_pretrained(exported)
    trained, _ = load_model(str(exported))
    for name, param in plain.state_dict().items():  # the original weights, the mask token's mean row added
        if name in base.state_dict():
            reference = base.state_dict()[name]
            assert torch.equal(param[: reference.shape[0]], reference), name
    moved = [not torch.equal(p, trained.state_dict()[name.replace("noisy_", "")])
             for name, p in noisy_state_dict(trained).items()]
    assert all(moved)


def test_separate_noisy_weights_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="method.ar_weight=0"):
        load_config(None, ["recipe=ar2bd", "method.noisy_weights=separate", "method.ar_weight=0.5"])
    with pytest.raises(ConfigError, match="must be one of shared, separate"):
        load_config(None, ["recipe=ar2bd", "method.noisy_weights=both"])
    with pytest.raises(ConfigError, match="model.lora.r=0"):
        Trainer(load_config(None, ["recipe=ar2bd", "method.noisy_weights=separate", "model.lora.r=4",
                                   "model.name_or_path=tiny-teacher", f"output_dir={tmp_path}"])).setup()
