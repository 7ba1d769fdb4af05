"""The Jacobi decoders: greedy parity with generate on every family and the embedded teacher,
hand-counted forwards, per-row progress, stops, recycling, setting errors, Speculative Jacobi
sampling against the exact distribution, and trajectory collection against a no-cache reference."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from leaplm.cli import main
from leaplm.data.tasks import TASKS, make_split
from leaplm.inference.decoders import jacobi as jacobi_module
from leaplm.inference.decoders.jacobi import (
    NgramPool,
    collect_jacobi_trajectories,
    jacobi,
    jacobi_multiblock,
    lookup_continuation,
)
from leaplm.inference.engine import DecoderError, Engine, TokenPicker, new_cache, shift_cache_rows
from leaplm.inference.evaluate import task_prompts
from leaplm.models.zoo import TINY_FAMILIES, load_model, tiny_model

MAX_NEW = 24
MULTIBLOCK = dict(jacobi_block_size=4, n_blocks=2, spawn_ratio=0.5)
# Families whose random answers at the default scale never repeat within MAX_NEW tokens, so that no
# guess is ever accepted and parity would be the AR case only: a scale at which they cycle.
LIVELY_SCALE = {"phi3": 0.5, "granite": 2.0}


def prompts_of(tokenizer, tasks=("copy", "word", "sort")) -> list[list[int]]:
    """Chat-formatted task prompts of different lengths, so a batch needs left padding."""
    prompts = task_prompts(tokenizer, [make_split(task, "test", 1)[0] for task in tasks])
    assert len({len(p) for p in prompts}) == len(prompts)
    return prompts


def decode(decoder, engine: Engine, prompts: list[list[int]], max_new_tokens: int = MAX_NEW, **settings):
    """Call a decoder directly, for the per-row forward counts that ``generate`` sums away."""
    with torch.inference_mode():
        return decoder(engine, engine.prepare(prompts, max_new_tokens), max_new_tokens, **settings)


# ----- Greedy parity ------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_greedy_equals_generate_and_ar(family, lively_tiny):
    model, tokenizer = lively_tiny(family, scale=LIVELY_SCALE.get(family, 1.0))
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)
    reference = engine.generate(prompts, "hf_generate", MAX_NEW).sequences
    assert engine.generate(prompts, "ar", MAX_NEW).sequences == reference
    assert len({tuple(s) for s in reference}) > 1, "rows should differ; batched parity would be trivial"
    parallel = 0.0
    for decoder, settings in (("jacobi", dict(jacobi_block_size=4)), ("jacobi", dict(jacobi_block_size=16)),
                              ("jacobi", dict(jacobi_block_size=4, init="lookup")), ("jacobi_multiblock", MULTIBLOCK),
                              ("jacobi_multiblock", dict(MULTIBLOCK, init="lookup"))):
        for adaptive in (False, True):  # every guess fed; widths sized by cost (test_widths_never_change_... too)
            batched = engine.generate(prompts, decoder, MAX_NEW, adaptive=adaptive, **settings)
            assert batched.sequences == reference, (decoder, settings, adaptive)
            assert engine.generate(prompts[1:2], decoder, MAX_NEW, adaptive=adaptive,
                                   **settings).sequences == reference[1:2]
            assert batched.stats.tokens_per_forward >= 1.0
            if not adaptive:
                parallel = max(parallel, batched.stats.tokens_per_forward)
    assert parallel > 1.0, "no forward accepted a guess; parity would be the AR case only"


class ScriptedWidths:
    """A stand-in for the engine's WidthChooser that cycles through fixed widths, so a test sees
    every width, wide and narrow, at every stage of a block."""

    def __init__(self, widths):
        self.widths, self.step, self.seen = list(widths), 0, []

    def choose(self) -> int:
        self.step += 1
        return self.widths[(self.step - 1) % len(self.widths)]

    def observe(self, k: int, tokens: float) -> None:
        self.seen.append((k, tokens))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "phi3"])
def test_widths_never_change_greedy_output(family, lively_tiny):
    """Feeding only some of the guesses (any width, 1 included) keeps greedy output equal to
    generate's, single block and multi-block, with padded batches."""
    model, tokenizer = lively_tiny(family, scale=LIVELY_SCALE.get(family, 1.0))
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)
    reference = engine.generate(prompts, "hf_generate", MAX_NEW).sequences
    pick = TokenPicker(torch.device("cpu"))
    accepted = 0.0
    for settings in (dict(jacobi_block_size=6), dict(jacobi_block_size=4, n_blocks=2, spawn_ratio=0.5),
                     dict(jacobi_block_size=6, init="lookup")):
        chooser = ScriptedWidths([3, 1, 7, 2, 5, 1, 4])
        # with init="lookup", prompt lookup refreshes the guesses every step it matches
        lookup_chooser = ScriptedWidths([6, 2, 1, 4]) if settings.get("init") == "lookup" else None
        with torch.inference_mode():
            result = jacobi_module.jacobi_decode(engine, engine.prepare(prompts, MAX_NEW), MAX_NEW, seed=0, pick=pick,
                                                 chooser=chooser, lookup_chooser=lookup_chooser,
                                                 **{"init": "prompt", **settings})
        assert [row[:n] for row, n in zip(result.tokens.tolist(), result.lengths.tolist())] == reference, settings
        seen = chooser.seen + (lookup_chooser.seen if lookup_chooser is not None else [])
        assert len({k for k, _ in seen}) >= 4
        assert all(tokens == 1.0 for k, tokens in seen if k == 1)  # a 1-token step is an AR step
        accepted = max(accepted, max(tokens for _, tokens in seen))
        if lookup_chooser is not None:
            assert lookup_chooser.seen, "prompt lookup never matched; the refresh would go untested"
    assert accepted > 1.0, "no narrowed forward accepted a guess"


def test_rows_progress_independently(lively_tiny):
    """A row of a batch takes exactly the forwards it takes alone (with deterministic guesses):
    rows never wait for each other. Each forward makes at least one token final."""
    model, tokenizer = lively_tiny("qwen3")
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)
    for decoder, settings in ((jacobi, dict(jacobi_block_size=4, init="repeat", adaptive=False)),
                              (jacobi_multiblock, dict(MULTIBLOCK, init="repeat", adaptive=False))):
        batched = decode(decoder, engine, prompts, **settings)
        alone = [int(decode(decoder, engine, [p], **settings).row_forwards) for p in prompts]
        assert batched.row_forwards.tolist() == alone
        assert batched.lengths.tolist() == [MAX_NEW] * 3 and len(set(alone)) > 1
        assert (batched.row_forwards <= batched.lengths).all()
        assert batched.forward_passes == max(alone)


def test_rows_stop_at_their_first_stop_token(lively_tiny):
    model, tokenizer = lively_tiny("llama")
    prompts = prompts_of(tokenizer)
    free = Engine(model, tokenizer).generate(prompts, "ar", MAX_NEW).sequences

    # A token of row 0 that, used as the stop token, ends the rows at the most different steps.
    def ends(token: int) -> set[int]:
        return {s.index(token) if token in s else MAX_NEW for s in free}

    stop = max(free[0][1:10], key=lambda token: len(ends(token)))
    engine = Engine(model, tokenizer, stop_token_ids=[stop])
    reference = engine.generate(prompts, "hf_generate", MAX_NEW).sequences
    assert len({len(s) for s in reference}) > 1 and min(len(s) for s in reference) < MAX_NEW
    for decoder, settings in ((jacobi, dict(jacobi_block_size=4)), (jacobi, dict(jacobi_block_size=16)),
                              (jacobi_multiblock, MULTIBLOCK)):
        out = engine.generate(prompts, decoder.__name__, MAX_NEW, **settings)
        assert out.sequences == reference
        result = decode(decoder, engine, prompts, **settings)
        assert result.lengths.tolist() == [len(s) for s in reference]
        assert (result.row_forwards <= result.lengths).all()  # at least one final token per forward
        assert result.row_forwards.min() < result.forward_passes  # a stopped row waited for no later forward


def test_embedded_teacher_matches_generate():
    model, tokenizer = load_model("tiny-teacher")
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer, TASKS)
    reference = engine.generate(prompts, "hf_generate", 48)
    for decoder, settings in (("jacobi", {}), ("jacobi", dict(jacobi_block_size=8, init="pad")), ("jacobi_multiblock", {}),
                              ("jacobi", dict(init="lookup")), ("jacobi_multiblock", dict(init="lookup"))):
        out = engine.generate(prompts, decoder, 48, **settings)
        assert out.sequences == reference.sequences, (decoder, settings)
        assert out.texts == reference.texts
        assert out.stats.tokens_per_forward > 1.0


# ----- Cache layout -------------------------------------------------------------------------


def test_shift_cache_rows_right_aligns_rows_that_kept_different_counts(lively_tiny):
    """After a step in which row 0 keeps 3 new tokens and row 1 keeps 1, shifting row 1 two slots
    right leaves both rows hole-free against the end of the cache: the next token's logits equal
    those of each row decoded alone."""
    model, tokenizer = lively_tiny("mistral")
    engine = Engine(model, tokenizer)
    short, long = sorted(prompts_of(tokenizer)[:2], key=len)
    kept = [[21, 22, 23], [31]]

    def alone(prompt: list[int], tokens: list[int]) -> torch.Tensor:
        return model(torch.tensor([prompt + tokens])).logits[0, -1]  # [v]

    with torch.inference_mode():
        batch = engine.prepare([short, long], max_new_tokens=4)
        width = batch.width
        cache = new_cache()
        engine.forward(batch.input_ids, cache, batch.position_ids, batch.attention_mask)
        step = torch.tensor([kept[0], kept[1] + [77, 78]])  # row 1's last two are rejected guesses
        mask = torch.cat([batch.attention_mask, torch.ones(2, 3, dtype=torch.long)], dim=1)
        engine.forward(step, cache, batch.lengths[:, None] + torch.arange(3), mask)
        shift_cache_rows(cache, torch.tensor([0, 2]), width + 3)
        assert cache.get_seq_length() == width + 3
        real = torch.tensor([len(short) + 3, len(long) + 1])  # right-aligned real tokens per row
        slots = torch.arange(width + 4)[None]
        mask = (slots >= width + 3 - real[:, None]).long()  # [2, width + 4] (the fed token is real)
        positions = torch.tensor([[len(short) + 3], [len(long) + 1]])
        logits = engine.forward(torch.tensor([[24], [32]]), cache, positions, mask).logits[:, -1]
        torch.testing.assert_close(logits[0], alone(short, kept[0] + [24]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits[1], alone(long, kept[1] + [32]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
def test_sliding_window_models_decode_beyond_the_window(family, lively_tiny):
    """Rows keep different numbers of tokens per step but never get holes, so windows (counted in
    cache slots, as generate counts them) stay exact past the window."""
    model, tokenizer = lively_tiny(family, sliding_window=8)
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)
    reference = engine.generate(prompts, "hf_generate", MAX_NEW).sequences
    for decoder, settings in (("jacobi", dict(jacobi_block_size=4)), ("jacobi_multiblock", MULTIBLOCK)):
        for adaptive in (True, False):
            out = engine.generate(prompts, decoder, MAX_NEW, adaptive=adaptive, **settings)
            assert out.sequences == reference, decoder
    assert out.stats.tokens_per_forward > 1.0  # every guess fed: some were accepted past the window


# ----- Forward counts, by hand --------------------------------------------------------------


def constant_model(token: int):
    """A tiny model whose greedy prediction is ``token`` everywhere (its logits are replaced)."""
    model, tokenizer = tiny_model("llama")

    def one_hot_logits(module, args, output):
        return torch.zeros_like(output).index_fill_(-1, torch.tensor([token]), 1.0)  # [b, s, v]

    model.lm_head.register_forward_hook(one_hot_logits)
    return model, tokenizer


def test_forward_counts_on_a_model_that_always_predicts_one_token():
    tokenizer = tiny_model("llama")[1]
    prompt = prompts_of(tokenizer)[0]
    token = next(t for t in range(len(tokenizer) - 1, 0, -1) if t not in prompt and t != tokenizer.eos_token_id)
    model, tokenizer = constant_model(token)
    engine = Engine(model, tokenizer)
    expected = [[token] * 12]

    def forwards(decoder, prompt=prompt, **settings) -> int:
        if decoder != "ar":
            settings.setdefault("adaptive", False)  # every guess fed, as counted below
        out = engine.generate([prompt], decoder, 12, **settings)
        assert out.sequences == expected
        return out.stats.forward_passes

    # Prefill (token 0); block [0, 4): forward 2 corrects token 1 (a prompt token was guessed) and
    # sets every guess to `token`, forward 3 accepts them all and predicts token 4; the same for
    # blocks [4, 8) and [8, 12): 1 + 3 * 2 forwards for 12 tokens.
    assert forwards("ar") == 12
    assert forwards("jacobi", jacobi_block_size=4) == 7
    assert forwards("jacobi", jacobi_block_size=4, init="pad") == 7  # the pad token is not `token` either
    # Guessing the block's first token again is right at once: one forward per block.
    assert forwards("jacobi", jacobi_block_size=4, init="repeat") == 4
    assert forwards("jacobi", jacobi_block_size=12, init="repeat") == 2
    # Two blocks in flight, spawned at half settled: forward 2 settles [0, 2) and spawns [4, 8);
    # forward 3 accepts 2, 3 and 4 (across the block boundary), makes 5 final and spawns
    # [8, 12); forward 4 makes 6..9 final, forward 5 the rest.
    assert forwards("jacobi_multiblock", **MULTIBLOCK, recycle=False) == 5
    assert forwards("jacobi_multiblock", jacobi_block_size=4, n_blocks=1, recycle=False) == 7  # that is `jacobi`
    # Prompt lookup: block [0, 4) finds no `token` in the context (prompt draws, 2 forwards); blocks
    # [4, 8) and [8, 12) find the run the answer has written (guesses `token`, 1 forward each).
    assert forwards("jacobi", jacobi_block_size=4, init="lookup") == 5
    # A prompt that holds a run of `token`: one forward a block from the first, like "repeat".
    assert forwards("jacobi", jacobi_block_size=4, init="lookup", prompt=prompt + [token] * 4) == 4
    # A stop token as the first token ends the row after the prefill.
    stopping = Engine(model, tokenizer, stop_token_ids=[token])
    out = stopping.generate([prompt], "jacobi", 12)
    assert out.sequences == [[token]] and out.stats.forward_passes == 1


def test_lookup_continuation_follows_the_longest_earlier_suffix_match():
    assert lookup_continuation([1, 2, 3, 9, 1, 2, 3], 3) == [9, 1, 2]  # the 3-gram [1, 2, 3] seen before
    assert lookup_continuation([5, 1, 2, 7, 7, 1, 2], 2) == [7, 7]  # no earlier [7, 1, 2]: the 2-gram [1, 2]
    assert lookup_continuation([4, 4, 4, 4, 4, 4, 4], 3) == [4, 4, 4]  # the latest match with 3 tokens after it
    assert lookup_continuation([1, 2, 9, 2], 5) == [9, 2]  # none has 5 after it: the one followed by most
    assert lookup_continuation([1, 2, 3, 4, 5], 2) == []  # the last token never occurred before


def test_block_size_one_is_ar(lively_tiny):
    model, tokenizer = lively_tiny("gemma3")
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)
    result = decode(jacobi, engine, prompts, jacobi_block_size=1)
    assert result.row_forwards.tolist() == result.lengths.tolist()  # one forward per token in every row
    assert engine.generate(prompts, "jacobi", MAX_NEW, jacobi_block_size=1).sequences == \
        engine.generate(prompts, "ar", MAX_NEW).sequences


# ----- Rejection recycling -----------------------------------------------------------------


def test_ngram_pool():
    pool = NgramPool(capacity=2)
    assert pool.continuation(5, 3) == []
    pool.add([7])  # a lone token predicts nothing: not kept
    assert len(pool.tails) == 0
    pool.add([5, 6, 7, 8, 9])
    assert pool.continuation(5, 3) == [6, 7, 8]
    assert pool.continuation(8, 3) == [9]  # what follows, however short
    assert pool.continuation(9, 3) == []  # the last token of a tail has no continuation
    pool.add([1, 5, 2])
    assert pool.continuation(5, 3) == [2]  # the newest tail holding the key wins
    pool.add([3, 4])  # capacity 2: the oldest tail goes
    assert pool.continuation(6, 1) == [] and pool.continuation(5, 3) == [2]
    pool.add([5, 1, 5, 4])
    assert pool.continuation(5, 2) == [1, 5]  # the first occurrence: the longest continuation


def test_recycling_seeds_guesses_and_stays_lossless(lively_tiny, monkeypatch):
    model, tokenizer = lively_tiny("qwen3")
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)
    found = []
    lookup = NgramPool.continuation

    def spy(self, key, length):
        found.append(lookup(self, key, length))
        return found[-1]

    monkeypatch.setattr(NgramPool, "continuation", spy)
    reference = engine.generate(prompts, "ar", 40).sequences
    recycled = engine.generate(prompts, "jacobi_multiblock", 40, **MULTIBLOCK)
    assert recycled.sequences == reference
    assert any(found), "no spawned block found its first token in a rejected tail"
    found.clear()
    assert engine.generate(prompts, "jacobi_multiblock", 40, **MULTIBLOCK, recycle=False).sequences == reference
    assert found == []


# ----- Settings ----------------------------------------------------------------------------


def test_setting_errors(tiny):
    model, tokenizer = tiny("llama")
    engine = Engine(model, tokenizer)
    prompts = [[5, 6, 7]]
    for jacobi_block_size in (0, -2, 1.5, True):
        with pytest.raises(DecoderError, match=r"jacobi_block_size must be a positive integer \(tokens guessed per"):
            engine.generate(prompts, "jacobi", 4, jacobi_block_size=jacobi_block_size)
    with pytest.raises(DecoderError, match="jacobi_block_size must be a positive integer"):
        engine.generate(prompts, "jacobi_multiblock", 4, jacobi_block_size=0)
    for ratio in (0, -0.5, 1.5, "half"):
        with pytest.raises(DecoderError, match=r"spawn_ratio must be in \(0, 1\] \(the fraction of the newest block"):
            engine.generate(prompts, "jacobi_multiblock", 4, spawn_ratio=ratio)
    for decoder in ("jacobi", "jacobi_multiblock"):
        with pytest.raises(DecoderError, match="unknown init 'random'; choose one of prompt, pad, repeat, lookup"):
            engine.generate(prompts, decoder, 4, init="random")
    with pytest.raises(DecoderError, match="n_blocks must be a positive integer"):
        engine.generate(prompts, "jacobi_multiblock", 4, n_blocks=0)
    with pytest.raises(DecoderError, match="pool_size must be a positive integer"):
        engine.generate(prompts, "jacobi_multiblock", 4, pool_size=0)
    with pytest.raises(DecoderError, match="recycle must be true or false"):
        engine.generate(prompts, "jacobi_multiblock", 4, recycle="yes")
    with pytest.raises(DecoderError, match=r"temperature must be >= 0"):
        engine.generate(prompts, "jacobi", 4, temperature=-1.0)
    with pytest.raises(DecoderError, match=r"top_p must be in \(0, 1\]"):
        engine.generate(prompts, "jacobi", 4, temperature=1.0, top_p=0)
    with pytest.raises(DecoderError, match="decoder 'jacobi_multiblock' has no setting 'temperature'"):
        engine.generate(prompts, "jacobi_multiblock", 4, temperature=1.0)  # greedy only
    assert engine.generate(prompts, "jacobi_multiblock", 4, spawn_ratio=1).sequences  # 1 is allowed


# ----- Sampling ----------------------------------------------------------------------------


def chi_square_p_value(counts: dict, expected: dict[tuple, float], n: int) -> float:
    """P-value of Pearson's chi-square test of ``counts`` against the distribution ``expected``."""
    assert set(counts) <= set(expected), "a sample the distribution cannot produce"
    statistic = sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in expected.items())
    dof = torch.tensor((len(expected) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, torch.tensor(statistic / 2, dtype=torch.float64)))


def test_sampling_follows_the_ar_distribution(lively_tiny, monkeypatch):
    """Three sampled tokens of one prompt, N times in one batch, against the exact joint
    distribution under the same filters: token 1 tests point-mass guesses, token 2 also guesses
    drawn from the previous forward (q != p). A wrong residual must fail the same test."""
    model, tokenizer = lively_tiny("llama")
    engine = Engine(model, tokenizer)
    prompt = prompts_of(tokenizer)[0]
    settings = dict(temperature=1.0, top_k=3)  # three tokens per step: 27 outcomes
    pick = TokenPicker(torch.device("cpu"), **settings)

    def next_token_probs(answer: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + answer])).logits[:, -1]  # [1, v]
        return pick.filtered_logits(logits).softmax(-1)[0]

    expected: dict[tuple, float] = {}
    p0 = next_token_probs([])
    for a in p0.nonzero().flatten().tolist():
        p1 = next_token_probs([a])
        for b in p1.nonzero().flatten().tolist():
            p2 = next_token_probs([a, b])
            for c in p2.nonzero().flatten().tolist():
                expected[(a, b, c)] = float(p0[a] * p1[b] * p2[c])
    n = 4000

    def p_value() -> tuple[float, float]:
        out = engine.generate([prompt] * n, "jacobi", 3, jacobi_block_size=3, init="repeat", seed=1, **settings)
        counts: dict[tuple, int] = {}
        for seq in out.sequences:
            counts[tuple(seq)] = counts.get(tuple(seq), 0) + 1
        return chi_square_p_value(counts, expected, n), out.stats.tokens_per_forward

    p, tokens_per_forward = p_value()
    assert p > 1e-3
    assert tokens_per_forward > 1.0, "no guess was ever accepted; the test would not test acceptance"

    # Resampling from p instead of norm(max(0, p - q)) after a rejection biases the output.
    update = jacobi_module.SpeculativeRule.update

    def wrong_residual(self, *args):
        self.proposal = torch.zeros_like(self.proposal)
        return update(self, *args)

    monkeypatch.setattr(jacobi_module.SpeculativeRule, "update", wrong_residual)
    assert p_value()[0] < 1e-6


def test_sampling_is_seeded_and_reproducible(lively_tiny):
    model, tokenizer = lively_tiny("qwen2")
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)
    settings = dict(jacobi_block_size=4, temperature=1.0)
    a = engine.generate(prompts, "jacobi", MAX_NEW, seed=1, **settings)
    b = engine.generate(prompts, "jacobi", MAX_NEW, seed=1, **settings)
    c = engine.generate(prompts, "jacobi", MAX_NEW, seed=2, **settings)
    assert a.sequences == b.sequences and a.stats.forward_passes == b.stats.forward_passes
    assert a.sequences != c.sequences
    greedy = engine.generate(prompts, "jacobi", MAX_NEW, jacobi_block_size=4).sequences
    assert a.sequences != greedy
    assert engine.generate(prompts, "jacobi", MAX_NEW, seed=3, top_k=1, **settings).sequences == greedy
    assert engine.generate(prompts, "jacobi", MAX_NEW, seed=3, top_p=0.5, **settings).sequences != a.sequences


# ----- Trajectories ------------------------------------------------------------------------


def no_cache_states(model, context: list[int], first: list[int]) -> list[list[int]]:
    """The reference's collection of one block: recompute context + block without a cache, update
    every position to the argmax before it, until a state repeats; the states, without the repeat."""
    states = [first]
    while True:
        with torch.inference_mode():
            logits = model(torch.tensor([context + states[-1]])).logits[0, len(context) - 1:-1]  # [n, v]
        following = logits.argmax(-1).tolist()
        if following == states[-1]:
            return states
        states.append(following)


def test_trajectories(lively_tiny):
    model, tokenizer = lively_tiny("llama")
    prompts = prompts_of(tokenizer)
    # A stop token that ends one answer inside a block.
    free = Engine(model, tokenizer).generate(prompts, "ar", 20).sequences
    stop = free[1][9]
    engine = Engine(model, tokenizer, stop_token_ids=[stop])
    answers = engine.generate(prompts, "hf_generate", 20).sequences
    assert any(len(a) % 4 for a in answers)

    rows = collect_jacobi_trajectories(engine, prompts, jacobi_block_size=4, max_new_tokens=20, seed=3, batch_size=2)
    assert [r["prompt_index"] for r in rows] == sorted(r["prompt_index"] for r in rows)
    for index, (prompt, answer) in enumerate(zip(prompts, answers)):
        blocks = [r for r in rows if r["prompt_index"] == index]
        assert [r["block_index"] for r in blocks] == list(range(len(blocks)))
        assert blocks[0]["states"][0][0] == answer[0]  # block 0 starts from the prefill's token
        assert sum((r["fixed_point"] for r in blocks), []) == answer
        for row in blocks:
            assert row["prompt_ids"] == prompt
            assert row["prefix_ids"] == answer[: 4 * row["block_index"]]
            assert row["states"][-1] == row["fixed_point"]
            assert all(len(s) == len(row["fixed_point"]) for s in row["states"])
            first = row["states"][0]
            assert row["states"] == no_cache_states(model, prompt + row["prefix_ids"], first)
    assert max(len(r["states"]) for r in rows) >= 3, "no block took several iterations"

    dataset = datasets.Dataset.from_list(rows)
    assert set(dataset.column_names) == {"prompt_index", "prompt_ids", "prefix_ids", "block_index", "states",
                                         "fixed_point"}
    assert len(dataset) == len(rows)


def test_trajectories_keep_a_stop_token_that_was_never_guessed():
    """A stop token the previous forward predicted is final at once, so its block is never
    guessed (here the prefill's: the whole answer); its row holds the fixed point as its only
    state, and the rows' fixed points still make up the answer through its stop token."""
    tokenizer = tiny_model("llama")[1]
    prompt = prompts_of(tokenizer)[0]
    token = next(t for t in range(len(tokenizer) - 1, 0, -1) if t not in prompt and t != tokenizer.eos_token_id)
    model, tokenizer = constant_model(token)
    engine = Engine(model, tokenizer, stop_token_ids=[token])
    assert collect_jacobi_trajectories(engine, [prompt], jacobi_block_size=4, max_new_tokens=12) == [dict(
        prompt_index=0, prompt_ids=prompt, prefix_ids=[], block_index=0, states=[[token]], fixed_point=[token])]


# ----- Bench --------------------------------------------------------------------------------


def test_bench_command_runs_jacobi(tmp_path):
    main(["bench", "tiny-teacher", "--decoders", "ar,jacobi:jacobi_block_size=8|16", "--tasks", "sort", "--n", "2",
          "--max-new-tokens", "24", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench.json").read_text())
    by_label = {(r["decoder"], json.dumps(r["decoder_settings"])): r for r in rows}
    assert set(by_label) == {("hf_generate", "{}"), ("ar", "{}"), ("jacobi", '{"jacobi_block_size": 8}'),
                             ("jacobi", '{"jacobi_block_size": 16}')}
    for row in rows:
        assert row["accuracy"] == by_label[("ar", "{}")]["accuracy"]  # lossless: the same answers
        assert row["tokens_per_forward"] >= 1.0
