"""inference/cost.py: the measured cost of a k-token forward and the recorded widths of a decode.
Timings are only checked for sanity (positive, ratio 1 at k=1), never for speed."""

from __future__ import annotations

import pytest

from leaplm.inference.cost import (
    COST_WIDTHS,
    SIZING_REPEATS,
    WidthChooser,
    candidate_widths,
    decode_widths,
    record_forwards,
    step_cost,
    step_seconds,
    width_chooser,
)
from leaplm.inference.engine import Engine
from leaplm.models.zoo import EMBEDDED_TEACHER, load_model


def test_step_cost_ratios_on_the_teacher():
    model, _ = load_model(EMBEDDED_TEACHER)
    ratios = step_cost(model, COST_WIDTHS, batch_size=1, context=64, repeats=3)
    assert sorted(ratios) == list(COST_WIDTHS)
    assert ratios[1] == 1.0 and all(r > 0 for r in ratios.values())
    # Kept for the process: asking again measures nothing, so the noisy numbers come back unchanged.
    assert step_cost(model, [32, 4, 16, 8, 2, 1], batch_size=1, context=64, repeats=3) == ratios
    assert sorted(step_cost(model, [3], batch_size=2, context=16, repeats=1)) == [1, 3]  # 1 is always measured


def test_step_cost_refuses_what_does_not_fit(tiny):
    model, _ = tiny("llama")
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"lower context to at most {limit - 8}"):
        step_cost(model, [8], context=limit)
    with pytest.raises(ValueError, match="widths must be >= 1"):
        step_cost(model, [0])


def test_step_cost_leaves_training_mode_as_it_was(tiny):
    model, _ = tiny("qwen2")
    model.train()
    try:
        step_cost(model, [2], context=8, repeats=1)
        assert model.training
    finally:
        model.eval()


def test_record_forwards_separates_prefills_from_decode_steps(tiny):
    model, tokenizer = tiny("llama")
    engine = Engine(model, tokenizer)
    prompts = [[5, 6, 7], [8, 9]]
    with record_forwards(model) as calls:
        out = engine.generate(prompts, "ar", 6)
    assert calls[0].cached == 0 and calls[0].width == 3  # the padded prefill
    assert decode_widths(calls) == [1] * (len(calls) - 1) and out.stats.forward_passes == len(calls)
    with record_forwards(model) as calls:
        engine.generate(prompts, "jacobi", 12, jacobi_block_size=4, adaptive=False)
    assert max(decode_widths(calls)) == 5  # the newest committed token and a block of 4 guesses
    with record_forwards(model) as calls:
        engine.generate(prompts, "hf_generate", 4)  # Hugging Face generate's calls count too
    assert len(calls) >= 2 and calls[0].cached == 0 and decode_widths(calls) == [1] * (len(calls) - 1)
    engine.generate(prompts, "ar", 2)
    assert len(calls) == len(decode_widths(calls)) + 1  # nothing recorded after the block


# ----- Sizing steps by cost -------------------------------------------------------------------


def run_chooser(chooser: WidthChooser, yield_of, steps: int) -> list[int]:
    """Drive ``chooser`` for ``steps`` forwards where a width-k forward commits ``yield_of(k)`` tokens."""
    chosen = []
    for _ in range(steps):
        k = chooser.choose()
        chooser.observe(k, 1.0 if k == 1 else yield_of(k))
        chosen.append(k)
    return chosen


def test_chooser_falls_back_to_one_token_when_no_width_pays():
    """An untrained model on a compute-bound machine: every width commits ~1.06 tokens at 1.6-2x the
    cost. After trying each width once, the chooser decodes token by token and retries wider
    steps in bursts of 2 at doubling gaps: a handful of wide forwards in 500."""
    cost = {1: 1.0, 2: 1.1, 4: 1.6, 8: 1.9, 16: 2.0, 17: 2.05}
    chooser = WidthChooser(cost, gap=16, burst=2)
    chosen = run_chooser(chooser, lambda k: 1.06, 500)
    assert chosen[:5] == [17, 16, 8, 4, 2]  # widest first: an untried width counts as fully accepted
    wide = [i for i, k in enumerate(chosen) if k > 1][5:]
    assert wide[::2] == [15, 48, 113, 242, 499]  # bursts of 2 after 16, 32, 64, 128, 256 steps
    assert sum(cost[k] for k in chosen) / len(chosen) < 1.05  # within 5% of AR's time per forward


def test_chooser_settles_on_the_width_with_the_best_rate():
    cost = {1: 1.0, 2: 1.05, 4: 1.1, 8: 1.6, 16: 3.0}
    gains = {2: 1.8, 4: 3.0, 8: 3.4, 16: 3.6}  # yield per width: 4 pays best (3.0 / 1.1)
    chosen = run_chooser(WidthChooser(cost), gains.get, 50)
    assert chosen[-20:] == [4] * 20


def test_chooser_recovers_when_a_burst_pays():
    """Yields change over a decode (a repetitive stretch): a burst that pays takes the chooser back
    to the wide step and resets its gap."""
    cost = {1: 1.0, 4: 1.2}
    chooser = WidthChooser(cost, gap=4, burst=2)
    run_chooser(chooser, lambda k: 1.0, 40)
    assert chooser.choose() == 1 and chooser.gap > 4
    chosen = run_chooser(chooser, lambda k: 3.0, 200)
    assert chosen[-50:] == [4] * 50 and chooser.gap == 4


def test_a_timed_chooser_prices_steps_by_their_measured_time(monkeypatch):
    """The prior says a width-4 step costs 1.2 forwards and it commits 3 tokens, so it should pay;
    but the decoder's steps at width 4 take 5x a 1-token step (its own work around the forward:
    masks, acceptance). Timed, the chooser learns that from the clock and settles on 1 token; the
    same steps timed at the prior's cost keep it at 4."""
    import leaplm.inference.cost as cost_module

    def run(step_seconds: dict[int, float]) -> list[int]:
        clock = [0.0]
        monkeypatch.setattr(cost_module.time, "perf_counter", lambda: clock[0])
        chooser = WidthChooser({1: 1.0, 4: 1.2}, unit_seconds=0.01, timed=True)
        chosen = []
        for _ in range(40):
            k = chooser.choose()
            clock[0] += step_seconds[k]
            chooser.observe(k, 1.0 if k == 1 else 3.0)
            chosen.append(k)
        return chosen

    assert run({1: 0.01, 4: 0.05})[-10:] == [1] * 10
    paying = run({1: 0.01, 4: 0.012})
    assert paying[:3] == [4, 1, 4]  # the untried width, then AR timed once
    assert paying.count(1) == 3 and paying[-10:].count(4) >= 9  # AR re-timed after every 16 wide steps


def test_a_step_is_overdue_once_it_outlasts_the_narrow_one(monkeypatch):
    import leaplm.inference.cost as cost_module

    clock = [0.0]
    monkeypatch.setattr(cost_module.time, "perf_counter", lambda: clock[0])
    chooser = WidthChooser({1: 1.0, 16: 3.0}, unit_seconds=0.01, timed=True)
    chooser.choose()
    clock[0] += 0.15
    assert not chooser.overdue(1, steps=16)  # untimed: 16 one-token forwards of the prior, 0.16 s
    clock[0] += 0.02
    assert chooser.overdue(1, steps=16)
    chooser.observe(16, 16.0)
    assert chooser.choose() == 1
    clock[0] += 0.05  # an AR block, timed: 0.05 s
    chooser.observe(1, 16.0)
    chooser.choose()
    clock[0] += 0.06
    assert chooser.overdue(1, steps=16) and not WidthChooser({1: 1.0}).overdue(1)  # untimed: never
    # By pace: 0.01 s into a step with a quarter of it done is on an AR block's pace (0.05 s), 0.01 s
    # with a tenth done is behind it.
    chooser.choose()
    clock[0] += 0.01
    assert not chooser.overdue(1, steps=16, done=0.25) and chooser.overdue(1, steps=16, done=0.1)


def test_an_expensive_burst_waits_longer():
    """A denoised block costs 3 AR blocks and writes 1.2x as much: a burst of 2 wastes about 4 AR
    blocks' time, so the chooser waits until the 1-token steps since the last burst took 16 times
    that (64 steps), not merely 16 steps."""
    chooser = WidthChooser({1: 1.0, 16: 3.0}, gap=16, burst=2)
    chosen = run_chooser(chooser, lambda k: 1.2, 300)
    wide = [i for i, k in enumerate(chosen) if k > 1]
    # The untried width first; a burst once the steps since took 64 AR steps' time (that first
    # denoised block's 3 and 61 AR steps), the next after 128 (the gap doubled), then 256: past 300.
    assert wide == [0, 62, 63, 192, 193]


def test_a_width_whose_yield_a_hard_stretch_lowered_is_tried_again():
    """A hard stretch (width 8 commits 1.5 tokens) makes width 2 the best; once width 8 commits 5
    again, a burst at the width seen longest ago finds it, and the chooser goes back to 8."""
    cost = {1: 1.0, 2: 1.05, 8: 1.3}
    chooser = WidthChooser(cost, gap=8, burst=2)
    run_chooser(chooser, {2: 1.9, 8: 1.5}.get, 30)
    assert chooser.best() == 2
    chosen = run_chooser(chooser, {2: 1.9, 8: 5.0}.get, 60)
    assert chosen[-20:].count(8) >= 16  # the rest: bursts back at 2, at doubling gaps


def test_chooser_refuses_costs_without_the_one_token_step():
    with pytest.raises(ValueError, match="width 1 among them"):
        WidthChooser({2: 1.0, 4: 1.5})
    chooser = WidthChooser({1: 1.0, 2: 1.2})
    with pytest.raises(ValueError, match="not among the chooser's widths"):
        chooser.observe(3, 2.0)


def test_width_chooser_is_kept_per_engine_and_settings(tiny):
    model, tokenizer = tiny("llama")
    engine = Engine(model, tokenizer)
    first = width_chooser(engine, ("jacobi", 4), [2, 4, 5], batch_size=2, context=40)
    assert sorted(first.cost) == [1, 2, 4, 5] and first.cost[1] == 1.0  # 1, a plain AR step, is always a choice
    assert width_chooser(engine, ("jacobi", 4), [5, 4, 2], batch_size=2, context=900) is first  # any context
    assert width_chooser(engine, ("jacobi", 8), [2, 4, 5], batch_size=2, context=40) is not first
    assert width_chooser(Engine(model, tokenizer), ("jacobi", 4), [2, 4, 5], batch_size=2, context=40) is not first
    assert candidate_widths(17) == [1, 2, 3, 4, 8, 16, 17] and candidate_widths(3) == [1, 2, 3]
    assert candidate_widths(1) == [1]


def test_a_speculative_chooser_counts_the_drafts_forwards(tiny):
    """A width-k verification follows k - 1 draft forwards: its cost is the target's k-token ratio
    plus k - 1 times the draft's 1-token time over the target's, both from step_seconds."""
    model, tokenizer = tiny("llama")
    draft, _ = tiny("qwen2")
    chooser = width_chooser(Engine(model, tokenizer), ("speculative",), [2, 3], batch_size=1, context=40, draft=draft)
    seconds = step_seconds(model, [1, 2, 3], batch_size=1, context=64, repeats=SIZING_REPEATS)
    drafted = step_seconds(draft, [1], batch_size=1, context=64, repeats=SIZING_REPEATS)[1]
    assert chooser.cost[1] == 1.0
    for k in (2, 3):
        assert chooser.cost[k] == pytest.approx(seconds[k] / seconds[1] + (k - 1) * drafted / seconds[1])
