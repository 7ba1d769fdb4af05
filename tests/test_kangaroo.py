"""Kangaroo: the early-exit helpers against Hugging Face's hidden states and logits (sliding windows
included), the decoder equal to generate on several families (padded batches, alone, fixed and
cost-sized draft lengths, an oracle adapter whose every draft is accepted), the adapter and loss
against a hand computation, and the recipe through the trainer with its export loading back."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import leaplm.ship
from leaplm.config import ConfigError
from leaplm.data.sft import IGNORE_INDEX
from leaplm.data.tasks import make_split
from leaplm.inference.decoders.kangaroo import causal_mask
from leaplm.inference.engine import DecoderError, Engine, check_decoder_settings, new_cache
from leaplm.inference.evaluate import task_prompts
from leaplm.models.early_exit import decoder_layers, first_layers, later_layers
from leaplm.models.kangaroo import KangarooAdapter, KangarooConfig, attach_kangaroo
from leaplm.models.zoo import build_from_config, load_model, load_tokenizer
from leaplm.train import kangaroo as recipe
from leaplm.train.recipes import load_config
from leaplm.train.trainer import train

from conftest import SMALL_ROLLOUT_RUN

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "kangaroo" / "tiny_teacher.yaml"
SMALL = [*SMALL_ROLLOUT_RUN, "rollout.max_prompts=6", "method.rollout_block_size=8", "train.micro_batch_size=4"]
FAMILIES = ["llama", "qwen2", "gemma2", "mistral"]
MAX_NEW = 24


def random_adapter(model, exit_layer: int = 1, seed: int = 0) -> KangarooAdapter:
    """An adapter with random weights on ``model``."""
    text = model.config.get_text_config()
    adapter = KangarooAdapter(KangarooConfig(hidden_size=text.hidden_size, vocab_size=text.vocab_size,
                                             exit_layer=exit_layer), model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
    return attach_kangaroo(model, adapter)


def prompts_of(tokenizer) -> list[list[int]]:
    return task_prompts(tokenizer, [make_split(task, "test", 1)[0] for task in ("copy", "word", "sort")])


# ----- Running part of the layers ---------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_first_layers_give_the_exit_hidden_state_and_later_layers_the_logits(family, lively_tiny):
    model, _ = lively_tiny(family)
    ids = torch.randint(model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, output_hidden_states=True)
        exited = first_layers(model, 1, lambda: model(ids))
        with later_layers(model, 1, exited):
            logits = model(ids).logits
        torch.testing.assert_close(exited, full.hidden_states[1], rtol=0, atol=0)
        torch.testing.assert_close(logits, full.logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(model(ids).logits, full.logits)  # the layers are themselves again afterwards


@pytest.mark.parametrize("family", FAMILIES)
def test_split_decoding_on_a_cache_equals_a_whole_forward_past_the_sliding_window(family, lively_tiny):
    """A prompt, then new tokens in chunks: the first layers cache them while giving their exit states,
    the later layers (told their own past length) give the logits of one forward over everything;
    the window of 8 is crossed on the families that have one."""
    model, tokenizer = lively_tiny(family, **({"sliding_window": 8} if family in ("gemma2", "mistral") else {}))
    engine = Engine(model, tokenizer)
    ids = torch.randint(model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(ids).logits  # [1, 20, V]
        cache = new_cache()
        engine.forward(ids[:, :9], cache, torch.arange(9)[None])
        start = 9
        for width in (1, 4, 3, 3):
            new = ids[:, start:start + width]
            positions = torch.arange(start, start + width)[None]
            allowed = causal_mask(torch.ones(1, start, dtype=torch.bool), width)
            exited = first_layers(model, 1, lambda: engine.forward(new, cache, positions, custom_mask=allowed))
            assert [layer.keys.shape[2] for layer in cache.layers] == [start + width, start]
            with later_layers(model, 1, exited):
                logits = engine.forward(new, cache, positions, custom_mask=allowed, past_length=start).logits
            torch.testing.assert_close(logits, reference[:, start:start + width], rtol=1e-4, atol=1e-4)
            start += width


def test_a_model_without_decoder_layers_is_refused_by_name():
    tokenizer = load_tokenizer("tiny-teacher")
    gpt2 = build_from_config(dict(architecture="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512), tokenizer)
    with pytest.raises(ValueError, match=r"GPT2Model keeps no decoder layers in `.layers`"):
        decoder_layers(gpt2)


def test_a_split_must_leave_layers_on_both_sides(tiny):
    model, _ = tiny("llama")
    for n in (0, 2):
        with pytest.raises(ValueError, match=r"1 <= n <= 1 for this model's 2 layers"):
            first_layers(model, n, lambda: None)


# ----- The adapter --------------------------------------------------------------------------------


def test_the_adapter_starts_from_the_next_layer_on_llama_like_targets_only(tiny):
    llama, _ = tiny("llama")
    qwen2, _ = tiny("qwen2")
    text = llama.config
    start = KangarooAdapter(KangarooConfig(hidden_size=text.hidden_size, vocab_size=text.vocab_size, exit_layer=1),
                            llama)
    layer = decoder_layers(llama)[1]
    assert start.started_from_target
    assert torch.equal(start.self_attn.q_proj.weight, layer.self_attn.q_proj.weight)
    assert torch.equal(start.input_layernorm.weight, layer.input_layernorm.weight)
    assert torch.equal(start.norm.weight, llama.get_decoder().norm.weight)
    other = KangarooAdapter(KangarooConfig(hidden_size=text.hidden_size, vocab_size=text.vocab_size, exit_layer=1),
                            qwen2)
    assert not other.started_from_target
    assert not torch.equal(other.self_attn.q_proj.weight, decoder_layers(qwen2)[1].self_attn.q_proj.weight)
    assert [name for name, _ in start.named_parameters()] == [
        "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.o_proj.weight", "norm.weight"]  # no MLP, no head of its own


def by_hand(adapter: KangarooAdapter, hidden: torch.Tensor) -> torch.Tensor:
    """The adapter over one unpadded row [T, H], written out: RMSNorm, rotary multi-head attention
    (causal, grouped keys), residual, RMSNorm."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def rms(x, weight, eps=adapter.input_layernorm.eps):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    attn = adapter.self_attn
    T = hidden.shape[0]
    x = rms(hidden, adapter.input_layernorm.weight)
    q = (x @ attn.q_proj.weight.T).view(T, attn.heads, -1).transpose(0, 1)  # [heads, T, d]
    k = (x @ attn.k_proj.weight.T).view(T, attn.kv_heads, -1).transpose(0, 1)
    v = (x @ attn.v_proj.weight.T).view(T, attn.kv_heads, -1).transpose(0, 1)
    cos, sin = adapter.rotary(hidden[None], torch.arange(T)[None])
    q, k = apply_rotary_pos_emb(q[None], k[None], cos, sin)
    group = attn.heads // attn.kv_heads
    k, v = k[0].repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    scores = q[0] @ k.transpose(1, 2) / attn.head_dim ** 0.5  # [heads, T, T]
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, -1) @ attn.o_proj.weight.T
    return rms(hidden + out, adapter.norm.weight)


def test_loss_matches_a_per_position_reference(tmp_path):
    cfg = load_config(CONFIG, [*SMALL, f"output_dir={tmp_path}", "method.exit_layer=2"])
    model, tokenizer = recipe.build_model(cfg)
    adapter = model.kangaroo
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    samples = [{"input_ids": [5, 6, 8, 10, 12, 14, 9], "labels": [IGNORE_INDEX] * 2 + [8, 10, 12, 14, 9]},
               {"input_ids": [11, 12, 14, 16], "labels": [IGNORE_INDEX, 12, 14, 16]}]
    batch = {**recipe.RECIPE.build_collator(cfg, tokenizer)(samples), "step": 0}
    total, metrics = recipe.loss(model, batch, cfg)
    expected, proxy = 0.0, []
    for s in samples:
        ids = torch.tensor([s["input_ids"]])
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
            exited = out.hidden_states[cfg.method.exit_layer]  # [1, T, H]
            hand = by_hand(adapter, exited[0])  # [T, H]
            torch.testing.assert_close(recipe.adapter_outputs(adapter, exited, torch.ones_like(ids))[0], hand,
                                       rtol=1e-4, atol=1e-5)
        for t in range(len(s["input_ids"]) - 1):
            if s["labels"][t + 1] != IGNORE_INDEX:  # the target's distribution at t: the model's own logits
                p = F.softmax(out.logits[0, t], -1)
                q = F.log_softmax(model.lm_head(hand[t]), -1)
                expected += -(p * q).sum()
                proxy.append(float(torch.minimum(p, q.exp()).sum()))
    assert batch["n_targets"] == 8
    assert total.detach().item() == pytest.approx(float(expected), rel=1e-4)
    assert set(metrics) == {"adapter0_top1", "accept_proxy"}
    assert metrics["accept_proxy"] == pytest.approx(sum(proxy) / len(proxy), rel=1e-4)


# ----- The decoder ------------------------------------------------------------------------------


SETTINGS = ({}, dict(adaptive=False), dict(adaptive=False, threshold=0.0, steps=4),
            dict(adaptive=False, threshold=1.0, steps=2))


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_kangaroo_equals_generate(family, lively_tiny):
    model, tokenizer = lively_tiny(family)
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)
    reference = engine.generate(prompts, "hf_generate", MAX_NEW).sequences
    assert len({tuple(s) for s in reference}) > 1 and len({len(p) for p in prompts}) > 1  # a padded batch
    try:
        random_adapter(model)
        for settings in SETTINGS:
            assert engine.generate(prompts, "kangaroo", MAX_NEW, **settings).sequences == reference, settings
            assert engine.generate(prompts[1:2], "kangaroo", MAX_NEW, **settings).sequences == reference[1:2]
    finally:
        del model.kangaroo


class Oracle(nn.Module):
    """Stands in for the adapter: its output carries each position, and its logits put the reference
    answer's token there, so each draft is the target's greedy token: every one is accepted, except
    every ``wrong``-th position's (the token after it instead), whose round stops there."""

    def __init__(self, reference: list[list[int]], lengths: list[int], vocab: int, wrong: int = 0):
        super().__init__()
        self.config = KangarooConfig(hidden_size=1, vocab_size=vocab, exit_layer=1)
        self.answers = [torch.tensor(r + [r[-1]] * 40) for r in reference]
        self.lengths, self.vocab, self.wrong = lengths, vocab, wrong

    def forward(self, hidden, positions, allowed, past=None):
        b, s = positions.shape
        kv = hidden.new_zeros(b, 1, s, 1)
        return positions[..., None].to(hidden.dtype).expand(-1, -1, hidden.shape[-1]), (kv, kv)

    def logits(self, out):
        position = out[:, 0].long()  # [b] predicting the token after it
        index = [int(p) + 1 - n for p, n in zip(position, self.lengths)]
        tokens = torch.stack([a[min(max(i, 0), len(a) - 1)] for a, i in zip(self.answers, index)])
        if self.wrong:
            off = torch.tensor([i % self.wrong == self.wrong - 1 for i in index])
            tokens = torch.where(off, (tokens + 1) % self.vocab, tokens)
        return F.one_hot(tokens, self.vocab).float() * 30


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_an_oracle_adapters_drafts_are_all_accepted(family, lively_tiny):
    """Every round accepts every draft, so the adapter always catches up on the last draft's state
    (never run through it) with the root's; then the same with a wrong draft now and then; the
    output stays generate's and the rounds commit steps + 1 tokens."""
    model, tokenizer = lively_tiny(family)
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)
    reference = engine.generate(prompts, "hf_generate", MAX_NEW).sequences
    lengths = [len(p) for p in prompts]
    try:
        model.kangaroo = Oracle(reference, lengths, model.config.vocab_size)
        out = engine.generate(prompts, "kangaroo", MAX_NEW, steps=3, adaptive=False)
        assert out.sequences == reference
        assert out.stats.forward_passes == 1 + math.ceil((max(map(len, reference)) - 1) / 4)
        alone = engine.generate(prompts[:1], "kangaroo", MAX_NEW, steps=5, adaptive=False)
        assert alone.sequences == reference[:1] and alone.stats.tokens_per_forward > 3
        model.kangaroo = Oracle(reference, lengths, model.config.vocab_size, wrong=3)
        for settings in (dict(steps=4, adaptive=False), {}):
            out = engine.generate(prompts, "kangaroo", MAX_NEW, **settings)
            assert out.sequences == reference and out.stats.tokens_per_forward > 1.5, settings
    finally:
        del model.kangaroo


def test_a_plain_step_leaves_the_adapter_to_catch_up(lively_tiny, monkeypatch):
    """Rounds that draft nothing (width 1: the whole target on the root) alternate with drafting
    rounds: the adapter then catches up on every state it missed; output unchanged."""
    from leaplm.inference.decoders import kangaroo as decoder

    model, tokenizer = lively_tiny("llama")
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)
    reference = engine.generate(prompts, "hf_generate", MAX_NEW).sequences

    class Alternating:
        def __init__(self):
            self.calls, self.seen = 0, []

        def choose(self):
            self.calls += 1
            return 1 if self.calls % 3 else 4

        def observe(self, width, tokens):
            self.seen.append(width)

    chooser = Alternating()
    monkeypatch.setattr(decoder, "width_chooser", lambda *args, **kwargs: chooser)
    try:
        model.kangaroo = Oracle(reference, [len(p) for p in prompts], model.config.vocab_size)
        out = engine.generate(prompts, "kangaroo", MAX_NEW)
        assert out.sequences == reference and {1, 4} <= set(chooser.seen)
    finally:
        del model.kangaroo


@pytest.mark.parametrize("settings,message", [
    ({"steps": 0}, "steps must be an integer >= 1"), ({"steps": 2.5}, "steps must be an integer >= 1"),
    ({"threshold": 1.5}, r"threshold must be in \[0, 1\]"), ({"adaptive": "yes"}, "adaptive must be true or false"),
    ({"tree_size": 4}, "has no setting 'tree_size'"),
])
def test_decoder_settings_are_checked_before_any_model(settings, message):
    with pytest.raises(DecoderError, match=message):
        check_decoder_settings("kangaroo", settings)


def test_decoding_without_an_adapter_names_the_fix(tiny):
    model, tokenizer = tiny("llama")
    with pytest.raises(ValueError, match="configs/kangaroo"):
        Engine(model, tokenizer).generate(prompts_of(tokenizer)[:1], "kangaroo", 4)


# ----- The recipe -------------------------------------------------------------------------------


def test_recipe_trains_exports_and_decodes_losslessly(tmp_path):
    out = tmp_path / "model"
    result = train(load_config(CONFIG, [*SMALL, f"output_dir={tmp_path}", "train.max_steps=3", f"export.dir={out}"]))
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    assert {"kangaroo.safetensors", "kangaroo.json"} <= {p.name for p in out.iterdir()}
    fast = leaplm.ship.load(out)
    adapter = fast.model.kangaroo
    assert fast.decoder == "kangaroo" and adapter.config.exit_layer == 1 and adapter.accuracy.any()
    assert sum(p.numel() for p in adapter.parameters()) == 2 * 256 * 256 + 2 * 256 * 128 + 2 * 256
    assert not any(key.startswith("kangaroo.") for key in load_file(str(out / "model.safetensors")))  # beside them
    prompts = task_prompts(fast.tokenizer, make_split("copy", "test", 2) + make_split("sort", "test", 1))
    reference = fast.engine.generate(prompts, "hf_generate", 24)
    decoded = fast.generate(prompts, max_new_tokens=24)
    assert decoded.sequences == reference.sequences and decoded.stats.tokens_per_forward > 1
    model, _ = load_model(str(out))  # the zoo's loader attaches it too
    assert torch.equal(model.kangaroo.self_attn.o_proj.weight, adapter.self_attn.o_proj.weight)


def test_offline_training_is_the_online_run(tmp_path):
    """With the target's states cached once, training reads them instead of running the target, and
    follows the same loss curve."""
    common = [*SMALL, "train.max_steps=3", "export.dir=null"]
    online = train(load_config(CONFIG, [*common, f"output_dir={tmp_path / 'online'}"]))
    offline = train(load_config(CONFIG, [*common, f"output_dir={tmp_path / 'offline'}", "method.offline=true"]))
    assert list((tmp_path / "offline" / "features").glob("*/shard-00000.safetensors"))
    assert offline.losses == pytest.approx(online.losses, rel=1e-5)


@pytest.mark.parametrize("override,message", [
    ("method.exit_layer=0", "exit_layer must be >= 1"), ("method.exit_layer=6", r"1\.\.5 for the target's 6 layers"),
    ("model.lora.r=8", "frozen"), ("rollout.temperature=0.7", "greedy rollouts"),
])
def test_errors(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        cfg = load_config(CONFIG, [f"output_dir={tmp_path}", override])
        recipe.build_model(cfg)
