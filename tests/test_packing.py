"""Packed rows give exactly the loss of the same samples padded one per row."""

from __future__ import annotations

import pytest
import torch

from leaplm.data.sft import PadCollator, model_inputs, pack, tokenize_chat
from leaplm.data.tasks import make_split
from leaplm.losses.causal_lm import causal_lm_loss_sum
from leaplm.models.zoo import tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_packed_loss_equals_padded_loss(family):
    model, tokenizer = tiny_model(family)
    samples = [
        tokenize_chat(tokenizer, [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.answer}])
        for task in ("copy", "arith", "story")
        for ex in make_split(task, "train", 2)
    ]
    collate = PadCollator(tokenizer.pad_token_id)
    padded = collate(samples)
    rows = pack(samples, max_length=160)
    assert len(rows) < len(samples)  # something was actually packed together
    packed = collate(rows)
    assert packed["n_targets"] == padded["n_targets"]
    with torch.no_grad():
        loss_padded = causal_lm_loss_sum(model(**model_inputs(padded), use_cache=False).logits, padded["labels"])
        loss_packed = causal_lm_loss_sum(model(**model_inputs(packed), use_cache=False).logits, packed["labels"])
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-4)


def test_packing_keeps_whole_samples_and_restarts_positions():
    samples = [{"input_ids": [1] * n, "labels": [2] * n} for n in (5, 4, 3, 6)]
    rows = pack(samples, max_length=9)
    assert [len(r["input_ids"]) for r in rows] == [9, 9]
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert rows[1]["position_ids"] == [0, 1, 2, 0, 1, 2, 3, 4, 5]
