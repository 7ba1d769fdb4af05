"""The commit step's statistics for diffusion-style decoders, in one pass over the vocabulary.

For each position (row of logits) the commit rules need the argmax token, its probability (the
*confidence*), the predictive entropy and the gap between the two largest probabilities. With
m = max z, s = Σ exp(z - m) and t = Σ exp(z - m)(z - m), and m₂ the second largest logit:

    prob = 1 / s,    entropy = log s - t / s,    gap = (1 - exp(m₂ - m)) / s

so no softmax is ever materialised: the compiled and Triton paths keep m, m₂, the argmax, s and
t as running values (rescaling s and t when the running max grows), the reference computes
the softmax and reads the numbers off it. Ties: the argmax is the lowest index, and two equal
maxima give gap 0. The commit mask itself is chosen from these per-slot numbers by the decoder
(:func:`leaplm.inference.decoders.block_diffusion.select_commits`), on tensors of block size, not vocab.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from leaplm.inference.kernels import backend, compiled, first_argmax


class CommitStats(NamedTuple):
    token: torch.Tensor  # [...] long, the argmax
    prob: torch.Tensor  # [...] float32, its probability
    entropy: torch.Tensor  # [...] float32, nats
    gap: torch.Tensor  # [...] float32, top-1 minus top-2 probability


def commit_stats_reference(logits: torch.Tensor) -> CommitStats:
    """Eager definition over the softmax of ``logits`` [..., v]."""
    probs = logits.float().softmax(-1)  # [..., v]
    prob, token = probs.max(-1)
    entropy = torch.special.entr(probs).sum(-1)
    top2 = probs.topk(2, dim=-1).values if probs.shape[-1] > 1 else _no_second(probs)
    return CommitStats(token, prob, entropy, top2[..., 0] - top2[..., 1])


def _no_second(probs: torch.Tensor) -> torch.Tensor:
    """A one-token vocabulary has no second choice: its probability counts as 0."""
    return torch.cat([probs, torch.zeros_like(probs)], dim=-1)


def _one_pass(logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The formulas of the module docstring, written for inductor to fuse into one loop per row."""
    z = logits.float()  # [..., v]
    m, token = first_argmax(z)  # [...]
    shifted = z - m[..., None]  # [..., v]
    e = shifted.exp()
    s = e.sum(-1)
    t = (e * shifted.clamp(min=-1e4)).sum(-1)  # the clamp keeps 0 * -inf (a -inf logit) from making nan
    is_top = torch.arange(z.shape[-1], device=z.device) == token[..., None]  # [..., v] one slot per row
    m2 = shifted.masked_fill(is_top, float("-inf")).amax(-1)  # [...] second largest, minus m
    return token, 1 / s, s.log() - t / s, (1 - m2.exp()) / s


def commit_stats(logits: torch.Tensor) -> CommitStats:
    """Argmax, its probability, entropy and top-2 gap of every row of ``logits`` [..., v]."""
    which = backend(logits)
    if which == "reference":
        return commit_stats_reference(logits)
    if which == "triton":
        from leaplm.inference.kernels.triton_kernels import commit_stats_triton

        return CommitStats(*commit_stats_triton(logits))
    rows = logits.reshape(-1, logits.shape[-1])  # [n, v] one rank, so one compiled graph serves every caller
    return CommitStats(*(out.view(logits.shape[:-1]) for out in compiled(_one_pass)(rows)))
