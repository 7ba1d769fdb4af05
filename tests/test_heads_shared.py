"""Draft heads that project through the base's own LM head (``shared_lm_head``): the same logits
as separate copies of it, nothing of the base saved or trained with them, lossless tree decoding
after a reload, and old head files that lack the setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_draft_heads import MAX_NEW, prompts_of

from leaplm.inference.engine import Engine
from leaplm.models.heads import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    DraftHeads,
    HeadsConfig,
    attach_heads,
    lm_logits,
    load_heads,
    save_heads,
)
from leaplm.models.zoo import TINY_FAMILIES, load_model, tiny_model
from leaplm.train import draft_heads
from leaplm.train.recipes import load_config
from leaplm.train.trainer import apply_lora

from conftest import SMALL_ROLLOUT_RUN

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "draft_heads"


def heads_config(model, kind: str, shared: bool, prefix: bool = False) -> HeadsConfig:
    return HeadsConfig(kind=kind, num_heads=3, hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size,
                       prefix_layer=prefix, shared_lm_head=shared)


def perturbed(heads: DraftHeads, seed: int = 0) -> DraftHeads:
    """Heads whose blocks (and prefix layer) are no longer the identity they start as."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in heads.named_parameters():
            if not name.startswith("lm_heads"):
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return heads


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_shared_heads_give_the_logits_of_separate_copies_of_the_base_head(kind, tiny):
    model, _ = tiny("qwen2")
    separate = perturbed(DraftHeads(heads_config(model, kind, shared=False), model))
    shared = DraftHeads(heads_config(model, kind, shared=True), model)
    own = {k: v for k, v in separate.state_dict().items() if not k.startswith("lm_heads")}
    shared.load_state_dict(own)  # strict: the shared heads hold exactly the blocks, nothing of the base
    hidden = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(1))  # [b, t, H]
    for k in range(3):
        embeds = torch.randn(2, 5, k + 1, model.config.hidden_size) if kind == "hydra" else None
        with torch.no_grad():
            torch.testing.assert_close(shared.head(k, hidden, embeds), separate.head(k, hidden, embeds), rtol=0, atol=0)


def test_shared_heads_keep_the_base_head_out_of_their_parameters_and_files(tmp_path, tiny):
    model, _ = tiny("llama")
    heads = DraftHeads(heads_config(model, "medusa", shared=True), model)
    base_head = model.get_output_embeddings().weight
    assert not any(p is base_head for p in heads.parameters())
    assert sum(p.numel() for p in heads.parameters()) == 3 * (64 * 64 + 64)  # the blocks only
    save_heads(heads, tmp_path)
    assert not any("lm_head" in key for key in load_file(tmp_path / WEIGHTS_FILE))
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["shared_lm_head"] is True
    with pytest.raises(ValueError, match="pass base="):
        DraftHeads(heads_config(model, "medusa", shared=True))
    with pytest.raises(ValueError, match="set shared_lm_head=false"):
        HeadsConfig(kind="acceptance", num_heads=1, hidden_size=64, shared_lm_head=True)


def test_the_recipe_trains_only_the_blocks_and_the_base_head_stays_frozen_under_lora(tmp_path):
    overrides = [*SMALL_ROLLOUT_RUN, f"output_dir={tmp_path}", "method.num_heads=2", "method.shared_lm_head=true",
                 "method.schedule=constant"]  # the config's sine warm-up weighs the heads 0 at step 0
    cfg = load_config(CONFIGS / "tiny_teacher_medusa2.yaml", overrides)
    model, tokenizer = draft_heads.build_model(cfg)
    model = apply_lora(model, cfg)
    for name in draft_heads.RECIPE.trained_in_full:
        model.get_base_model().get_submodule(name).requires_grad_(True)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in name or ".draft_heads.blocks." in name for name in trained), trained
    samples = [{"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100] * 2 + [7, 8, 9, 10], "index": 0}]
    batch = {**draft_heads.RECIPE.build_collator(cfg, tokenizer)(samples), "step": 0}
    total, _ = draft_heads.loss(model, batch, cfg)
    total.backward()
    assert model.get_base_model().get_output_embeddings().weight.grad is None
    assert model.get_base_model().draft_heads.blocks[0][0].linear.weight.grad.abs().sum() > 0


def test_old_head_files_without_the_setting_load_as_separate_heads(tmp_path, tiny):
    model, _ = tiny("llama")
    heads = DraftHeads(heads_config(model, "medusa", shared=False), model)
    save_heads(heads, tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    del config["shared_lm_head"]  # what files written before the setting existed hold
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    try:
        loaded = load_heads(tmp_path, model)
        assert not loaded.config.shared_lm_head and len(loaded.lm_heads) == 3
    finally:
        del model.draft_heads


@pytest.mark.parametrize("kind,prefix", [("medusa", False), ("hydra", True)])
def test_saved_shared_heads_reload_identically_and_decode_losslessly(kind, prefix, tmp_path, lively_tiny):
    model, tokenizer = lively_tiny("llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    heads = perturbed(DraftHeads(heads_config(model, kind, shared=True, prefix=prefix), model))
    save_heads(heads, tmp_path)
    loaded, _ = load_model(str(tmp_path))
    reloaded = loaded.draft_heads
    assert reloaded.config.shared_lm_head and reloaded.lm_heads is None and reloaded.base is loaded
    assert heads.state_dict().keys() == reloaded.state_dict().keys()
    for (name, a), b in zip(heads.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    engine = Engine(loaded, tokenizer)
    prompts = prompts_of(tokenizer)
    reference = engine.generate(prompts, "hf_generate", MAX_NEW).sequences
    assert engine.generate(prompts, kind, MAX_NEW).sequences == reference
    attach_heads(model, heads)
    try:  # the heads on the model they were built on decode the same
        assert Engine(model, tokenizer).generate(prompts, kind, MAX_NEW).sequences == reference
    finally:
        del model.draft_heads


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_lm_logits_are_the_logits_of_the_model_s_own_forward(family):
    """The heads' and Hydra++'s distillation targets: the base's head on its last hidden state,
    then whatever the family does to its logits (Cohere's and Granite's scales, Gemma 2's cap)."""
    model, _ = tiny_model(family)
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        torch.testing.assert_close(lm_logits(model, out.hidden_states[-1]), out.logits, rtol=1e-4, atol=1e-5)
