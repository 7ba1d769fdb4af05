"""Next-token cross-entropy, returned as a *sum* so the trainer can normalise over a whole step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from leaplm.data.sft import IGNORE_INDEX


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum of CE over supervised positions; logits [b, s, v] at i predict labels [b, s] at i+1.

    ``label_smoothing`` ε mixes the target with the uniform distribution, as transformers'
    ``LabelSmoother`` (which CLLM's AR term uses with ε = 0.1): (1 - ε) * CE + ε * mean over the
    vocabulary of -log p.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()  # [b*(s-1), v]
    shift_labels = labels[:, 1:].reshape(-1)  # [b*(s-1)]
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum",
                           label_smoothing=label_smoothing)
