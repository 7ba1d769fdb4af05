"""Recipe: dParallel certainty forcing, a block-diffusion LM trained to be sure sooner on its own answers.

    leaplm train configs/dparallel/tiny_teacher.yaml
    accelerate launch --config_file launch/accelerate/zero2.yaml -m leaplm.train configs/dparallel/qwen2.5-1.5b.yaml

Model: an already adapted block-diffusion LM (``train/ar2bd.py``; e.g. ``tiny-teacher-bd``),
LoRA by default in the configs (``model.lora.r``; 0 = full fine-tuning). A model adapted with
separate noisy weights trains only those (full fine-tuning of the copies, clean stream frozen), so
its verified decoding still writes the AR teacher's greedy output
(``configs/dparallel/tiny_teacher_separate.yaml``).
Rollout: the model decodes the training prompts with its ``block_diffusion`` decoder
(``rollout.decoder_settings``; one token per step, ``threshold: 1.0``, as dParallel's 256-step
trajectories), answers that fail their task's checker are dropped (``rollout.drop_wrong``); the
answers are a ``datasets`` dataset reused on a rerun with the same settings
(``train/rollouts.py::collect_decoded_rollouts`` through the run's rollout step, sharded over ranks).
Data: one (prompt, self-generated answer) per rollout.
Batch: the two-stream ``[clean | noisy]`` rows of ``losses/block_diffusion.py::build_batch``,
semi-AR noising (one block per row masked at ``rate``) and its complementary copy
(``losses/dllm_distill.py::semi_ar_masks``), built in the collator so ``n_targets`` is exact.
Loss: CE on the masked tokens (and the block starts, from the clean stream) plus
``entropy_weight`` x the entropy of ``softmax(logits / entropy_temperature)`` averaged over the masked
tokens already predicted right, per micro-batch as the reference
(``losses/dllm_distill.py::certainty_forcing_loss_sum``; ``method.entropy_mean``); weights 2.0
and T=0.5 as the LLaDA reference.
Decoder for eval and bench: ``block_diffusion`` with ``rule: entropy`` (dParallel's entropy
threshold, ``entropy_bound: 0.5``) or the confidence threshold.

Where we differ from the reference (czg1225/dParallel): blocks are the model's own (response
aligned, slot 0 from the clean stream), so the later blocks need no masking (a noisy block never
sees them) and ``method.blocks: all`` may noise every block of a row at once for the same forward;
the CE and the entropy are each one mean over both copies together (the reference adds one mean
per copy: about twice our loss, same entropy-to-CE ratio); block-start tokens keep a CE term, as
ar2bd trains them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from leaplm.config import Config, ConfigError
from leaplm.losses.block_diffusion import build_batch
from leaplm.losses.dllm_distill import ENTROPY_MEANS, NOISED_BLOCKS, certainty_forcing_loss_sum, semi_ar_masks
from leaplm.models.block_diffusion import training_attention
from leaplm.models.two_stream import two_stream_forward
from leaplm.train.block_diffusion import load_block_diffusion_model, load_model_config
from leaplm.train.recipes import NOISE_SEED, Recipe, sample_generators
from leaplm.train.rollouts import (
    ANSWER_FEATURES,
    check_rollout_sections,
    collect_answers,
    current_rollouts,
    load_rollouts,
    rollouts_dir,
)


@dataclass
class DParallelConfig:
    RENAMED: ClassVar[dict[str, str]] = {"temperature": "entropy_temperature"}  # old key -> new (config.py::build)
    rate: float = 0.5  # mask rate of the noised block (the reference's fixed t = 0.5)
    max_rate: float | None = None  # > rate: each noised block draws its rate from U(rate, max_rate) (ours)
    blocks: str = "one"  # one block per row (reference) | all blocks of the row, each its own semi-AR input
    entropy_weight: float = 2.0  # the LLaDA reference's 2 (Dream: 1)
    entropy_mean: str = "correct"  # correct: entropy averaged over the right tokens (reference) | targets (see the doc)
    entropy_temperature: float = 0.5  # of the softmax whose entropy is minimised

    def __post_init__(self):
        if not 0 < self.rate < 1:
            raise ConfigError(f"method.rate must be in (0, 1) (dParallel uses 0.5), got {self.rate}")
        if self.max_rate is not None and not self.rate < self.max_rate <= 1:
            raise ConfigError(f"method.max_rate must be in (method.rate, 1] = ({self.rate}, 1], or null for a fixed "
                              f"rate, got {self.max_rate}")
        for key, value, choices in [("blocks", self.blocks, NOISED_BLOCKS),
                                    ("entropy_mean", self.entropy_mean, ENTROPY_MEANS)]:
            if value not in choices:
                raise ConfigError(f"method.{key} must be one of {', '.join(choices)}, got {value!r}")
        if self.entropy_weight < 0 or self.entropy_temperature <= 0:
            raise ConfigError(f"need method.entropy_weight >= 0 and method.entropy_temperature > 0, got "
                              f"{self.entropy_weight}, {self.entropy_temperature}")


def build_model(cfg: Config):
    check_rollout_sections(cfg, "dparallel", 1, decoder="block_diffusion")
    return load_block_diffusion_model(cfg, "dparallel", allow_noisy_weights=True)


def rollout(cfg: Config, model, tokenizer, accelerator) -> None:
    collect_answers(cfg, model, tokenizer, accelerator)


def build_dataset(cfg: Config, tokenizer) -> list[dict[str, Any]]:
    ds = load_rollouts(current_rollouts(rollouts_dir(cfg)), cfg.rollout.drop_wrong, ANSWER_FEATURES)
    samples = [{"prompt": p, "response": a} for p, a in zip(ds["prompt_ids"], ds["answer_ids"]) if a]
    if not samples:
        raise ConfigError("every rollout answer is empty; check rollout.max_new_tokens and the model")
    return samples


def build_collator(cfg: Config, tokenizer):
    m: DParallelConfig = cfg.method
    spec = load_model_config(cfg)

    def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        prompts, responses = [s["prompt"] for s in samples], [s["response"] for s in samples]
        rate = m.rate if m.max_rate is None else (m.rate, m.max_rate)
        masks = semi_ar_masks([len(r) for r in responses], spec.block_size, rate, m.blocks,
                              generator=sample_generators(s[NOISE_SEED] for s in samples))
        layout, targets = build_batch(prompts, responses, masks, [torch.ones(len(x)) for x in masks],
                                      spec.block_size, spec.mask_token_id,
                                      inverse_t_weight=False, ar_weight=0.0)
        return {"layout": layout, "targets": targets, "n_targets": torch.tensor(len(targets.labels)),
                "n_tokens": torch.tensor(int((layout.stream >= 0).sum()))}

    return collate


def loss(model, batch, cfg: Config):
    m: DParallelConfig = cfg.method
    device = next(model.parameters()).device
    logits = two_stream_forward(model, batch["layout"].to(device), cfg.train.attention, training_attention)  # [b, T, V]
    return certainty_forcing_loss_sum(logits, batch["targets"].to(device), entropy_weight=m.entropy_weight,
                                      entropy_temperature=m.entropy_temperature, entropy_mean=m.entropy_mean)


RECIPE = Recipe(
    name="dparallel",
    description="dParallel certainty forcing on self-generated block-diffusion answers (CE + entropy on correct tokens)",
    method_config=DParallelConfig,
    build_model=build_model,
    build_dataset=build_dataset,
    build_collator=build_collator,
    loss=loss,
    decoder=lambda cfg: ("block_diffusion", {}),  # the model's block size (the distilled teacher's)
    rollout=rollout,
)
