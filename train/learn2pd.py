"""Recipe: Learn2PD, a small unmask filter for a frozen block-diffusion LM.

    leaplm train configs/learn2pd/tiny_teacher.yaml

Model trained: the filter of ``models/unmask_filter.py`` (``Linear(n, h) -> ReLU -> Linear(h, n)``
over a block's n = block_size - 1 confidences); the block-diffusion LM (``model.name_or_path``)
stays frozen and only makes the data.
Rollout: the LM decodes the training prompts one token per step with its ``block_diffusion``
decoder (``rollout.decoder_settings``; the same stored answers as dParallel's rollouts, reused when
the settings match), wrong answers dropped; then reference-guided decoding of those answers
records (confidences, is-final labels) per block and step
(:func:`reference_guided_examples`, below), saved next to the answers and reused.
Loss: BCE with logits on the slots still masked at that step, summed (the trainer divides by
their count).
Decoder: ``block_diffusion`` with ``rule: filter, unmask_filter: EXPORT_DIR, accept: 0.96``,
``eos_fill: true`` for the end-of-text prediction.

Where we differ from the reference (ims-kdks/Learning-to-Parallel-Decoding): the trainer's
mini-batch AdamW loop rather than 40k full-batch epochs (the data is small, so ``micro_batch_size``
can cover most of it); the filter reads committed slots as confidence 1 and is trained on the
open slots only; the commit rule is the filter plus the most confident slot, with no extra top-k
schedule; end-of-text prediction fills the block after a *committed* stop token, not after a
masked slot that merely predicts one. The exported directory holds the filter (its model card is
the trainer's generic one).

**Labels** (the reference's ``generate_training_data.py``): the reference answer is the model's
own careful decode (one token per step; the rollouts of ``train/rollouts.py``). Re-decoding it
"extremely greedy parallel", every step commits every masked slot whose argmax already equals
the reference, or, when none does, the most confident one with its reference token. Each step
records, per block still being decoded, (confidences, which masked slots are right). All blocks
of an answer are decoded at once: every block sees the reference before it, which is exactly
what it sees in that decode, because every committed token equals the reference. The forwards
use the two-stream training layout (``losses/block_diffusion.py::build_batch``), whose noisy
block attends to the clean earlier blocks and to itself, as the decoder's block over its cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from leaplm.config import Config, ConfigError
from leaplm.losses.block_diffusion import build_batch
from leaplm.models.block_diffusion import spec_of, training_attention
from leaplm.models.unmask_filter import UnmaskFilter, UnmaskFilterConfig
from leaplm.models.zoo import resolve
from leaplm.train.block_diffusion import load_block_diffusion_model, load_model_config
from leaplm.train.recipes import Recipe
from leaplm.train.rollouts import (
    ANSWER_FEATURES,
    check_rollout_sections,
    collect_answers,
    current_rollouts,
    load_rollouts,
    rollouts_dir,
)

EXAMPLES_FILE = "learn2pd_examples.pt"


@dataclass
class Learn2PDConfig:
    hidden: int = 32  # the reference's hidden width (= its block of 32)
    label_batch_size: int = 16  # answers per forward of the reference-guided decoding

    def __post_init__(self):
        if self.hidden < 1 or self.label_batch_size < 1:
            raise ConfigError("method.hidden and method.label_batch_size must be >= 1")


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


def build_model(cfg: Config):
    check_rollout_sections(cfg, "learn2pd", 1, decoder="block_diffusion")
    if cfg.model.lora.r or cfg.eval.at_end or cfg.eval.every:
        raise ConfigError("learn2pd trains a small filter, not the LM: set model.lora.r=0 and eval.at_end=false, "
                          "eval.every=0; bench the LM with the filter rule instead")
    spec = load_model_config(cfg)
    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model.tokenizer or cfg.model.name_or_path))
    return UnmaskFilter(UnmaskFilterConfig(width=spec.block_size - 1, hidden=cfg.method.hidden)), tokenizer


def rollout(cfg: Config, model, tokenizer, accelerator) -> None:
    """The LM's careful answers, then the reference-guided examples (both reused when present)."""
    lm, _ = load_block_diffusion_model(cfg, "learn2pd", allow_noisy_weights=True)
    path = collect_answers(cfg, lm, tokenizer, accelerator)
    if accelerator.is_main_process and not (path / EXAMPLES_FILE).is_file():
        ds = load_rollouts(path, cfg.rollout.drop_wrong, ANSWER_FEATURES)
        kept = [(p, a) for p, a in zip(ds["prompt_ids"], ds["answer_ids"]) if a]
        examples = reference_guided_examples(lm.eval(), [p for p, _ in kept], [a for _, a in kept],
                                             cfg.method.label_batch_size)
        torch.save(examples, path / f"{EXAMPLES_FILE}.tmp")
        (path / f"{EXAMPLES_FILE}.tmp").rename(path / EXAMPLES_FILE)
    accelerator.wait_for_everyone()


def build_dataset(cfg: Config, tokenizer) -> list[dict[str, Any]]:
    confidence, label, opened = torch.load(current_rollouts(rollouts_dir(cfg)) / EXAMPLES_FILE)
    return [{"confidence": c, "label": y, "open": o} for c, y, o in zip(confidence, label, opened)]


def build_collator(cfg: Config, tokenizer):
    def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        opened = torch.stack([s["open"] for s in samples])  # [b, n]
        return {"confidence": torch.stack([s["confidence"] for s in samples]),  # [b, n]
                "label": torch.stack([s["label"] for s in samples]), "open": opened,
                "n_targets": opened.sum(), "n_tokens": opened.sum()}

    return collate


def loss(model, batch, cfg: Config):
    logits = model(batch["confidence"]).float()  # [b, n]
    bce = F.binary_cross_entropy_with_logits(logits, batch["label"], reduction="none")  # [b, n]
    opened = batch["open"]
    accepted = (logits > 0) & opened
    metrics = {"accuracy": float(((logits > 0) == batch["label"].bool())[opened].float().mean()),
               "precision": float(batch["label"].bool()[accepted].float().mean()) if accepted.any() else 1.0}
    return (bce * opened).sum(), metrics


RECIPE = Recipe(
    name="learn2pd",
    description="Learn2PD unmask filter over block confidences, labels from reference-guided decoding",
    method_config=Learn2PDConfig,
    build_model=build_model,
    build_dataset=build_dataset,
    build_collator=build_collator,
    loss=loss,
    # the LM's decoder with the rule that reads the filter (unmask_filter: the export directory)
    decoder=lambda cfg: ("block_diffusion", {"rule": "filter", "eos_fill": True}),
    rollout=rollout,
    # the export is the filter: record the LM it serves
    export_settings=lambda cfg, model, out_dir: {"filter_for": cfg.model.name_or_path},
)
