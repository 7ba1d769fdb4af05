"""Chunked linear + CE / soft CE: values and gradients against the dense losses over full logits."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from leaplm.config import TrainConfig
from leaplm.losses import jacobi_forcing as jf_loss
from leaplm.losses.linear_cross_entropy import linear_cross_entropy_sum, linear_soft_cross_entropy_sum
from leaplm.models.block_diffusion import convert
from leaplm.models.zoo import final_hidden_states, tiny_model
from leaplm.train import ar2bd, jacobi_forcing, pretrain


def test_zero_hidden_gives_log_vocab_per_row():
    # Hand-computed: zero hidden states make uniform logits, CE = log v per counted row.
    hidden = torch.zeros(5, 4)
    weight = torch.randn(7, 4)
    labels = torch.tensor([0, 3, -100, 6, 2])
    loss = linear_cross_entropy_sum(hidden, weight, labels, row_weights=torch.tensor([1.0, 2.0, 5.0, 1.0, 0.5]))
    assert loss.item() == pytest.approx(4.5 * math.log(7), rel=1e-6)


def _dense_ce(hidden, weight, labels, row_weights, label_smoothing):
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T  # [n, v]
    ce = F.cross_entropy(logits, labels.reshape(-1), reduction="none", label_smoothing=label_smoothing)
    return (ce * row_weights.reshape(-1)).sum()


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_matches_dense_loss_and_grads(chunk_size, label_smoothing):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)  # [b, s, h]
    weight = torch.randn(13, 8, generator=g, requires_grad=True)  # odd vocab
    labels = torch.randint(0, 13, (2, 5), generator=g)
    labels[0, 1] = labels[1, 4] = -100
    row_weights = torch.rand(2, 5, generator=g) + 0.5
    fused = linear_cross_entropy_sum(hidden, weight, labels, row_weights=row_weights,
                                     label_smoothing=label_smoothing, chunk_size=chunk_size)
    grads = torch.autograd.grad(2.5 * fused, (hidden, weight))  # a non-unit upstream gradient
    dense = _dense_ce(hidden, weight, labels, row_weights, label_smoothing)
    expected = torch.autograd.grad(2.5 * dense, (hidden, weight))
    torch.testing.assert_close(fused, dense, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cross_entropy_keeps_bf16_dtypes_of_inputs_in_gradients():
    hidden = torch.randn(6, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.bfloat16, requires_grad=True)
    loss = linear_cross_entropy_sum(hidden, weight, torch.randint(0, 11, (6,)), chunk_size=4)
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("kl", [False, True])
@pytest.mark.parametrize("distill_temperature", [1.0, 2.0])
def test_soft_cross_entropy_matches_dense_loss_and_grads(kl, distill_temperature):
    g = torch.Generator().manual_seed(1)
    student = torch.randn(9, 8, generator=g, requires_grad=True)
    teacher = torch.randn(9, 8, generator=g, requires_grad=True)
    weight = torch.randn(17, 8, generator=g, requires_grad=True)
    row_weights = (torch.arange(9) % 3 != 0).float()  # counted columns, as the consistency loss passes them
    fused = linear_soft_cross_entropy_sum(student, teacher, weight, row_weights=row_weights,
                                          distill_temperature=distill_temperature, kl=kl, chunk_size=4)
    grads = torch.autograd.grad(fused, (student, weight))
    log_q = (student @ weight.T / distill_temperature).log_softmax(-1)
    log_p = (teacher @ weight.T / distill_temperature).detach().log_softmax(-1)
    per_row = -(log_p.exp() * (log_q - log_p if kl else log_q)).sum(-1)  # [n]
    dense = (per_row * row_weights).sum() * distill_temperature ** 2
    expected = torch.autograd.grad(dense, (student, weight))
    torch.testing.assert_close(fused, dense, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert teacher.grad is None  # the teacher is detached
    _, soft_rows, kl_rows = linear_soft_cross_entropy_sum(student, teacher, weight, distill_temperature=distill_temperature,
                                                          return_rows=True)
    entropy = -(log_p.exp() * log_p).sum(-1) * distill_temperature ** 2  # [n]
    torch.testing.assert_close(soft_rows, -(log_p.exp() * log_q).sum(-1).detach() * distill_temperature ** 2)
    torch.testing.assert_close(kl_rows, soft_rows - entropy, rtol=1e-5, atol=1e-5)


def test_kl_of_identical_distributions_is_zero():
    hidden = torch.randn(4, 8)
    weight = torch.randn(10, 8)
    assert linear_soft_cross_entropy_sum(hidden, hidden, weight, kl=True).item() == pytest.approx(0.0, abs=1e-5)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="lm_head.weight"):
        linear_cross_entropy_sum(torch.zeros(2, 4), torch.zeros(4, 7), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy_sum(torch.zeros(2, 4), torch.zeros(7, 4), torch.zeros(2, dtype=torch.long), chunk_size=0)


# ----- Wired into the recipes -----------------------------------------------------------------


def _loss_and_grads(recipe_loss, model, batch, cfg):
    model.zero_grad()
    loss, metrics = recipe_loss(model, batch, cfg)
    loss.backward()
    return loss.detach(), metrics, [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _assert_fused_equals_plain(recipe_loss, method, model, batch, attention="auto", **settings):
    def cfg(fused_loss):
        return SimpleNamespace(method=method(**settings), train=TrainConfig(attention=attention, fused_loss=fused_loss))

    plain = _loss_and_grads(recipe_loss, model, batch, cfg(False))
    fused = _loss_and_grads(recipe_loss, model, batch, cfg(True))
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-5)
    assert fused[1].keys() == plain[1].keys()
    for key in plain[1]:
        assert fused[1][key] == pytest.approx(plain[1][key], rel=1e-5, abs=1e-5)  # the KL: a difference of sums
    assert len(fused[2]) == len(plain[2])
    for got, want in zip(fused[2], plain[2]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_ar2bd_fused_loss_equals_the_logits_loss():
    model, tokenizer = tiny_model("qwen3")
    tokenizer = copy.deepcopy(tokenizer)  # the mask token must not leak into other tests' tokenizer
    convert(model, tokenizer, 4, "causal")
    # each sample's noise seed: both calls draw the same masks
    batch = {"prompts": [[5, 6, 7], [8, 9]], "responses": [[10, 11, 12, 13, 14, 15], [16, 17, 18]], "step": 0,
             "noise_seeds": [0, 1]}
    _assert_fused_equals_plain(ar2bd.loss, ar2bd.AR2BDConfig, model.train(), batch, block_size=4, ar_weight=0.5,
                               inverse_t_weight=True)


def test_pretrain_fused_loss_equals_the_logits_loss(tiny):
    model, _ = tiny("llama")
    labels = torch.tensor([[-100, -100, 7, 8, 9, 10], [-100, 4, 5, 6, -100, -100]])
    batch = {"input_ids": labels.clamp(min=3), "attention_mask": torch.ones_like(labels), "labels": labels}
    try:
        _assert_fused_equals_plain(pretrain.loss, pretrain.PretrainConfig, model.train(), batch)
    finally:
        model.eval().zero_grad(set_to_none=True)


def test_fused_loss_refuses_soft_capped_logits(tiny):
    model, _ = tiny("gemma2")
    with pytest.raises(ValueError, match="fused_loss=false"):
        final_hidden_states(model, input_ids=torch.tensor([[3, 4]]))


def test_jacobi_forcing_fused_loss_equals_the_logits_loss(tiny):
    model, _ = tiny("qwen2")
    pairs = [[([20, 40, 41, 42], [20, 21, 22, 23]), ([44, 45], [28, 29])], [([30, 31, 32, 46], [30, 31, 32, 33])]]
    layout, targets = jf_loss.build_batch([[5, 6, 7], [8, 9, 10, 11, 12]], pairs)
    try:
        _assert_fused_equals_plain(jacobi_forcing.loss, jacobi_forcing.JacobiForcingConfig, model.train(),
                                   {"layout": layout, "targets": targets}, jacobi_block_size=4, distill_temperature=2.0,
                                   attention="dense")
    finally:
        model.eval().zero_grad(set_to_none=True)
