"""Learn2PD's unmask filter: a small network over a block's confidences that says which slots
already hold their final token.

**The filter** (the reference's ``LogisticRegression``, ``model/small_model.py``): ``Linear(n, h)
-> ReLU -> Linear(h, n)`` over the n = block_size - 1 decodable slots of a block (slot 0 comes
from the clean logit and is never decoded). Input: the probability of each slot's argmax token,
1 for the slots already committed; output: one logit per slot, "this argmax is final". It is a
transformers ``PreTrainedModel`` only so that the trainer can checkpoint and export it
(``save_pretrained``); the ``block_diffusion`` decoder loads it with :func:`load_filter`.
Its labels come from reference-guided decoding (``train/learn2pd.py``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class UnmaskFilterConfig(PretrainedConfig):
    model_type = "leaplm_unmask_filter"

    def __init__(self, width: int = 15, hidden: int = 32, **kwargs):
        self.width = width  # decodable slots per block: block_size - 1
        self.hidden = hidden
        kwargs.setdefault("vocab_size", 0)  # no vocabulary: read by the model card only
        super().__init__(**kwargs)


class UnmaskFilter(PreTrainedModel):
    config_class = UnmaskFilterConfig
    main_input_name = "confidence"

    def __init__(self, config: UnmaskFilterConfig):
        super().__init__(config)
        self.net = nn.Sequential(nn.Linear(config.width, config.hidden), nn.ReLU(),
                                 nn.Linear(config.hidden, config.width))
        self.post_init()

    @property
    def width(self) -> int:
        return self.config.width

    def forward(self, confidence: torch.Tensor) -> torch.Tensor:
        """Logits [..., n] that each slot's argmax is final, from confidences [..., n]."""
        return self.net(confidence.to(self.net[0].weight.dtype))

    @torch.no_grad()
    def accept_probability(self, confidence: torch.Tensor) -> torch.Tensor:
        """sigmoid(forward): what the decoder's ``filter`` rule compares with ``accept``; [b, n]."""
        return self(confidence).float().sigmoid()


def load_filter(path: str | Path) -> UnmaskFilter:
    """The filter saved in ``path``, loaded once per version of its weights file (decoders call
    this on every ``generate``)."""
    weights = Path(path) / "model.safetensors"
    return _load(str(path), weights.stat().st_mtime_ns if weights.is_file() else 0)


@functools.lru_cache(maxsize=8)
def _load(path: str, version: int) -> UnmaskFilter:
    return UnmaskFilter.from_pretrained(path).eval()
