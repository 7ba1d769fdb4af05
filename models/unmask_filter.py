"""Learn2PD's unmask filter: a small network over a block's confidences that says which slots
already hold their final token, and the reference-guided decoding its labels come from.

**The filter** (the reference's ``LogisticRegression``, ``model/small_model.py``): ``Linear(n, h)
-> ReLU -> Linear(h, n)`` over the n = block_size - 1 decodable slots of a block (slot 0 comes
from the clean logit and is never decoded). Input: the probability of each slot's argmax token,
1 for the slots already committed; output: one logit per slot, "this argmax is final". It is a
transformers ``PreTrainedModel`` only so that the trainer can checkpoint and export it
(``save_pretrained``); the ``block_diffusion`` decoder loads it with :func:`load_filter`.

**Labels** (the reference's ``generate_training_data.py``): the reference answer is the model's
own careful decode (one token per step; the rollouts of ``data/rollouts.py``). Re-decoding it
"extremely greedy parallel", every step commits every masked slot whose argmax already equals
the reference, or, when none does, the most confident one with its reference token. Each step
records, per block still being decoded, (confidences, which masked slots are right). All blocks
of an answer are decoded at once: every block sees the reference before it, which is exactly
what it sees in that decode, because every committed token equals the reference. The forwards
use the two-stream training layout (``losses/block_diffusion.py::build_batch``), whose noisy
block attends to the clean earlier blocks and to itself, as the decoder's block over its cache.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from leaplm.losses.block_diffusion import build_batch
from leaplm.models.block_diffusion import spec_of, training_attention


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


@torch.no_grad()
def reference_guided_examples(model, prompts: list[list[int]], answers: list[list[int]],
                              batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(confidences, labels, open) [N, block_size - 1] from reference-guided decoding of
    ``answers`` by the block-diffusion ``model``, one row per (block, step) (module docstring).

    ``open`` marks the slots still masked at that step: only they carry a label. Committed slots
    and slots past the answer read confidence 1.
    """
    spec = spec_of(model)
    size, device = spec.block_size, next(model.parameters()).device
    features, labels, opened = [], [], []
    for first in range(0, len(prompts), batch_size):
        ps, rs = prompts[first:first + batch_size], answers[first:first + batch_size]
        masks = [torch.arange(len(r)) % size != 0 for r in rs]  # [R] every decodable slot masked
        while any(m.any() for m in masks):
            layout, _ = build_batch(ps, rs, masks, [torch.ones(len(m)) for m in masks], size, spec.mask_token_id,
                                    inverse_t_weight=False, ar_weight=0.0)
            layout = layout.to(device)
            logits = model(input_ids=layout.input_ids, position_ids=layout.position_ids,
                           attention_mask=training_attention(model, layout, "dense"), use_cache=False).logits
            for k, (prompt, response, mask) in enumerate(zip(ps, rs, masks)):
                n_padded = size * -(-len(response) // size)
                noisy_start = len(prompt) + n_padded  # column of the noisy stream's slot 0
                # token shift: slot j is predicted at the noisy stream's column of slot j - 1
                probs = logits[k, noisy_start - 1:noisy_start + len(response) - 1].float().softmax(-1)  # [R, V]
                confidence, predicted = probs.max(-1)  # [R]
                target = torch.tensor(response, device=device)
                right = (predicted == target).cpu() & mask  # [R]
                conf = torch.ones(n_padded)
                conf[:len(response)] = torch.where(mask, confidence.cpu(), torch.ones(len(response)))
                padded_mask = torch.zeros(n_padded, dtype=torch.bool)
                padded_mask[:len(response)] = mask
                padded_right = torch.zeros(n_padded, dtype=torch.bool)
                padded_right[:len(response)] = right
                blocks = padded_mask.view(-1, size).any(-1)  # [n_blocks] still being decoded
                features.append(conf.view(-1, size)[blocks, 1:])
                labels.append(padded_right.view(-1, size)[blocks, 1:])
                opened.append(padded_mask.view(-1, size)[blocks, 1:])
                # Commit the right ones; a block with none right commits its most confident slot.
                commit = right.clone()
                for b in torch.nonzero(blocks).flatten().tolist():
                    lo, hi = b * size, min((b + 1) * size, len(response))
                    if not commit[lo:hi].any():
                        best = torch.where(mask[lo:hi], conf[lo:hi], torch.full((hi - lo,), -1.0)).argmax()
                        commit[lo + best] = True
                masks[k] = mask & ~commit
    return torch.cat(features), torch.cat(labels).float(), torch.cat(opened)
