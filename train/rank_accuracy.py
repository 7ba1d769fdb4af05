"""How often a drafter's rank-r token is the target's: measured while training draft heads or an
EAGLE-3 draft, stored with them, and read by the tree decoders to grow their ``"auto"`` trees."""

from __future__ import annotations

import torch

from leaplm.models.heads import ACCURACY_TOP_K


def rank_hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[R + 1]: how many targets [n] were the rank-r prediction of ``logits`` [n, V], then n."""
    with torch.no_grad():
        top = logits.topk(min(ACCURACY_TOP_K, logits.shape[-1]), dim=-1).indices  # [n, R]
        hits = (top == targets[:, None]).sum(0)  # [R]
        hits = torch.cat([hits, hits.new_zeros(ACCURACY_TOP_K - len(hits))])  # a vocabulary under R tokens
        return torch.cat([hits, hits.new_tensor([len(targets)])]).double()


def record_accuracy(accuracy: torch.Tensor, counts: torch.Tensor, name: str) -> dict[str, float]:
    """Update the running rank accuracies ``accuracy`` [K, R] (in place) of K drafting depths (heads,
    or unrolled steps) from this micro-batch's ``counts`` [K, R + 1] (:func:`rank_hits` per depth,
    zeros for depths the batch was too short for); their top-1 metrics, ``{name}{k}_top1``.

    The counts are summed over processes first, so the accuracies (which shape the decoding tree)
    are those of the global micro-batch, the same on every process and for any process count.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)  # every process calls this once per micro-batch
    metrics = {}
    for k, row in enumerate(counts):
        if row[-1] > 0:
            hits = (row[:-1] / row[-1]).to(accuracy.dtype)  # [R]
            seen = accuracy[k].any()
            accuracy[k] = torch.where(seen, 0.95 * accuracy[k] + 0.05 * hits, hits)
            metrics[f"{name}{k}_top1"] = float(hits[0])
    return metrics
