"""dParallel and CD4LM losses and masks on small hand-computed cases."""

import math

import pytest
import torch

from leaplm.losses.block_diffusion import BLOCK_START_TARGET, NOISY_TARGET, Targets
from leaplm.losses.dllm_distill import (
    certainty_forcing_loss_sum,
    consistency_lambda,
    entropy,
    kl_consistency_loss_sum,
    kl_teacher_student,
    nested_masks,
    semi_ar_masks,
)


def targets(cols, labels, kinds):
    n = len(cols)
    return Targets(torch.zeros(n, dtype=torch.long), torch.tensor(cols), torch.tensor(labels), torch.ones(n),
                   torch.tensor(kinds))


def test_certainty_forcing_entropy_only_on_correct_masked_tokens():
    # Two tokens, logits (log 3, 0): p = (3/4, 1/4) at T = 1; at T = 0.5 p = (9/10, 1/10).
    logit = torch.tensor([math.log(3), 0.0])
    logits = logit.expand(1, 3, 2).clone()  # [b=1, T=3, V=2]
    # col 0: masked, label 0 (argmax right); col 1: masked, label 1 (wrong); col 2: block start, label 0 (right)
    t = targets([0, 1, 2], [0, 1, 0], [NOISY_TARGET, NOISY_TARGET, BLOCK_START_TARGET])
    ce = -math.log(0.75) - math.log(0.25) - math.log(0.75)
    h_half = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))  # only col 0 counts
    # Default (dParallel): the mean over the 1 correct token, times the 3 targets the trainer divides by.
    loss, metrics = certainty_forcing_loss_sum(logits, t, entropy_weight=2.0, entropy_temperature=0.5)
    assert loss.item() == pytest.approx(ce + 2 * h_half * 3, rel=1e-5)
    assert metrics["masked_correct"] == pytest.approx(0.5)
    summed, _ = certainty_forcing_loss_sum(logits, t, entropy_weight=2.0, entropy_temperature=0.5, entropy_mean="targets")
    assert summed.item() == pytest.approx(ce + 2 * h_half, rel=1e-5)
    loss_t1, _ = certainty_forcing_loss_sum(logits, t, entropy_weight=1.0, entropy_temperature=1.0)
    assert loss_t1.item() == pytest.approx(ce - 3 * (0.75 * math.log(0.75) + 0.25 * math.log(0.25)), rel=1e-5)
    # No correct masked token: CE only, in both forms.
    wrong = targets([1], [1], [NOISY_TARGET])
    for mean in ("correct", "targets"):
        only_ce = certainty_forcing_loss_sum(logits, wrong, entropy_mean=mean)[0].item()
        assert only_ce == pytest.approx(-math.log(0.25), rel=1e-5)
    with pytest.raises(ValueError, match="entropy_mean"):
        certainty_forcing_loss_sum(logits, t, entropy_mean="masked")


def test_certainty_forcing_entropy_weight_after_the_trainers_division():
    # The trainer divides the micro-batches' summed losses by the step's N targets. Logits (log a, 0)
    # at T = 0.5 give p = a^2 / (a^2 + 1): a = 3, 2, 4 -> p = 9/10, 4/5, 16/17, all right (label 0).
    def h(p):
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))

    def row(*a):
        return torch.tensor([[[math.log(x), 0.0] for x in a]])  # [1, len(a), 2]

    noisy = [NOISY_TARGET, NOISY_TARGET]
    first = (row(3, 2), targets([0, 1], [0, 0], noisy))  # 2 targets, both right
    second = (row(4, 3), targets([0, 1], [0, 1], noisy))  # 2 targets, col 1 wrong (argmax 0, label 1)
    n = 4

    def entropy_term(mean):
        return sum(certainty_forcing_loss_sum(x, t, entropy_weight=2.0, entropy_mean=mean)[0]
                   - certainty_forcing_loss_sum(x, t, entropy_weight=0.0, entropy_mean=mean)[0]
                   for x, t in (first, second)).item() / n

    # dParallel's per micro-batch means, averaged over the two (equal-sized) accumulation steps.
    paper = 2 * ((h(0.9) + h(0.8)) / 2 + h(16 / 17)) / 2
    assert entropy_term("correct") == pytest.approx(paper, rel=1e-5)
    # Summed: weight 2 x n_correct / N = 2 x 3 / 4 on the mean over the 3 right tokens.
    assert entropy_term("targets") == pytest.approx(2 * (h(0.9) + h(0.8) + h(16 / 17)) / n, rel=1e-5)


def test_entropy_gradient_sharpens_the_right_prediction():
    logits = torch.tensor([[[1.0, 0.0]]], requires_grad=True)
    loss, _ = certainty_forcing_loss_sum(logits, targets([0], [0], [NOISY_TARGET]), entropy_weight=2.0)
    loss.backward()
    assert logits.grad[0, 0, 0] < 0 < logits.grad[0, 0, 1]  # descent raises the right logit


def test_semi_ar_masks_one_block_and_its_complement():
    torch.manual_seed(0)
    lengths, block = [10, 7], 4
    masks = semi_ar_masks(lengths, block, rate=0.5, blocks="one")
    assert len(masks) == 4
    for k, length in enumerate(lengths):
        mask, comp = masks[k], masks[k + len(lengths)]
        union = mask | comp
        assert not (mask & comp).any()
        slots = torch.arange(length)
        chosen = set((slots[union] // block).tolist())
        assert len(chosen) == 1  # exactly one block noised, in both copies
        (b,) = chosen
        in_block = (slots // block == b) & (slots % block != 0)
        assert torch.equal(union, in_block)  # the copy masks exactly the rest; slot 0 never masked
    # A last block holding only its (unmaskable) first slot is never the one drawn.
    g = torch.Generator().manual_seed(0)
    drawn = [semi_ar_masks([9], 8, rate=0.5, blocks="one", generator=g) for _ in range(50)]
    assert all(torch.equal(m | c, (torch.arange(9) < 8) & (torch.arange(9) % 8 != 0)) for m, c in drawn)
    every = semi_ar_masks([9], 3, rate=0.5, blocks="all")
    assert torch.equal(every[0] | every[1], torch.arange(9) % 3 != 0)


def test_semi_ar_masks_draw_a_rate_per_block_from_a_range():
    g = torch.Generator().manual_seed(0)
    n_blocks, block = 400, 16

    def block_fractions(rate):
        mask, comp = semi_ar_masks([n_blocks * block], block, rate=rate, blocks="all", generator=g)
        assert not (mask & comp).any()
        return mask.view(n_blocks, block)[:, 1:].float().mean(1)  # [n_blocks] slot 0 is never masked

    fixed, spread, high = block_fractions(0.5), block_fractions((0.0, 1.0)), block_fractions((0.9, 1.0))
    assert fixed.mean() == pytest.approx(0.5, abs=0.03) and spread.mean() == pytest.approx(0.5, abs=0.05)
    assert fixed.std() < 0.2 < spread.std()  # per-block rates: whole blocks near empty and near full
    assert high.mean() == pytest.approx(0.95, abs=0.02) and (high == 1).float().mean() > 0.3


def test_nested_masks_are_nested_and_at_the_reference_rates():
    gen = torch.Generator().manual_seed(0)
    students, teachers = nested_masks([64] * 400, 16, generator=gen)
    maskable = (torch.arange(64) % 16 != 0).sum().item()
    s_rates, t_rates = [], []
    for s, t in zip(students, teachers):
        assert not (t & ~s).any()  # teacher mask subset of the student's
        assert not s[::16].any()  # block starts never masked
        s_rates.append(s.sum().item() / maskable)
        t_rates.append(t.sum().item() / maskable)
    assert 0.3 < min(s_rates) and max(s_rates) < 1.0
    assert sum(s_rates) / len(s_rates) == pytest.approx(0.65, abs=0.03)  # E U(0.4, 0.9)
    assert max(t_rates) < 0.7 and sum(t_rates) < sum(s_rates)


def test_kl_direction_is_teacher_to_student():
    teacher = torch.log(torch.tensor([0.5, 0.5]))
    student = torch.log(torch.tensor([0.9, 0.1]))
    # KL(t || s) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = ln(5/3); the reverse would be 0.9 ln 1.8 + 0.1 ln 0.2
    assert kl_teacher_student(teacher, student, 1.0).item() == pytest.approx(math.log(5 / 3), rel=1e-5)
    assert kl_teacher_student(student, teacher, 1.0).item() == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2),
                                                                             rel=1e-5)
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    kl_teacher_student(t, s, 1.0).backward()
    assert t.grad is None or not t.grad.any()  # the teacher is detached


def test_consistency_loss_hand_computed():
    teacher = torch.log(torch.tensor([[[0.5, 0.5], [0.5, 0.5]]]))  # [1, 2, 2]
    student = torch.log(torch.tensor([[[0.9, 0.1], [0.9, 0.1]]]))
    t = targets([0, 1], [0, 1], [NOISY_TARGET, NOISY_TARGET])
    distilled = torch.tensor([True, False])  # only col 0 is masked for the teacher too
    lam, temp = 0.9, 1.0
    loss, metrics = kl_consistency_loss_sum(student, teacher, t, distilled, weight=lam, kl_temperature=temp)
    ce = -math.log(0.9) - math.log(0.1)
    assert loss.item() == pytest.approx((1 - lam) * ce + lam * math.log(5 / 3), rel=1e-5)
    # T^2 scaling and the clamp at 5 per token
    loss2, _ = kl_consistency_loss_sum(student, teacher, t, distilled, weight=1.0, kl_temperature=2.0)
    log_p = torch.log_softmax(teacher[0, 0] / 2, -1)
    log_q = torch.log_softmax(student[0, 0] / 2, -1)
    assert loss2.item() == pytest.approx(4 * float((log_p.exp() * (log_p - log_q)).sum()), rel=1e-5)
    huge = torch.tensor([[[20.0, -20.0], [20.0, -20.0]]])
    clamped, _ = kl_consistency_loss_sum(huge, -huge, t, torch.tensor([True, True]), weight=0.5)
    assert clamped.item() == pytest.approx(0.5 * (ce_of(huge[0, 0], 0) + 5.0) + 0.5 * 10.0, rel=1e-4)


def ce_of(logit, label):
    return float(-torch.log_softmax(logit, -1)[label])


def test_consistency_lambda_schedule():
    assert consistency_lambda(0, 100) == 0.9
    assert consistency_lambda(9, 100) == 0.9
    assert consistency_lambda(10, 100) == pytest.approx(0.9)
    assert consistency_lambda(55, 100) == pytest.approx(0.7)  # halfway through the cosine
    assert consistency_lambda(100, 100) == pytest.approx(0.5)


def test_entropy_of_uniform():
    assert entropy(torch.zeros(4)).item() == pytest.approx(math.log(4))
