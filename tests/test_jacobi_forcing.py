"""Jacobi Forcing training: noise schedule, packed layout, attention mask, loss, FlexAttention vs dense."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from leaplm.losses.causal_lm import causal_lm_loss_sum
from leaplm.losses.jacobi_forcing import (
    build_batch,
    jacobi_forcing_loss_sum,
    noise_ratio,
    noise_schedule,
    pick_states,
)
from leaplm.models.jacobi_forcing import JacobiForcingError, attention_rule, pack_rows, training_attention
from leaplm.models.two_stream import CLEAN, NOISY, PAD
from leaplm.models.zoo import tiny_model

# Two prompts; row 0 has blocks of 4 with a short last block, row 1 a single block.
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12]]
PAIRS = [
    [([20, 40, 41, 42], [20, 21, 22, 23]), ([24, 25, 43, 27], [24, 25, 26, 27]), ([44, 45], [28, 29])],
    [([30, 31, 32, 46], [30, 31, 32, 33])],
]


# ----- Noise ratio and the progressive schedule ---------------------------------------------------


def test_noise_ratio_counts_from_the_first_difference():
    fixed = [1, 2, 3, 4]
    assert noise_ratio([1, 2, 3, 4], fixed) == 0.0
    assert noise_ratio([1, 2, 3, 9], fixed) == 0.25
    assert noise_ratio([1, 9, 3, 4], fixed) == 0.75  # right again after the first wrong token: still unconverged
    assert noise_ratio([9, 2, 3, 4], fixed) == 1.0


def test_noise_schedule_is_a_linspace():
    assert noise_schedule(5, 0.0, 1.0) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert noise_schedule(1, 0.2, 0.8) == [0.2]


def test_progressive_schedule_picks_the_nearest_state_per_block():
    fixed = [1, 2, 3, 4]
    # one trajectory for every block: ratios 1.0, 0.75, 0.5, 0.25, 0.0 (the fixed point)
    trajectory = [[9, 9, 9, 9], [1, 9, 9, 9], [1, 2, 9, 9], [1, 2, 3, 9], fixed]
    pairs = pick_states([trajectory] * 7, window_size=3)  # targets 0, 0.5, 1, then again
    assert [noise_ratio(noisy, f) for noisy, f in pairs] == [0.0, 0.5, 1.0, 0.0, 0.5, 1.0, 0.0]
    assert all(f == fixed for _, f in pairs)
    reverse = pick_states([trajectory] * 3, window_size=3, strategy="reverse")
    assert [noise_ratio(noisy, f) for noisy, f in reverse] == [1.0, 0.5, 0.0]
    # target 0.5 between ratios 0.75 and 0.25 only: a tie goes to the earlier state
    sparse = [[1, 9, 9, 9], [1, 2, 3, 9], fixed]
    assert pick_states([sparse, sparse], window_size=3, min_ratio=0.0, max_ratio=1.0)[1][0] == [1, 9, 9, 9]
    # an offset enters the window later: block 0 takes the window's second target
    shifted = pick_states([trajectory] * 4, window_size=3, offset=1)
    assert [noise_ratio(noisy, f) for noisy, f in shifted] == [0.5, 1.0, 0.0, 0.5]
    # a window narrower than the trajectory: targets 0.25 and 0.75
    pairs = pick_states([trajectory] * 2, window_size=2, min_ratio=0.25, max_ratio=0.75)
    assert [p[0] for p in pairs] == [[1, 2, 3, 9], [1, 9, 9, 9]]


# ----- The packed layout and its mask -------------------------------------------------------------


def test_pack_rows_columns_positions_and_streams():
    layout, spans = pack_rows(PROMPTS, PAIRS, pad_token_id=0)
    # row 0: 3 + 2 * (4 + 4 + 2) = 23 columns; row 1: 5 + 2 * 4 = 13, padded to 23
    assert layout.input_ids.shape == (2, 23)
    assert layout.input_ids[0].tolist() == [5, 6, 7, 20, 40, 41, 42, 20, 21, 22, 23, 24, 25, 43, 27, 24, 25, 26, 27,
                                            44, 45, 28, 29]
    assert layout.position_ids[0].tolist() == [0, 1, 2, *range(3, 7), *range(3, 7), *range(7, 11), *range(7, 11),
                                               11, 12, 11, 12]
    assert layout.stream[0].tolist() == [CLEAN] * 3 + ([NOISY] * 4 + [CLEAN] * 4) * 2 + [NOISY] * 2 + [CLEAN] * 2
    assert layout.block[0].tolist() == [-1] * 3 + [0] * 8 + [1] * 8 + [2] * 4
    assert layout.stream[1, 13:].tolist() == [PAD] * 10
    assert [tuple(s) for s in spans[0]] == [(3, 7, 0, 4), (11, 15, 4, 4), (19, 21, 8, 2)]


@pytest.mark.parametrize("noisy_context", ["noisy", "clean"])
def test_dense_mask_matches_hand_written_case(noisy_context):
    # Prompt of 2 (P), two blocks of 2: columns P0 P1 | n0 n0' | c0 c0' | n1 n1' | c1 c1' | one padding column
    # (row 1 is one token longer, so row 0 is padded).
    pairs = [([1, 2], [1, 3]), ([4, 5], [6, 7])]
    layout, _ = pack_rows([[8, 9], [8, 9, 10]], [pairs, pairs])
    got = layout.dense_mask(attention_rule(noisy_context))[0, 0].int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # P0: causal prompt
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # noisy block 0: prompt + its own causal prefix
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0],  # clean block 0: prompt + its own causal prefix
        [1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0],  # noisy block 1: prompt + noisy block 0 + own prefix
        [1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 1, 0, 0, 1, 0, 0],  # clean block 1: prompt + clean block 0 + own prefix
        [1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],  # padding sees itself only
    ])
    if noisy_context == "clean":  # noisy block 1 sees clean block 0 instead of noisy block 0
        expected[6:8, 2:4] = 0
        expected[6:8, 4:6] = 1
    assert torch.equal(got, expected)


def plain_and_packed_logits(model, noisy_context):
    layout, spans = pack_rows(PROMPTS, PAIRS)
    with torch.no_grad():
        packed = model(input_ids=layout.input_ids, position_ids=layout.position_ids,
                       attention_mask=training_attention(model, layout, "dense", noisy_context)).logits
    return layout, spans, packed


@pytest.mark.parametrize("noisy_context", ["noisy", "clean"])
def test_clean_stream_is_the_plain_model(lively_tiny, noisy_context):
    """Clean tokens see exactly their AR context at AR positions: their logits are the plain model's."""
    model, _ = lively_tiny("qwen3")
    layout, spans, packed = plain_and_packed_logits(model, noisy_context)
    for r, (prompt, pairs) in enumerate(zip(PROMPTS, PAIRS)):
        answer = [t for _, fixed in pairs for t in fixed]
        with torch.no_grad():
            plain = model(input_ids=torch.tensor([prompt + answer])).logits[0]
        clean_cols = list(range(len(prompt))) + [s.clean + i for s in spans[r] for i in range(s.length)]
        torch.testing.assert_close(packed[r, clean_cols], plain, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("noisy_context", ["noisy", "clean"])
def test_noisy_blocks_see_the_context_the_rule_names(lively_tiny, noisy_context):
    model, _ = lively_tiny("llama")
    _, spans, before = plain_and_packed_logits(model, noisy_context)
    block0, block1 = spans[0][0], spans[0][1]
    noisy1 = slice(block1.noisy, block1.noisy + block1.length)
    clean1 = slice(block1.clean, block1.clean + block1.length)
    for half in ("noisy", "clean"):
        layout, _ = pack_rows(PROMPTS, PAIRS)
        changed = copy.deepcopy(layout)
        changed.input_ids[0, (block0.noisy if half == "noisy" else block0.clean) + 1] = 60
        with torch.no_grad():
            after = model(input_ids=changed.input_ids, position_ids=changed.position_ids,
                          attention_mask=training_attention(model, changed, "dense", noisy_context)).logits
        moved = not torch.allclose(before[0, noisy1], after[0, noisy1], atol=1e-4)
        assert moved == (half == noisy_context)  # noisy block 1 reads block 0's `noisy_context` copy only
        assert torch.allclose(before[0, clean1], after[0, clean1], atol=1e-6) == (half == "noisy")
        assert torch.equal(before[1], after[1])


# ----- Targets and the loss -----------------------------------------------------------------------


def test_targets_follow_the_token_shift_and_the_first_difference():
    layout, targets = build_batch(PROMPTS, PAIRS)
    row0 = targets.ar_rows == 0
    # AR: every answer token from the clean logit before it (the prompt's last token for the first)
    assert targets.ar_labels[row0].tolist() == [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]
    assert targets.ar_cols[row0].tolist() == [2, 7, 8, 9, 10, 15, 16, 17, 18, 21]
    # consistency: noisy offsets from the first difference on, against the clean logit at the same offset
    c0 = targets.rows == 0
    assert targets.student_cols[c0].tolist() == [4, 5, 6, 13, 14, 19, 20]
    assert targets.teacher_cols[c0].tolist() == [8, 9, 10, 17, 18, 21, 22]
    assert targets.student_cols[targets.rows == 1].tolist() == [5 + 3]
    assert targets.teacher_cols[targets.rows == 1].tolist() == [5 + 4 + 3]


def test_nothing_is_supervised_past_a_stop_token():
    pairs = [[([1, 9, 9, 9], [1, 2, 3, 4]), ([9, 9, 9], [5, 0, 7])]]  # stop token 0 inside the last block
    _, targets = build_batch([[11]], pairs, stop_token_ids={0})
    assert targets.ar_labels.tolist() == [1, 2, 3, 4, 5, 0]  # through the stop token
    # teachers at answer tokens 1..4 (offsets 1-3 of block 0, offset 0 of block 1); not at the stop token
    assert targets.teacher_cols.tolist() == [1 + 4 + 1, 1 + 4 + 2, 1 + 4 + 3, 1 + 8 + 3]


def test_loss_on_a_hand_computed_case():
    # prompt [1]; one block: noisy [2, 0], fixed [2, 1]. Columns: 0 prompt | 1-2 noisy | 3-4 clean.
    layout, targets = build_batch([[1]], [[([2, 0], [2, 1])]])
    assert targets.ar_cols.tolist() == [0, 3] and targets.ar_labels.tolist() == [2, 1]
    assert targets.student_cols.tolist() == [2] and targets.teacher_cols.tolist() == [4]
    logits = torch.zeros(1, 5, 3)
    logits[0, 3, 1] = math.log(3)  # p(1) = 3/5
    logits[0, 2, 0] = math.log(2)  # student q = [1/2, 1/4, 1/4]; teacher (col 4) uniform
    logits.requires_grad_(True)
    loss, metrics = jacobi_forcing_loss_sum(logits, targets, ar_weight=2.0)
    consistency = -(math.log(1 / 2) + 2 * math.log(1 / 4)) / 3  # = 5/3 ln 2
    ar = math.log(3) + math.log(5 / 3)  # = ln 5
    assert loss.item() == pytest.approx(consistency + 2 * ar, abs=1e-6)
    assert metrics["ce_ar"] == pytest.approx(ar / 2, abs=1e-6)
    assert metrics["soft_ce_consistency"] == pytest.approx(consistency, abs=1e-6)
    assert metrics["kl_consistency"] == pytest.approx(consistency - math.log(3), abs=1e-6)
    assert metrics["consistency_fraction"] == 0.5
    loss.backward()
    assert logits.grad[0, 4].abs().sum() == 0  # the teacher is detached
    assert logits.grad[0, 2].abs().sum() > 0
    # distill_temperature 2: both sides divided by 2, the term scaled by 4
    loss_t, _ = jacobi_forcing_loss_sum(logits.detach(), targets, ar_weight=0.0, distill_temperature=2.0)
    z = math.sqrt(2) + 2
    assert loss_t.item() == pytest.approx(4 * -(math.log(math.sqrt(2) / z) + 2 * math.log(1 / z)) / 3, abs=1e-6)


def test_ar_part_is_the_plain_ar_loss(tiny):
    """With every noisy state at its fixed point there are no consistency targets: the loss is AR CE."""
    model, _ = tiny("mistral")
    pairs = [[(fixed, fixed) for _, fixed in row] for row in PAIRS]
    layout, targets = build_batch(PROMPTS, pairs)
    assert len(targets.rows) == 0
    with torch.no_grad():
        logits = model(input_ids=layout.input_ids, position_ids=layout.position_ids,
                       attention_mask=training_attention(model, layout, "dense")).logits
    ours, _ = jacobi_forcing_loss_sum(logits, targets, ar_weight=1.0)
    reference = 0.0
    for prompt, row in zip(PROMPTS, pairs):
        answer = [t for _, fixed in row for t in fixed]
        with torch.no_grad():
            plain = model(input_ids=torch.tensor([prompt + answer])).logits
        reference += causal_lm_loss_sum(plain, torch.tensor([[-100] * len(prompt) + answer])).item()
    assert ours.item() == pytest.approx(reference, abs=1e-4)


# ----- FlexAttention against the dense reference ----------------------------------------------------

FLEX_FAMILIES = ["llama", "qwen3", "gemma"]


def loss_and_gradients(model, layout, targets, backend, noisy_context):
    model.zero_grad()
    logits = model(input_ids=layout.input_ids, position_ids=layout.position_ids,
                   attention_mask=training_attention(model, layout, backend, noisy_context)).logits
    loss, _ = jacobi_forcing_loss_sum(logits, targets, ar_weight=10.0)
    if torch.is_grad_enabled():
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.item(), None


@pytest.mark.parametrize("family", FLEX_FAMILIES)
def test_flex_attention_equals_dense_loss(family, static_flex_compile):
    """The compiled FlexAttention block mask gives the dense reference's loss (forward; CPU)."""
    model, _ = tiny_model(family)
    layout, targets = build_batch(PROMPTS, PAIRS)
    with torch.no_grad():
        dense, _ = loss_and_gradients(model, layout, targets, "dense", "noisy")
        model.set_attn_implementation("flex_attention")
        flex, _ = loss_and_gradients(model, layout, targets, "flex", "noisy")
    assert abs(flex - dense) / len(targets.ar_labels) < 1e-5


def assert_flex_gradients_equal_dense(family, device, noisy_context):
    model, _ = tiny_model(family)
    model = model.to(device).train()
    layout, targets = build_batch(PROMPTS, PAIRS)
    layout, targets = layout.to(device), targets.to(device)
    model.set_attn_implementation("sdpa")
    dense_loss, dense_grads = loss_and_gradients(model, layout, targets, "dense", noisy_context)
    model.set_attn_implementation("flex_attention")
    flex_loss, flex_grads = loss_and_gradients(model, layout, targets, "flex", noisy_context)
    assert abs(flex_loss - dense_loss) / len(targets.ar_labels) < 1e-5
    torch.testing.assert_close(flex_grads, dense_grads, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family,noisy_context", [(f, "noisy") for f in FLEX_FAMILIES] + [("llama", "clean")])
def test_flex_attention_equals_dense_gradients_on_cpu(family, noisy_context, eager_flex_backward_on_cpu):
    assert_flex_gradients_equal_dense(family, "cpu", noisy_context)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention backward needs CUDA")
@pytest.mark.parametrize("family", FLEX_FAMILIES)
def test_flex_attention_equals_dense_gradients_on_cuda(family):
    assert_flex_gradients_equal_dense(family, "cuda", "noisy")


# ----- Bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prompts,pairs,match", [
    ([[1]], [[([1, 2, 3], [1, 2])]], "the noisy state has 3 tokens and the fixed point 2"),
    ([[1]], [[([1, 2], [1, 2]), ([1], [1]), ([1, 2], [1, 2])]], "block 1 has 1 tokens but block 0 has 2"),
    ([[1]], [[([1], [1]), ([1, 2], [1, 2])]], "block 1 has 2 tokens but block 0 has 1"),
    ([[1]], [[]], "row 0 has no .* pairs"),
    ([[]], [[([1], [1])]], "empty prompt"),
    ([[1], [2]], [[([1], [1])]], "2 prompts but pairs for 1 rows"),
    ([], [], "no rows"),
])
def test_bad_rows_are_clear_errors(prompts, pairs, match):
    with pytest.raises(JacobiForcingError, match=match):
        build_batch(prompts, pairs)


def test_bad_trajectories_and_settings_are_clear_errors():
    with pytest.raises(JacobiForcingError, match="empty trajectory"):
        pick_states([])
    with pytest.raises(JacobiForcingError, match="block 1 has no states"):
        pick_states([[[1, 2]], []])
    with pytest.raises(JacobiForcingError, match="same, nonzero length"):
        pick_states([[[1, 2, 3], [1, 2]]])
    with pytest.raises(JacobiForcingError, match="strategy must be one of"):
        pick_states([[[1]]], strategy="random")
    with pytest.raises(JacobiForcingError, match="min_ratio <= max_ratio"):
        noise_schedule(4, 0.8, 0.2)
    with pytest.raises(JacobiForcingError, match="window_size must be a positive integer"):
        noise_schedule(0)
    with pytest.raises(JacobiForcingError, match="noisy_context must be one of"):
        training_attention(tiny_model("llama")[0], pack_rows(PROMPTS, PAIRS)[0], "dense", "both")


def test_rows_beyond_the_model_are_clear_errors(tiny):
    model, _ = tiny("llama")  # max_position_embeddings=512
    layout, _ = pack_rows([[1] * 500], [[([2] * 8, [3] * 8)] * 2])
    with pytest.raises(JacobiForcingError, match="max_position_embeddings=512"):
        training_attention(model, layout, "dense")
    mistral, _ = tiny("mistral")  # sliding_window=256
    layout, _ = pack_rows([[1] * 100], [[([2] * 40, [3] * 40)] * 2])  # 260 columns, positions < 260
    with pytest.raises(JacobiForcingError, match="sliding window of 256"):
        training_attention(mistral, layout, "dense")
    flex_model, _ = tiny_model("llama")
    flex_model.set_attn_implementation("flex_attention")
    with pytest.raises(JacobiForcingError, match="train.attention=dense"):
        training_attention(flex_model, pack_rows(PROMPTS, PAIRS)[0], "flex")


def test_attention_bench_times_the_jacobi_forcing_mask():
    from leaplm.bench.attention import measure

    row = measure(48, "dense", "train", steps=1, block_size=8, batch_size=2, mask="jacobi_forcing")
    assert row["mask"] == "jacobi_forcing" and row["tokens_per_s"] > 0
