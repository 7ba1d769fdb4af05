"""Distilling a block-diffusion LM into fewer denoising steps: noising and losses of dParallel and CD4LM.

References: dParallel (Chen et al., 2025; czg1225/dParallel, ``LLaDA/llada_train.py``) and CD4LM;
the batch layout (``[clean | noisy]`` rows, response-aligned blocks, slot 0 from the clean stream,
token shift) and the targets are ``losses/block_diffusion.py``'s, reused as they are.

**Certainty forcing (dParallel).** Semi-autoregressive noising of the model's own answer: one
block k per row is chosen, its slots are masked at rate ``rate`` (0.5 in the reference), and
the complementary copy masks exactly its other slots. Earlier blocks are clean and later blocks
fully masked in the reference; in our two-stream layout a noisy block attends only to the clean
stream's earlier blocks and to itself, so block k sees exactly that state whatever the other
noisy blocks hold, and only block k is noised (``blocks="one"``). Because every noisy block sees
only clean earlier blocks, the layout can also noise *every* block of the row at once, each as
the block k of its own semi-AR input, for the same forward cost (``blocks="all"``, our
addition). The loss is CE on the masked tokens plus ``entropy_weight`` times the entropy of
``softmax(logits / T)`` averaged over the masked tokens whose argmax already equals the target: it
sharpens the predictions that are right and leaves the wrong ones to the CE.

**Consistency distillation (CD4LM).** Nested masks: the student masks each maskable slot with
a rate ``r_s ~ U(0.4, 0.9)`` (drawn per row); the teacher masks a subset of the student's
masked slots, with rate ``clip(r_s * U(0.3, 0.7), 0.1, 0.6)``. The frozen teacher sees the less
masked input; the loss is ``lambda * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) +
(1 - lambda) * CE``, both terms clamped to at most 5 (per token here), ``lambda`` held at 0.9
for the first 10% of training and then cosine to 0.5.

Sums over tokens, as every leaplm loss: the trainer divides by the step's number of answer
tokens. dParallel's entropy is a mean over the correct tokens, which the trainer's division cannot
give: :func:`certainty_forcing_loss_sum` scales it so that it does (``entropy_mean``). CD4LM
clamps the batch means (here: each token's term). The KL is taken at the slots the teacher
still has masked: with the token shift, the logit before a slot the teacher can see carries no
trained prediction of it (which slots the reference uses is unverified).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from leaplm.losses.block_diffusion import NOISY_TARGET, RowGenerators, Targets, row_generators

NOISED_BLOCKS = ("one", "all")


def _maskable(length: int, block_size: int) -> torch.Tensor:
    """Bool [length]: the slots a noisy stream may mask (all but each block's first)."""
    return torch.arange(length) % block_size != 0


def semi_ar_masks(response_lengths: list[int], block_size: int, rate: float | tuple[float, float],
                  blocks: str = "one", generator: RowGenerators = None) -> list[torch.Tensor]:
    """Certainty-forcing masks (bool [R_i] per row), then the complementary copies of every row.

    ``blocks="one"``: one block per row (uniform over its blocks with a maskable slot) is masked at ``rate``; its
    complementary copy masks exactly the block's other maskable slots, and no other block.
    ``blocks="all"``: every block is masked at ``rate`` and the copy masks the complement.
    ``rate`` may be a range ``(lo, hi)``: each noised block then draws its own rate from U(lo, hi).
    ``generator``: one for every row, or a list with one per row.
    """
    if blocks not in NOISED_BLOCKS:
        raise ValueError(f"blocks must be one of {', '.join(NOISED_BLOCKS)}, got {blocks!r}")
    lo, hi = (rate, rate) if isinstance(rate, (int, float)) else rate
    masks, complements = [], []
    for length, generator in zip(response_lengths, row_generators(generator, len(response_lengths))):
        maskable = _maskable(length, block_size)  # [R]
        block_of = torch.arange(length) // block_size  # [R]
        if blocks == "one":
            # uniform over the blocks with a maskable slot: a last block holding only its first
            # slot has none, and drawing it would waste the row
            n_blocks = max(1, -(-(length - 1) // block_size))
            k = int(torch.randint(n_blocks, (1,), generator=generator))
            maskable &= block_of == k
        if lo == hi:
            drawn = torch.rand(length, generator=generator) < lo  # [R]
        else:
            block_rates = lo + (hi - lo) * torch.rand(int(block_of[-1]) + 1, generator=generator)  # [n_blocks]
            drawn = torch.rand(length, generator=generator) < block_rates[block_of]  # [R]
        masks.append(maskable & drawn)
        complements.append(maskable & ~drawn)
    return masks + complements


def nested_masks(response_lengths: list[int], block_size: int, *, student_rate: tuple[float, float] = (0.4, 0.9),
                 teacher_scale: tuple[float, float] = (0.3, 0.7), teacher_clip: tuple[float, float] = (0.1, 0.6),
                 generator: RowGenerators = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """CD4LM's (student masks, teacher masks), bool [R_i] per row; each teacher mask is a subset
    of its student mask, so the teacher always sees at least what the student sees.
    ``generator``: one for every row, or a list with one per row."""
    students, teachers = [], []
    for length, generator in zip(response_lengths, row_generators(generator, len(response_lengths))):
        maskable = _maskable(length, block_size)  # [R]
        lo, hi = student_rate
        r_s = lo + (hi - lo) * float(torch.rand(1, generator=generator))
        lo, hi = teacher_scale
        r_t = min(max(r_s * (lo + (hi - lo) * float(torch.rand(1, generator=generator))), teacher_clip[0]),
                  teacher_clip[1])
        student = maskable & (torch.rand(length, generator=generator) < r_s)  # [R]
        # Keep each student-masked slot masked for the teacher with probability r_t / r_s, so
        # the teacher's rate is r_t and its mask nested in the student's.
        teacher = student & (torch.rand(length, generator=generator) < r_t / r_s)  # [R]
        students.append(student)
        teachers.append(teacher)
    return students, teachers


def entropy(logits: torch.Tensor, entropy_temperature: float = 1.0) -> torch.Tensor:
    """Entropy in nats of ``softmax(logits / entropy_temperature)`` over the last axis; [...]."""
    log_p = F.log_softmax(logits.float() / entropy_temperature, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


ENTROPY_MEANS = ("correct", "targets")


def certainty_forcing_loss_sum(logits: torch.Tensor, targets: Targets, *, entropy_weight: float = 2.0,
                               entropy_temperature: float = 0.5,
                               entropy_mean: str = "correct") -> tuple[torch.Tensor, dict[str, float]]:
    """Σ CE over ``targets`` + ``entropy_weight`` × the entropy term, for the trainer to divide by
    the step's target count N; logits [b, T, V]. Block-start targets get CE only.

    The entropy is that of softmax(logit / T) on the masked targets whose argmax equals their label.
    ``entropy_mean="correct"`` (dParallel): its sum × n / n_correct, n = ``len(targets.labels)``, the
    batch's target count (the collator's ``n_targets``). Divided by N = Σ n over the step's
    micro-batches and processes, the term is Σ_batches (n / N) × mean entropy over the batch's
    correct tokens: the mean per micro-batch, as the reference (per device and accumulation step;
    exactly its average when every micro-batch holds as many targets), weighted like the CE. A mean
    over the step's correct tokens would need every micro-batch's forward before the first backward.
    ``"targets"``: the plain sum, so after the division its weight is ``entropy_weight`` ×
    n_correct / N, smaller the fewer are right.
    """
    if entropy_mean not in ENTROPY_MEANS:
        raise ValueError(f"entropy_mean must be one of {', '.join(ENTROPY_MEANS)}, got {entropy_mean!r}")
    picked = logits[targets.rows, targets.cols].float()  # [n, V]
    ce = F.cross_entropy(picked, targets.labels, reduction="none")  # [n]
    masked = targets.kinds == NOISY_TARGET  # [n]
    correct = masked & (picked.argmax(-1) == targets.labels)  # [n]
    h = entropy(picked[correct], entropy_temperature)  # [n_correct]
    metrics = {"ce_masked": float(ce[masked].detach().mean()) if masked.any() else 0.0,
               "masked_correct": float(correct.sum() / masked.sum().clamp(min=1)),
               "entropy_correct": float(h.detach().mean()) if len(h) else 0.0}
    h_term = h.sum() * len(targets.labels) / max(len(h), 1) if entropy_mean == "correct" else h.sum()
    return ce.sum() + entropy_weight * h_term, metrics


def kl_teacher_student(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                       kl_temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) over the last axis, [...]; teacher detached.

    The forward KL, as CD4LM: Σ_v p_t (log p_t - log p_s), which makes the student cover every
    token the teacher gives mass to."""
    log_t = F.log_softmax(teacher_logits.detach().float() / kl_temperature, dim=-1)
    log_s = F.log_softmax(student_logits.float() / kl_temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1)


def consistency_lambda(step: int, max_steps: int, start: float = 0.9, end: float = 0.5, hold: float = 0.1) -> float:
    """CD4LM's KL weight: ``start`` for the first ``hold`` of training, then cosine down to ``end``."""
    held = hold * max_steps
    if step < held:
        return start
    progress = min(1.0, (step - held) / max(1.0, max_steps - held))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def kl_consistency_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: Targets,
                            distilled: torch.Tensor, *, weight: float, kl_temperature: float = 2.0,
                            clamp: float = 5.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Σ over ``targets`` of ``(1 - weight) × CE`` plus, where ``distilled`` [n] (the slots the
    teacher has masked too), ``weight × T² × KL(teacher || student)``; each token's term clamped
    to ``clamp``. Both logits [b, T, V] come from layouts of the same shape."""
    student = student_logits[targets.rows, targets.cols]  # [n, V]
    teacher = teacher_logits[targets.rows, targets.cols]  # [n, V]
    ce = F.cross_entropy(student.float(), targets.labels, reduction="none").clamp(max=clamp)  # [n]
    kl = (kl_temperature ** 2 * kl_teacher_student(teacher, student, kl_temperature)).clamp(max=clamp)  # [n]
    kl = kl * distilled
    metrics = {"ce": float(ce.detach().mean()), "kl": float(kl.detach().sum() / distilled.sum().clamp(min=1)),
               "lambda": weight}
    return (1 - weight) * ce.sum() + weight * kl.sum(), metrics


def target_keys(targets: Targets, width: int) -> torch.Tensor:
    """One integer per target, ``row * width + col``, to match targets of layouts of the same shape."""
    return targets.rows * width + targets.cols
