"""The inference engine: parity with HF generate on every family, batching, EOS, cache ops, sampling."""

from __future__ import annotations

import warnings

import pytest
import torch

from leaplm.data.sft import prompt_ids
from leaplm.data.tasks import make_split
from leaplm.inference.engine import (
    DECODERS,
    DecoderError,
    DecodeResult,
    Engine,
    PromptTooLongError,
    TokenPicker,
    crop_cache,
    fork_cache,
    get_decoder,
    new_cache,
    register_decoder,
    select_cache_rows,
)
from leaplm.models.heads import DraftHeads, HeadsConfig, attach_heads
from leaplm.models.zoo import (
    EMBEDDED_TEACHER,
    EMBEDDED_TEACHER_DIR,
    TINY_CONFIGS,
    TINY_FAMILIES,
    build_from_config,
    load_model,
    tiny_model,
)

MAX_NEW = 16


def lively(model: torch.nn.Module, scale: float = 3.0, seed: int = 0) -> torch.nn.Module:
    """Re-draw the layer weights larger so greedy output depends on the prompt.

    At the default init the residual stream is mostly the input embedding and tied-embedding
    families (Gemma) just repeat the last prompt token forever, which would make parity
    trivially true.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale / param.shape[-1] ** 0.5)
    return model


def chat_prompts(tokenizer, tasks=("copy", "word", "sort")) -> list[list[int]]:
    """Real task prompts of different lengths (so a batch needs left padding)."""
    examples = [ex for task in tasks for ex in make_split(task, "test", 1)]
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": ex.prompt}]) for ex in examples]
    assert len({len(p) for p in prompts}) == len(prompts)
    return prompts


def hf_greedy(model, prompts, max_new_tokens, stop_id, pad_id) -> list[list[int]]:
    """``model.generate`` on a left-padded batch, cut after the first stop token."""
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         do_sample=False, use_cache=True, eos_token_id=stop_id, pad_token_id=pad_id)
    sequences = []
    for row in out[:, width:].tolist():
        sequences.append(row[: row.index(stop_id) + 1] if stop_id in row else row)
    return sequences


def pick_stop_token(sequences: list[list[int]]) -> int:
    """A token of the first row that, used as EOS, ends the rows at the most different steps."""

    def ends(token: int) -> set[int]:
        return {s.index(token) if token in s else len(s) for s in sequences}

    return max(sequences[0][1:8], key=lambda token: len(ends(token)))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_greedy_ar_equals_hf_generate(family):
    model, tokenizer = tiny_model(family)
    lively(model)
    prompts = chat_prompts(tokenizer)

    # Batched with left padding, and one prompt alone (no padding, no mask at all).
    engine = Engine(model, tokenizer)
    eos = tokenizer.eos_token_id
    batched = engine.generate(prompts, "ar", max_new_tokens=MAX_NEW)
    assert batched.sequences == hf_greedy(model, prompts, MAX_NEW, eos, tokenizer.pad_token_id)
    assert len({tuple(s) for s in batched.sequences}) == len(prompts), "rows should differ; parity would be trivial"
    single = engine.generate(prompts[1:2], "ar", max_new_tokens=MAX_NEW)
    assert single.sequences == hf_greedy(model, prompts[1:2], MAX_NEW, eos, tokenizer.pad_token_id)

    # With a stop token that ends rows at different steps: finished rows must stop exactly
    # at their EOS while the others go on.
    stop = pick_stop_token(batched.sequences)
    stopping = Engine(model, tokenizer, stop_token_ids=[stop])
    out = stopping.generate(prompts, "ar", max_new_tokens=MAX_NEW)
    assert out.sequences == hf_greedy(model, prompts, MAX_NEW, stop, tokenizer.pad_token_id)
    lengths = [len(s) for s in out.sequences]
    assert len(set(lengths)) > 1 and min(lengths) < MAX_NEW
    for seq in out.sequences:
        assert stop not in seq[:-1]
        assert seq[-1] == stop or len(seq) == MAX_NEW
    assert out.stats.new_tokens == sum(lengths)
    assert out.stats.forward_passes == max(lengths)
    assert out.stats.tokens_per_forward == 1.0


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_decoding_uses_nothing_transformers_deprecates(family, tiny):
    """transformers announces what it will remove with FutureWarning or DeprecationWarning (in 5.x the
    old cache keyword warns on every call; models/cache.py picks the new one): generate's reference,
    decoding under a padding mask, under tree masks with a Hydra++ prefix layer and with a draft
    model raise none of them."""
    model, tokenizer = tiny(family)
    engine = Engine(model, tokenizer)
    prompts = chat_prompts(tokenizer)
    config = HeadsConfig(kind="hydra", num_heads=2, hidden_size=model.config.hidden_size,
                         vocab_size=model.config.vocab_size, prefix_layer=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        for decoder in ("hf_generate", "ar", "jacobi"):
            engine.generate(prompts, decoder, 4)
        engine.generate(prompts, "speculative", 4, draft=model)
        attach_heads(model, DraftHeads(config, model))
        try:
            engine.generate(prompts, "hydra", 4)
        finally:
            del model.draft_heads


def test_hf_generate_decoder_matches_ar(tiny):
    model, tokenizer = tiny("llama")
    engine = Engine(model, tokenizer)
    prompts = chat_prompts(tokenizer)
    ours = engine.generate(prompts, "ar", max_new_tokens=8)
    reference = engine.generate(prompts, "hf_generate", max_new_tokens=8)
    assert ours.sequences == reference.sequences
    assert ours.texts == reference.texts
    assert reference.stats.new_tokens == ours.stats.new_tokens


def test_texts_and_max_new_tokens_edges(tiny):
    model, tokenizer = tiny("qwen3")
    engine = Engine(model, tokenizer)
    prompts = chat_prompts(tokenizer)
    one = engine.generate(prompts, "ar", max_new_tokens=1)
    assert [len(s) for s in one.sequences] == [1, 1, 1]
    assert one.stats.forward_passes == 1
    longer = engine.generate(prompts, "ar", max_new_tokens=6)
    assert [s[:1] for s in longer.sequences] == one.sequences  # a longer budget extends, never changes
    assert longer.texts == tokenizer.batch_decode(longer.sequences, skip_special_tokens=True)
    empty = engine.generate([], "ar", max_new_tokens=4)
    assert empty.sequences == [] and empty.stats.new_tokens == 0


def test_sequences_end_at_eos_and_texts_skip_it(tiny, monkeypatch):
    """The engine cuts each row at its length and decodes without special tokens."""
    model, tokenizer = tiny("llama")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    hello = tokenizer("hi there", add_special_tokens=False)["input_ids"]

    def scripted(engine, batch, max_new_tokens):
        tokens = torch.tensor([hello + [eos, pad, pad], hello + hello[:1] + [eos, pad]])  # [b, n]
        lengths = torch.tensor([len(hello) + 1, len(hello) + 2])
        return DecodeResult(tokens, lengths, forward_passes=tokens.shape[1], row_forwards=lengths)

    monkeypatch.setitem(DECODERS, "scripted", scripted)
    out = Engine(model, tokenizer).generate([[5], [6, 7]], "scripted", max_new_tokens=8)
    assert out.sequences == [hello + [eos], hello + hello[:1] + [eos]]
    assert out.texts[0] == "hi there" and tokenizer.eos_token not in out.texts[1]
    assert out.stats.new_tokens == 2 * len(hello) + 3
    assert out.stats.sequence_forwards == 2 * len(hello) + 3


def test_model_mode_is_restored(tiny):
    model, tokenizer = tiny("llama")
    model.train()
    try:
        Engine(model, tokenizer).generate(chat_prompts(tokenizer)[:1], "ar", max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


def test_prompt_validation(tiny):
    model, tokenizer = tiny("llama")
    engine = Engine(model, tokenizer)
    limit = model.config.max_position_embeddings
    with pytest.raises(PromptTooLongError, match="lower max_new_tokens"):
        engine.generate([[5] * (limit - 10)], "ar", max_new_tokens=11)
    assert len(engine.generate([[5] * (limit - 10)], "ar", max_new_tokens=10).sequences[0]) == 10
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[5, 6], []], "ar", max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([[5, 6]], "ar", max_new_tokens=0)


def test_registry_errors(tiny):
    model, tokenizer = tiny("llama")
    with pytest.raises(DecoderError, match=r"unknown decoder 'nope'; available: .*ar.*hf_generate"):
        get_decoder("nope")
    with pytest.raises(DecoderError, match=r"no setting 'temprature'.*temperature, top_k, top_p, seed"):
        Engine(model, tokenizer).generate([[5, 6]], "ar", max_new_tokens=2, temprature=0.5)
    with pytest.raises(ValueError, match="already registered"):
        register_decoder("ar")(lambda engine, batch, max_new_tokens: None)
    assert get_decoder("ar") is DECODERS["ar"]


# ----- Cache building blocks ---------------------------------------------------------------


def prefill(engine, prompt):
    cache = new_cache()
    ids = torch.tensor([prompt])
    engine.forward(ids, cache, torch.arange(len(prompt))[None])
    return cache


def step_logits(engine, cache, tokens, start):
    """Logits of ``tokens`` [s] fed after ``cache`` at positions start..start+s-1; [s, v]."""
    ids = torch.tensor([tokens])
    positions = torch.arange(start, start + len(tokens))[None]
    return engine.forward(ids, cache, positions).logits[0]


def test_crop_then_redecode_equals_fresh(tiny):
    model, tokenizer = tiny("mistral")
    engine = Engine(model, tokenizer)
    prompt = chat_prompts(tokenizer)[0]
    with torch.inference_mode():
        cache = prefill(engine, prompt)
        fresh = step_logits(engine, fork_cache(cache), [10, 11, 12], len(prompt))
        step_logits(engine, cache, [40, 41, 42, 43], len(prompt))  # a rejected draft
        assert cache.get_seq_length() == len(prompt) + 4
        crop_cache(cache, len(prompt))
        assert cache.get_seq_length() == len(prompt)
        again = step_logits(engine, cache, [10, 11, 12], len(prompt))
        torch.testing.assert_close(again, fresh, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="cannot crop"):
            crop_cache(cache, len(prompt) + 10)


def test_fork_is_independent(tiny):
    model, tokenizer = tiny("qwen2")
    engine = Engine(model, tokenizer)
    prompt = chat_prompts(tokenizer)[0]
    with torch.inference_mode():
        cache = prefill(engine, prompt)
        before = step_logits(engine, fork_cache(cache), [7], len(prompt))
        fork = fork_cache(cache)
        step_logits(engine, fork, [50, 51], len(prompt))
        assert fork.get_seq_length() == len(prompt) + 2
        assert cache.get_seq_length() == len(prompt)
        torch.testing.assert_close(step_logits(engine, cache, [7], len(prompt)), before, rtol=0, atol=0)


def test_select_rows_keeps_those_rows(tiny):
    model, tokenizer = tiny("llama")
    engine = Engine(model, tokenizer)
    prompts = chat_prompts(tokenizer)
    with torch.inference_mode():
        batch = engine.prepare(prompts, max_new_tokens=1)
        cache = new_cache()
        engine.forward(batch.input_ids, cache, batch.position_ids, batch.attention_mask)
        select_cache_rows(cache, torch.tensor([2, 0]))
        mask = torch.cat([batch.attention_mask[[2, 0]], torch.ones(2, 1, dtype=torch.long)], dim=1)
        picked = engine.forward(torch.tensor([[9], [9]]), cache, batch.lengths[[2, 0]][:, None], mask).logits[:, -1]
        for row, prompt in zip(picked, (prompts[2], prompts[0])):
            alone = step_logits(engine, prefill(engine, prompt), [9], len(prompt))[-1]
            torch.testing.assert_close(row, alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3", "mistral"])
def test_custom_causal_mask_equals_padding_mask(family, tiny):
    """A custom lower-triangular pattern must reproduce the model's own causal masking.

    A sliding window of 8 (shorter than the sequence) checks that the engine applies windows
    to custom masks like transformers does, for single-mask (Mistral), per-layer-type
    (Gemma2/3) and eager-attention (Gemma2) models.
    """
    tokenizer = tiny("llama")[1]
    config = dict(TINY_CONFIGS[family], sliding_window=8) if family != "llama" else TINY_CONFIGS[family]
    model = build_from_config(config, tokenizer).eval()
    engine = Engine(model, tokenizer)
    prompts = chat_prompts(tokenizer)[:2]
    new = torch.tensor([[21, 22, 23, 24, 25], [31, 32, 33, 34, 35]])  # [b, s]
    with torch.inference_mode():
        batch = engine.prepare(prompts, max_new_tokens=5)
        positions = batch.lengths[:, None] + torch.arange(5)[None]  # [b, s]
        padding = torch.cat([batch.attention_mask, torch.ones(2, 5, dtype=torch.long)], dim=1)  # [b, p + s]

        def run(**mask):
            cache = new_cache()
            engine.forward(batch.input_ids, cache, batch.position_ids, batch.attention_mask)
            return engine.forward(new, cache, positions, **mask).logits

        reference = run(attention_mask=padding)
        causal = torch.ones(5, 5, dtype=torch.bool).tril()
        custom = run(custom_mask=engine.mask_for_new_tokens(padding, causal))
        torch.testing.assert_close(custom, reference, rtol=1e-5, atol=1e-5)
        bidirectional = run(custom_mask=engine.mask_for_new_tokens(padding, torch.ones(5, 5, dtype=torch.bool)))
        assert not torch.allclose(bidirectional[:, 0], reference[:, 0], atol=1e-4)  # the pattern is really used


def test_sliding_window_models_decode_beyond_the_window(tiny):
    """Our cache keeps every position; decoding past the window must still match generate."""
    tokenizer = tiny("llama")[1]
    for family in ("mistral", "gemma3"):
        model = lively(build_from_config(dict(TINY_CONFIGS[family], sliding_window=8), tokenizer).eval())
        prompts = chat_prompts(tokenizer)
        ours = Engine(model, tokenizer).generate(prompts, "ar", max_new_tokens=MAX_NEW).sequences
        assert ours == hf_greedy(model, prompts, MAX_NEW, tokenizer.eos_token_id, tokenizer.pad_token_id)


# ----- Sampling ------------------------------------------------------------------------------


def test_sampling_is_seeded_and_reproducible(tiny):
    model, tokenizer = tiny("llama")
    engine = Engine(model, tokenizer)
    prompts = chat_prompts(tokenizer)
    a = engine.generate(prompts, "ar", max_new_tokens=12, temperature=1.0, seed=1)
    b = engine.generate(prompts, "ar", max_new_tokens=12, temperature=1.0, seed=1)
    c = engine.generate(prompts, "ar", max_new_tokens=12, temperature=1.0, seed=2)
    assert a.sequences == b.sequences
    assert a.sequences != c.sequences
    greedy = engine.generate(prompts, "ar", max_new_tokens=12)
    assert a.sequences != greedy.sequences
    cold = engine.generate(prompts, "ar", max_new_tokens=12, temperature=1e-6, seed=3)
    assert cold.sequences == greedy.sequences
    top1 = engine.generate(prompts, "ar", max_new_tokens=12, temperature=1.0, top_k=1, seed=4)
    assert top1.sequences == greedy.sequences


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, 0.2]])
    n = 40_000
    batch = logits.expand(n, -1)

    def frequencies(picker):
        return torch.bincount(picker(batch), minlength=logits.shape[1]).float() / n

    def expected(temperature, keep):
        scaled = logits[0] / temperature
        scaled = scaled.masked_fill(~keep, float("-inf"))
        return scaled.softmax(-1)

    everything = torch.ones(8, dtype=torch.bool)
    torch.testing.assert_close(frequencies(TokenPicker(torch.device("cpu"), 0.7, seed=0)),
                               expected(0.7, everything), atol=0.01, rtol=0)
    top3 = torch.zeros(8, dtype=torch.bool)
    top3[:3] = True
    torch.testing.assert_close(frequencies(TokenPicker(torch.device("cpu"), 1.0, top_k=3, seed=0)),
                               expected(1.0, top3), atol=0.01, rtol=0)
    # Nucleus 0.7 at T=1: sorted probabilities are .39, .24, .14, ...; the first two hold .63 < .7,
    # so the third is needed and nothing after it.
    probs = logits[0].softmax(-1)
    nucleus = probs >= probs.sort(descending=True).values[2]
    torch.testing.assert_close(frequencies(TokenPicker(torch.device("cpu"), 1.0, top_p=0.7, seed=0)),
                               expected(1.0, nucleus), atol=0.01, rtol=0)
    with pytest.raises(DecoderError, match="top_p"):
        TokenPicker(torch.device("cpu"), 1.0, top_p=0.0)
    with pytest.raises(DecoderError, match="temperature"):
        TokenPicker(torch.device("cpu"), -1.0)


@pytest.mark.skipif(not (EMBEDDED_TEACHER_DIR / "config.json").is_file(), reason="teacher weights not built yet")
def test_greedy_ar_equals_hf_generate_on_the_embedded_teacher():
    model, tokenizer = load_model(EMBEDDED_TEACHER)
    prompts = chat_prompts(tokenizer, tasks=("copy", "arith", "word", "story"))
    ours = Engine(model.eval(), tokenizer).generate(prompts, "ar", max_new_tokens=64)
    assert ours.sequences == hf_greedy(model, prompts, 64, tokenizer.eos_token_id, tokenizer.pad_token_id)


@pytest.mark.slow  # compiles the model: about two minutes on 2 CPU cores
def test_compiled_ar_step_equals_ar():
    model, tokenizer = load_model("tiny-teacher")
    engine = Engine(model, tokenizer)
    prompts = chat_prompts(tokenizer, tasks=("copy", "word", "story"))  # different lengths: left padding
    want = engine.generate(prompts, "ar", 24).sequences
    assert engine.generate(prompts, "ar", 24, compile_step=True).sequences == want
