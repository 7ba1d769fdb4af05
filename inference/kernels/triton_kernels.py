"""Triton kernels of the decode step (imported only when a Triton path runs).

One program per row: it walks the vocabulary in chunks of ``BLOCK`` logits, keeping running
values, so each logit is read once. On CPU tensors they run under ``TRITON_INTERPRET=1`` (set
before importing triton), which is how the tests check them against the references.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # logits per chunk


@triton.jit
def _chunk_max(x_ptr, row_offset, v, start, BLOCK: tl.constexpr):
    """One chunk (-inf past the vocabulary), its largest logit, that one's (lowest) index, its second largest."""
    offsets = start + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row_offset + offsets, mask=offsets < v, other=-float("inf")).to(tl.float32)  # [BLOCK]
    top = tl.max(x, axis=0)
    where = tl.argmax(x, axis=0) + start
    second = tl.max(tl.where(offsets == where, -float("inf"), x), axis=0)
    return x, top, where, second


@triton.jit
def _commit_stats_kernel(x_ptr, stride, v, token_ptr, prob_ptr, entropy_ptr, gap_ptr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    row_offset = row.to(tl.int64) * stride
    m = -3.0e38  # running max: finite, so the rescale factor exp(m - m_new) is 0, never nan
    m2 = -float("inf")  # running second largest
    token = 0
    s = 0.0  # Σ exp(z - m)
    t = 0.0  # Σ exp(z - m) (z - m)
    for start in range(0, v, BLOCK):
        x, top, where, second = _chunk_max(x_ptr, row_offset, v, start, BLOCK)
        new_m = tl.maximum(m, top)
        # second largest overall: the loser of the two maxima against both seconds
        m2 = tl.where(top > m, tl.maximum(m, second), tl.maximum(m2, top))
        token = tl.where(top > m, where, token)  # strict: an earlier chunk keeps a tie
        shift = m - new_m  # <= 0
        e = tl.exp(x - new_m)
        s_old = s
        s = s * tl.exp(shift) + tl.sum(e, axis=0)
        # Σ e^(z - m)(z - m) = e^(m - m_new) (t + (m - m_new) s) under the new max
        t = tl.exp(shift) * (t + shift * s_old) + tl.sum(e * tl.maximum(x - new_m, -1.0e4), axis=0)  # 0, not nan, at -inf
        m = new_m
    tl.store(token_ptr + row, token)
    tl.store(prob_ptr + row, 1.0 / s)
    tl.store(entropy_ptr + row, tl.log(s) - t / s)
    tl.store(gap_ptr + row, (1.0 - tl.exp(m2 - m)) / s)


def commit_stats_triton(logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(token, prob, entropy, gap) of every row of ``logits`` [..., v]; see ``commit.py``."""
    v = logits.shape[-1]
    rows = logits.reshape(-1, v).contiguous()  # [n, v]
    n = rows.shape[0]
    token = torch.empty(n, dtype=torch.long, device=logits.device)
    prob, entropy, gap = (torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(3))
    if n:
        _commit_stats_kernel[(n,)](rows, rows.stride(0), v, token, prob, entropy, gap, BLOCK=BLOCK)
    shape = logits.shape[:-1]
    return token.view(shape), prob.view(shape), entropy.view(shape), gap.view(shape)


@triton.jit
def _verify_block_kernel(x_ptr, stride_b, stride_w, v, cand_ptr, k, length_ptr, pred_ptr, accepted_ptr, next_ptr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0)
    length = tl.load(length_ptr + row)
    alive = 1  # every candidate so far accepted
    accepted = 0
    next_token = 0
    for j in range(0, k + 1):
        row_offset = row.to(tl.int64) * stride_b + j * stride_w
        best = -float("inf")
        best_index = 0
        for start in range(0, v, BLOCK):
            x, top, where, second = _chunk_max(x_ptr, row_offset, v, start, BLOCK)
            best_index = tl.where(top > best, where, best_index)
            best = tl.maximum(best, top)
        tl.store(pred_ptr + row * (k + 1) + j, best_index)
        candidate = tl.load(cand_ptr + row * k + j, mask=j < k, other=-1)
        stop = alive * ((j >= length) | (candidate != best_index)).to(tl.int32)  # the first column not accepted
        next_token = tl.where(stop == 1, best_index, next_token)
        accepted += alive - stop
        alive = alive - stop
    tl.store(accepted_ptr + row, accepted)
    tl.store(next_ptr + row, next_token)


def verify_block_triton(logits: torch.Tensor, candidates: torch.Tensor,
                        lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(predicted [b, k + 1], accepted [b], next token [b]); see ``verify.py``."""
    b, width, v = logits.shape
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    candidates = candidates.contiguous()
    lengths = lengths.to(torch.long).clamp(max=candidates.shape[1]).contiguous()
    predicted = torch.empty(b, width, dtype=torch.long, device=logits.device)
    accepted = torch.empty(b, dtype=torch.long, device=logits.device)
    next_token = torch.empty(b, dtype=torch.long, device=logits.device)
    if b:
        _verify_block_kernel[(b,)](x, x.stride(0), x.stride(1), v, candidates, width - 1, lengths, predicted,
                                   accepted, next_token, BLOCK=BLOCK)
    return predicted, accepted, next_token
