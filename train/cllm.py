"""Recipe: CLLM consistency distillation, a causal LM trained to converge in fewer Jacobi iterations.

    leaplm train configs/cllm/tiny_teacher.yaml
    accelerate launch --config_file launch/accelerate/zero2.yaml -m leaplm.train configs/cllm/qwen2.5-1.5b.yaml
    ACCELERATE_CONFIG=launch/accelerate/zero2.yaml sbatch --nodes=2 launch/slurm.sh configs/cllm/qwen2.5-1.5b.yaml

Rollout: the model decodes prompts of the configured data with greedy Jacobi decoding and records
every block's Jacobi states and fixed point (``train/rollouts.py``; sharded over ranks, reused on
a rerun with the same settings). The fixed points are its own greedy answers.
Loss: per block, the consistency soft CE from a random non-final state to the stop-gradient
fixed point (``global``) or to the next state (``local``), counted where the state differs
(``losses/consistency.py``), plus ``ar_weight`` times the label-smoothed next-token CE on the
fixed point, all summed and divided by the step's fixed-point tokens.
Decoders for eval and bench: ``jacobi`` and ``jacobi_multiblock`` (``inference/decoders/jacobi.py``); the
model stays an ordinary causal LM, so greedy output is the base model's as long as training
keeps its greedy answers (the AR term's job).

Where we differ from the reference (hao-ai-lab Consistency_LLM): one forward serves the AR term
and the global teacher (the fixed-point row, detached for the teacher), and the AR term
supervises only the block's answer tokens given prompt and earlier blocks, not the prompt; the
loss details are in ``losses/consistency.py``, the collection's in ``train/rollouts.py``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from leaplm.config import Config, ConfigError
from leaplm.inference.decoders.jacobi import INITS
from leaplm.losses.causal_lm import causal_lm_loss_sum
from leaplm.losses.consistency import CONSISTENCY, ar_labels, block_batch, block_logits, consistency_loss_sum
from leaplm.models.zoo import load_model
from leaplm.train.recipes import NOISE_SEED, Recipe
from leaplm.train.rollouts import (
    check_rollout_sections,
    collect_run_trajectories,
    current_rollouts,
    load_rollouts,
    rollouts_dir,
)


@dataclass
class CLLMConfig:
    RENAMED: ClassVar[dict[str, str]] = {"block_size": "jacobi_block_size"}  # old key -> new (config.py::build)
    jacobi_block_size: int = 16  # Jacobi block n of the rollouts (and of the decoder afterwards); the reference's 16
    init: str = "prompt"  # initial guesses: prompt (tokens drawn from the prompt, as the reference) | pad | repeat
    consistency: str = "global"  # global (state -> fixed point, CLLM's trained loss) | local (state -> next state)
    ar_weight: float = 10.0  # weight of the AR loss on the fixed point; the reference's 10:1
    label_smoothing: float = 0.1  # of the AR loss, as the reference's LabelSmoother(epsilon=0.1)

    def __post_init__(self):
        if self.jacobi_block_size < 2:
            raise ConfigError(f"method.jacobi_block_size must be >= 2 (a block of one token has no Jacobi state "
                              f"to train on; the reference uses 16), got {self.jacobi_block_size}")
        if self.init not in INITS:
            raise ConfigError(f"method.init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.consistency not in CONSISTENCY:
            raise ConfigError(f"method.consistency must be one of {', '.join(CONSISTENCY)}, got {self.consistency!r}")
        if self.ar_weight < 0:
            raise ConfigError(f"method.ar_weight must be >= 0, got {self.ar_weight}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"method.label_smoothing must be in [0, 1), got {self.label_smoothing}")


def check_sections(cfg: Config) -> None:
    """The rules that tie `method` to the shared sections."""
    check_rollout_sections(cfg, "cllm", cfg.method.jacobi_block_size)


# ----- Model and data -------------------------------------------------------------------------


def build_model(cfg: Config):
    check_sections(cfg)
    return load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.attn_implementation, cfg.model.tokenizer)


def rollout(cfg: Config, model, tokenizer, accelerator) -> None:
    """Collect (or reuse) the model's Jacobi rollouts on the accelerator's device, one slice per rank."""
    m: CLLMConfig = cfg.method
    collect_run_trajectories(cfg, model, tokenizer, accelerator, jacobi_block_size=m.jacobi_block_size,
                             init=m.init)


def build_dataset(cfg: Config, tokenizer):
    return load_rollouts(current_rollouts(rollouts_dir(cfg)), cfg.rollout.drop_wrong)  # rows stay memory-mapped


def build_collator(cfg: Config, tokenizer):
    rows_per_sample = 3 if cfg.method.consistency == "local" else 2  # forwarded sequences per block

    def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        n_answer = sum(len(s["fixed_point"]) for s in samples)
        n_context = sum(len(s["prompt_ids"]) + len(s["prefix_ids"]) for s in samples)
        return {
            "samples": list(samples),
            "pad_token_id": tokenizer.pad_token_id,
            "n_targets": torch.tensor(n_answer),  # the AR term's targets: the fixed points' tokens
            "n_tokens": torch.tensor(rows_per_sample * (n_context + n_answer)),
        }

    return collate


# ----- Loss ---------------------------------------------------------------------------------


def pick_consistency_pair(states: list[list[int]], consistency: str,
                          rng: random.Random) -> tuple[list[int], list[int]]:
    """(student state, teacher tokens) of one block: a random non-final state and the fixed point
    (global) or the state after it (local). A block guessed right at once has only its fixed
    point, which then meets itself and counts nothing."""
    last = len(states) - 1
    if last == 0:
        return states[0], states[0]
    j = rng.randrange(last)
    return states[j], states[last] if consistency == "global" else states[j + 1]


def loss(model, batch, cfg: Config):
    m: CLLMConfig = cfg.method
    samples = batch["samples"]
    b = len(samples)
    device = next(model.parameters()).device
    # The state is drawn from the sample's own seed: the same whatever the process, micro-batch or resume.
    picks = [pick_consistency_pair(s["states"], m.consistency, random.Random(s[NOISE_SEED])) for s in samples]
    contexts = [s["prompt_ids"] + s["prefix_ids"] for s in samples]
    fixed_points = [s["fixed_point"] for s in samples]

    # One forward with gradients: student rows (context + state) and fixed-point rows.
    rows = block_batch(contexts + contexts, [p[0] for p in picks] + fixed_points, m.jacobi_block_size,
                       batch["pad_token_id"]).to(device)
    logits = block_logits(model, rows)  # [2b, n + 1, v]
    student_logits, fixed_logits = logits[:b], logits[b:]
    states, lengths = rows.blocks[:b], rows.lengths[:b]
    if m.consistency == "global":
        teacher_logits, targets = fixed_logits.detach(), rows.blocks[b:]
    else:
        teacher_rows = block_batch(contexts, [p[1] for p in picks], m.jacobi_block_size,
                                   batch["pad_token_id"]).to(device)
        with torch.no_grad():
            teacher_logits = block_logits(model, teacher_rows)
        targets = teacher_rows.blocks
    consistency_sum, counted = consistency_loss_sum(student_logits, teacher_logits, states, targets, lengths)
    ar_sum = causal_lm_loss_sum(fixed_logits, ar_labels(rows.blocks[b:], lengths), m.label_smoothing)
    n = batch["n_targets"].float()
    metrics = {"consistency": (consistency_sum.detach() / n).item(), "ar": (ar_sum.detach() / n).item(),
               "counted": (counted / n).item()}
    return consistency_sum + m.ar_weight * ar_sum, metrics


RECIPE = Recipe(
    name="cllm",
    description="CLLM consistency distillation on the model's own greedy Jacobi trajectories",
    method_config=CLLMConfig,
    build_model=build_model,
    build_dataset=build_dataset,
    build_collator=build_collator,
    loss=loss,
    decoder=lambda cfg: ("jacobi", {"jacobi_block_size": cfg.method.jacobi_block_size}),
    rollout=rollout,
    # The Jacobi block trained on; the decoder's own is eval.decoder_settings' jacobi_block_size.
    export_settings=lambda cfg, model, out_dir: {"jacobi_block_size": cfg.method.jacobi_block_size},
)
