"""Losses over ``hidden @ lm_head.T`` that never hold the full ``[tokens, vocab]`` logits.

A language model's training loss usually materialises the logits of every position (at vocab
152k and 2048 tokens that is 1.2 GB in fp32), then a log-softmax of the same size, then its
gradient. Here the rows are cut into chunks of ``chunk_size``: each chunk's logits are computed,
reduced to its loss and, when a gradient is needed, turned into its contribution to the
gradients of the hidden states and of the head weight right away, then freed. Peak memory is
the head weight's gradient plus O(chunk_size * vocab), whatever the number of rows.

The gradients are computed in the forward pass (as Liger Kernel does) rather than by recomputing
each chunk's logits in backward: the loss is a scalar sum, so the backward only scales the stored
gradients by the incoming one, and one matmul per chunk is saved.

- :func:`linear_cross_entropy_sum`: hard-label CE (with ``ignore_index``, per-row weights and
  label smoothing as ``F.cross_entropy`` defines it). On CUDA, without row weights, it runs Liger
  Kernel's fused linear cross-entropy when ``liger_kernel`` is installed.
- :func:`linear_soft_cross_entropy_sum`: soft CE / KL from a detached teacher's hidden states
  through the same head (consistency and distillation losses), with a distillation temperature.

Both return sums, as the other losses do: the trainer normalises over the whole step. The hidden
states and the head weight come from one forward, ``models/zoo.py::final_hidden_states``.
"""

from __future__ import annotations

import math

import torch

from leaplm.data.sft import IGNORE_INDEX

DEFAULT_CHUNK = 256  # rows per chunk: at vocab 152k a chunk's fp32 logits take 156 MB


def _chunks(n: int, chunk_size: int):
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer (rows of logits held at once), got {chunk_size!r}")
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ_i w_i * CE_ε(h_i @ W.T, y_i) over rows whose label is not ``ignore_index``, and the
    unweighted CE of every row (0 where ignored), which carries no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, row_weights, ignore_index, label_smoothing, chunk_size):
        # hidden [n, h], weight [v, h], labels [n], row_weights [n] float
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w32 = weight.float()  # [v, h] no copy when the head is fp32 already
        v = w32.shape[0]
        per_row = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # [n] unweighted CE
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if needs_grad else None  # [n, h]
        grad_weight = torch.zeros_like(w32) if needs_grad else None  # [v, h]
        for start, end in _chunks(hidden.shape[0], chunk_size):
            h = hidden[start:end].float()  # [c, h]
            y = labels[start:end]  # [c]
            scale = row_weights[start:end] * (y != ignore_index)  # [c] 0 on ignored rows
            logits = h @ w32.T  # [c, v]
            lse = logits.logsumexp(-1)  # [c]
            target = logits.gather(1, y.clamp(min=0)[:, None]).squeeze(1)  # [c]
            ce = lse - target
            if label_smoothing:
                ce = (1 - label_smoothing) * ce + label_smoothing * (lse - logits.mean(-1))
            per_row[start:end] = ce * (y != ignore_index)
            if needs_grad:
                # dCE/dlogits = softmax - (1 - ε) onehot(y) - ε / v, written over the logits in place.
                grad = logits.sub_(lse[:, None]).exp_()  # [c, v] softmax
                grad.scatter_add_(1, y.clamp(min=0)[:, None], torch.full_like(target, -(1 - label_smoothing))[:, None])
                if label_smoothing:
                    grad.sub_(label_smoothing / v)
                grad.mul_(scale[:, None])
                grad_hidden[start:end] = grad @ w32  # [c, h]
                grad_weight.addmm_(grad.T, h)  # [v, h]
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.dtypes = hidden.dtype, weight.dtype
        ctx.mark_non_differentiable(per_row)
        return (per_row * row_weights).sum(), per_row

    @staticmethod
    def backward(ctx, grad_output, _grad_rows):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return ((grad_hidden * grad_output).to(hidden_dtype), (grad_weight * grad_output).to(weight_dtype),
                None, None, None, None, None)


class _LinearSoftCrossEntropy(torch.autograd.Function):
    """Σ_i w_i * T² * Σ_v -p_i(v) log q_i(v) (minus the teacher entropy for KL), where
    q = softmax(h_s @ W.T / T) and p = softmax(h_t @ W.T / T) with the teacher detached; and every
    row's unweighted T² soft CE and KL, which carry no gradient."""

    @staticmethod
    def forward(ctx, student, teacher, weight, row_weights, distill_temperature, kl, chunk_size):
        # student, teacher [n, h], weight [v, h], row_weights [n] float
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        w32 = weight.float()  # [v, h]
        soft_rows = torch.zeros(student.shape[0], dtype=torch.float32, device=student.device)  # [n]
        kl_rows = torch.zeros_like(soft_rows)  # [n]
        grad_student = torch.zeros_like(student, dtype=torch.float32) if needs_grad else None  # [n, h]
        grad_weight = torch.zeros_like(w32) if needs_grad else None  # [v, h]
        for start, end in _chunks(student.shape[0], chunk_size):
            h = student[start:end].float()  # [c, h]
            log_q = (h @ w32.T).div_(distill_temperature).log_softmax(-1)  # [c, v]
            log_p = (teacher[start:end].float() @ w32.T).div_(distill_temperature).log_softmax(-1)  # [c, v]
            p = log_p.exp()  # [c, v]
            soft_rows[start:end] = -(p * log_q).sum(-1) * distill_temperature ** 2
            kl_rows[start:end] = (p * log_p).sum(-1) * distill_temperature ** 2 + soft_rows[start:end]
            if needs_grad:
                # d/dz_student of T² * soft CE(z / T) = T * (q - p)
                scale = row_weights[start:end] * distill_temperature  # [c]
                grad = log_q.exp_().sub_(p).mul_(scale[:, None])  # [c, v]
                grad_student[start:end] = grad @ w32  # [c, h]
                grad_weight.addmm_(grad.T, h)  # [v, h]
        if needs_grad:
            ctx.save_for_backward(grad_student, grad_weight)
            ctx.dtypes = student.dtype, weight.dtype
        ctx.mark_non_differentiable(soft_rows, kl_rows)
        return ((kl_rows if kl else soft_rows) * row_weights).sum(), soft_rows, kl_rows

    @staticmethod
    def backward(ctx, grad_output, _grad_soft, _grad_kl):
        grad_student, grad_weight = ctx.saved_tensors
        student_dtype, weight_dtype = ctx.dtypes
        return ((grad_student * grad_output).to(student_dtype), None, (grad_weight * grad_output).to(weight_dtype),
                None, None, None, None)


def _liger_cross_entropy():
    """Liger Kernel's fused linear CE, or None when the optional package is missing."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def _rows(hidden: torch.Tensor, weight: torch.Tensor, row_weights: torch.Tensor | None, n_rows: int) -> torch.Tensor:
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match the head weight {tuple(weight.shape)} "
                         "([vocab, hidden]: pass lm_head.weight)")
    if row_weights is None:
        return torch.ones(n_rows, dtype=torch.float32, device=hidden.device)
    return row_weights.reshape(-1).float()


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                             row_weights: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                             label_smoothing: float = 0.0, chunk_size: int = DEFAULT_CHUNK,
                             return_rows: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Σ over rows of ``row_weights`` x CE(``hidden`` @ ``weight``.T, ``labels``), never holding the full logits.

    ``hidden`` [..., h] and ``labels`` [...] (and ``row_weights`` [...] if given) are flattened to
    rows; ``weight`` is the head's [v, h]. Equals ``(F.cross_entropy(hidden @ weight.T, labels,
    reduction="none", ignore_index=..., label_smoothing=...) * row_weights).sum()`` computed in fp32.
    With ``return_rows`` also returns each row's unweighted CE [n] (detached; 0 where ignored), for metrics.
    """
    h = hidden.reshape(-1, hidden.shape[-1])  # [n, h]
    y = labels.reshape(-1)  # [n]
    liger = _liger_cross_entropy() if hidden.is_cuda and row_weights is None and not return_rows else None
    if liger is not None:
        out = liger(h, weight, y, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum")
        return out[0] if isinstance(out, tuple) else out
    total, rows = _LinearCrossEntropy.apply(h, weight, y, _rows(h, weight, row_weights, len(y)), ignore_index,
                                            float(label_smoothing), chunk_size)
    return (total, rows) if return_rows else total


def linear_soft_cross_entropy_sum(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, weight: torch.Tensor,
                                  *, row_weights: torch.Tensor | None = None, distill_temperature: float = 1.0,
                                  kl: bool = False, chunk_size: int = DEFAULT_CHUNK,
                                  return_rows: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Σ over rows of ``row_weights`` x T² x soft CE (or KL with ``kl``) from the teacher's
    distribution to the student's, both through the head ``weight`` [v, h] at T = ``distill_temperature``.

    ``student_hidden`` and ``teacher_hidden`` [..., h] are flattened to rows; the teacher is
    detached (stop-gradient), so soft CE and KL differ by a constant and have the same gradient.
    With ``return_rows`` also returns each row's unweighted T² soft CE and KL [n] (detached), for metrics.
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"student {tuple(student_hidden.shape)} and teacher {tuple(teacher_hidden.shape)} hidden "
                         "states must have the same shape (one teacher row per student row)")
    if not (isinstance(distill_temperature, (int, float)) and math.isfinite(distill_temperature)
            and distill_temperature > 0):
        raise ValueError(f"distill_temperature must be a positive number, got {distill_temperature!r}")
    s = student_hidden.reshape(-1, student_hidden.shape[-1])  # [n, h]
    t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])  # [n, h]
    total, soft_rows, kl_rows = _LinearSoftCrossEntropy.apply(s, t, weight, _rows(s, weight, row_weights, s.shape[0]),
                                                              float(distill_temperature), kl, chunk_size)
    return (total, soft_rows, kl_rows) if return_rows else total
