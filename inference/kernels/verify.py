"""Greedy verification for Jacobi and speculative decoders: accepted length and next token.

**A block.** ``logits`` [b, k + 1, v] come from one forward over a row's last accepted token
and its ``k`` candidates; column j predicts the token after the first j candidates, so candidate
j is accepted when it equals the argmax of column j and every candidate before it was accepted.
The next token is the argmax of the first column not accepted (after k accepted candidates, the
bonus column k). ``lengths`` [b] caps how many candidates of each row count (the rest are
padding).

**A tree.** ``logits`` [b, N, v] are one forward over tree nodes (node 0 the root, the last
accepted token), ``tokens`` [b, N] the nodes' tokens and ``paths`` [P, d] the root-to-leaf node
indices (-1 pads short paths). Along a path, node ``path[i + 1]`` is accepted when its token is
the argmax at ``path[i]``; the longest accepted prefix wins (the first path on a tie), and the
next token is the argmax at its last accepted node.

The vocabulary is read once per column (the argmax); the compiled and Triton block paths do the
comparisons in the same kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from leaplm.inference.kernels import backend, compiled, first_argmax


class BlockVerdict(NamedTuple):
    predicted: torch.Tensor  # [b, k + 1] argmax of every column (the Jacobi update uses them all)
    accepted: torch.Tensor  # [b] candidates accepted
    next_token: torch.Tensor  # [b] argmax of column `accepted`


class TreeVerdict(NamedTuple):
    path: torch.Tensor  # [b] index of the chosen path
    accepted: torch.Tensor  # [b] nodes accepted on it after the root
    next_token: torch.Tensor  # [b]


def _check_block(logits: torch.Tensor, candidates: torch.Tensor) -> None:
    if logits.dim() != 3 or candidates.dim() != 2 or logits.shape[:2] != (candidates.shape[0], candidates.shape[1] + 1):
        raise ValueError(f"verify_block needs logits [b, k + 1, v] and candidates [b, k], got "
                         f"{tuple(logits.shape)} and {tuple(candidates.shape)} (the last column predicts the token "
                         "after the candidates)")


def _block(logits: torch.Tensor, candidates: torch.Tensor, lengths: torch.Tensor, *,
           argmax=lambda x: x.argmax(-1)) -> tuple[torch.Tensor, ...]:
    predicted = argmax(logits)  # [b, k + 1]
    k = candidates.shape[1]
    counted = torch.arange(k, device=logits.device)[None] < lengths[:, None]  # [b, k]
    accepted = ((candidates == predicted[:, :k]) & counted).long().cumprod(-1).sum(-1)  # [b]
    return predicted, accepted, predicted.gather(1, accepted[:, None]).squeeze(1)


def _block_one_pass(logits: torch.Tensor, candidates: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`_block` with the argmax written for inductor (see :func:`first_argmax`)."""
    return _block(logits, candidates, lengths, argmax=lambda x: first_argmax(x)[1])


def verify_block_reference(logits: torch.Tensor, candidates: torch.Tensor,
                           lengths: torch.Tensor | None = None) -> BlockVerdict:
    """Eager definition (see the module docstring)."""
    _check_block(logits, candidates)
    if lengths is None:
        lengths = torch.full((logits.shape[0],), candidates.shape[1], device=logits.device)
    return BlockVerdict(*_block(logits, candidates, lengths))


def verify_block(logits: torch.Tensor, candidates: torch.Tensor, lengths: torch.Tensor | None = None) -> BlockVerdict:
    """Greedy verification of ``candidates`` [b, k] against ``logits`` [b, k + 1, v]."""
    which = backend(logits)
    if which == "reference":
        return verify_block_reference(logits, candidates, lengths)
    _check_block(logits, candidates)
    if lengths is None:
        lengths = torch.full((logits.shape[0],), candidates.shape[1], device=logits.device)
    if which == "triton":
        from leaplm.inference.kernels.triton_kernels import verify_block_triton

        return BlockVerdict(*verify_block_triton(logits, candidates, lengths))
    return BlockVerdict(*compiled(_block_one_pass)(logits, candidates, lengths))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` by the dispatched kernel (the lowest index on ties)."""
    if backend(logits) == "reference":
        return logits.argmax(-1)
    from leaplm.inference.kernels.commit import commit_stats

    return commit_stats(logits).token


def verify_tree(logits: torch.Tensor, tokens: torch.Tensor, paths: torch.Tensor) -> TreeVerdict:
    """Greedy verification of a token tree (see the module docstring): ``logits`` [b, N, v],
    ``tokens`` [b, N], ``paths`` [P, d] node indices from the root, -1 after a path's end."""
    if paths.dim() != 2 or bool((paths[:, 0] != 0).any()):
        raise ValueError(f"paths must be [P, d] node indices starting at the root (node 0), got {paths.tolist()}")
    predicted = argmax(logits)  # [b, N] the one pass over the vocabulary
    parent, child = paths[:, :-1], paths[:, 1:]  # [P, d - 1]
    real = child >= 0  # [P, d - 1]
    match = tokens[:, child.clamp(min=0)] == predicted[:, parent.clamp(min=0)]  # [b, P, d - 1]
    lengths = (match & real).long().cumprod(-1).sum(-1)  # [b, P]
    accepted, best = lengths.max(-1)  # [b] the first longest path
    last = paths[best, accepted]  # [b] node holding the last accepted token
    return TreeVerdict(best, accepted, predicted.gather(1, last[:, None]).squeeze(1))
