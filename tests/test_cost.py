"""inference/cost.py: the measured cost of a k-token forward and the recorded widths of a decode.
Timings are only checked for sanity (positive, ratio 1 at k=1), never for speed."""

from __future__ import annotations

import pytest

from leaplm.inference.cost import COST_WIDTHS, decode_widths, record_forwards, step_cost
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
        engine.generate(prompts, "jacobi", 12, jacobi_block_size=4)
    assert max(decode_widths(calls)) == 5  # the newest committed token and a block of 4 guesses
    with record_forwards(model) as calls:
        engine.generate(prompts, "hf_generate", 4)  # Hugging Face generate's calls count too
    assert len(calls) >= 2 and calls[0].cached == 0 and decode_widths(calls) == [1] * (len(calls) - 1)
    engine.generate(prompts, "ar", 2)
    assert len(calls) == len(decode_widths(calls)) + 1  # nothing recorded after the block
