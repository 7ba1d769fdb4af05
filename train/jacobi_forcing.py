"""Recipe: Jacobi Forcing, a causal LM trained on its own Jacobi trajectories to converge in fewer iterations.

    leaplm train configs/jacobi_forcing/tiny_teacher.yaml
    accelerate launch --config_file launch/accelerate/zero2.yaml -m leaplm.train configs/jacobi_forcing/qwen2.5-1.5b.yaml
    ACCELERATE_CONFIG=launch/accelerate/zero2.yaml sbatch --nodes=2 launch/slurm.sh configs/jacobi_forcing/qwen2.5-1.5b.yaml

Rollout: the model decodes prompts of the configured data with greedy Jacobi decoding and records
every block's Jacobi states and fixed point (``train/rollouts.py``, through the shared step in
``train/rollouts.py``; sharded over ranks, reused on a rerun with the same settings).
Data: one sample per prompt: its answer's blocks in order, each as a (noisy state, fixed point)
pair whose state is chosen by the progressive noise schedule over a window of blocks
(``losses/jacobi_forcing.py::pick_states``; deterministic, chosen once when the dataset is built),
each answer starting at its own seeded place in the window (``method.window_offset``).
Batch: one packed row per prompt, ``prompt [k_0 | last_0] [k_1 | last_1] ...``, each pair on its
block's position ids, under the Jacobi Forcing attention mask (``models/jacobi_forcing.py``;
FlexAttention on GPUs, the dense mask on CPU).
Loss: consistency soft CE from each noisy position to the detached clean logit at the same offset,
from the block's first difference on, plus ``ar_weight`` times next-token CE on the clean stream,
summed over answer tokens (``losses/jacobi_forcing.py::jacobi_forcing_loss_sum``).
Stages: ``method.stages`` runs progressive distillation from one config (e.g. n=16 then n=32):
stage k trains under ``OUTPUT_DIR/stage_k`` from the model stage k-1 exported to
``OUTPUT_DIR/stage_{k-1}/model`` and collects its rollouts with that model; the last stage exports
to ``export.dir``. ``train.resume_from=latest`` skips finished stages and resumes the current one.
Decoders for eval and bench: ``jacobi`` and ``jacobi_multiblock`` (``inference/decoders/jacobi.py``); the
model stays an ordinary causal LM with its exact KV cache.

Where we differ from the reference (hao-ai-lab/JacobiForcing): the states are picked when the
dataset is built rather than by an offline packing script; rows of several prompts are batched
(the reference: batch size 1) and a row's last block may be short; the AR term supervises the
answer only, and the loss is a sum over answer tokens that the trainer normalises per step
(``losses/jacobi_forcing.py`` lists these); each answer's first block starts at a seeded random
place in the noise window (the reference starts every answer at the window's start, which with
answers shorter than a window trains their first blocks only on nearly converged states;
``method.window_offset: start`` is the reference); trajectories of every stage, the first included, come
from the model being trained (the reference's first stage used CLLM-style data of the base
model, its later stages a Jacobi-Forcing-trained model, as here); answers that fail their task's
checker are dropped (``rollout.drop_wrong``).
"""

from __future__ import annotations

import copy
import functools
import json
import random
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from leaplm.config import Config, ConfigError
from leaplm.inference.decoders.jacobi import INITS
from leaplm.losses.jacobi_forcing import STRATEGIES, build_batch, jacobi_forcing_loss_sum, pick_states
from leaplm.models.jacobi_forcing import NOISY_CONTEXTS, training_attention
from leaplm.models.two_stream import two_stream_forward
from leaplm.models.zoo import load_model
from leaplm.train.recipes import Recipe
from leaplm.train.rollouts import (
    SETTINGS_FILE,
    RolloutError,
    check_rollout_sections,
    collect_run_trajectories,
    current_rollouts,
    load_rollouts,
    rollouts_dir,
)

WINDOW_OFFSETS = ("random", "start")


@dataclass
class Stage:
    RENAMED: ClassVar[dict[str, str]] = {"block_size": "jacobi_block_size"}  # old key -> new (config.py::build)
    jacobi_block_size: int = 0  # n of this stage's rollouts and training
    max_steps: int = 0  # optimizer steps of this stage (replaces train.max_steps)
    lr: float | None = None  # this stage's peak lr; null = train.lr (the reference lowers it as n grows)

    def __post_init__(self):
        if self.jacobi_block_size < 2 or self.max_steps < 1:
            raise ConfigError(f"each method.stages entry needs jacobi_block_size >= 2 and max_steps >= 1, "
                              f"got jacobi_block_size={self.jacobi_block_size}, max_steps={self.max_steps}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"method.stages lr must be positive (or null for train.lr), got {self.lr}")


@dataclass
class JacobiForcingConfig:
    RENAMED: ClassVar[dict[str, str]] = {"block_size": "jacobi_block_size", "temperature": "distill_temperature"}
    jacobi_block_size: int = 16  # Jacobi block n of the rollouts and the decoder; with stages, the last stage's
    window_size: int = 16  # blocks per cycle of the noise schedule (the reference's w)
    min_noise_ratio: float = 0.0  # schedule start: 0 = the fixed point itself (only the AR term)
    max_noise_ratio: float = 1.0  # schedule end: 1 = a state wrong from its first token
    strategy: str = "progressive"  # progressive (easy to hard within a window) | reverse
    # Where an answer's first block falls in the window: random (drawn per answer, seeded) | start (the
    # reference: every answer's block 0 takes the window's first, least noisy target, so answers of
    # fewer blocks than the window never train their first blocks on noisy states).
    window_offset: str = "random"
    ar_weight: float = 10.0  # weight of the AR term; the reference's factor 10
    distill_temperature: float = 1.0  # of the consistency soft CE (scaled by T^2), as the reference's
    noisy_context: str = "noisy"  # a noisy block sees earlier noisy blocks (reference) | clean blocks
    init: str = "prompt"  # rollout initial guesses: prompt (tokens drawn from the prompt, as the reference) | pad | repeat
    stages: list[Stage] = field(default_factory=list)  # progressive stages; empty = one run at jacobi_block_size

    def __post_init__(self):
        if self.jacobi_block_size < 2:
            raise ConfigError(f"method.jacobi_block_size must be >= 2 (a block of one token has no Jacobi state "
                              f"to train on; the reference uses 16 to 64), got {self.jacobi_block_size}")
        if self.window_size < 1:
            raise ConfigError(f"method.window_size must be >= 1 (blocks per cycle of the noise schedule; the "
                              f"reference uses 16), got {self.window_size}")
        if not 0 <= self.min_noise_ratio <= self.max_noise_ratio <= 1:
            raise ConfigError(f"need 0 <= method.min_noise_ratio <= method.max_noise_ratio <= 1, got "
                              f"{self.min_noise_ratio}, {self.max_noise_ratio}")
        for key, value, choices in [("strategy", self.strategy, STRATEGIES), ("init", self.init, INITS),
                                    ("window_offset", self.window_offset, WINDOW_OFFSETS),
                                    ("noisy_context", self.noisy_context, NOISY_CONTEXTS)]:
            if value not in choices:
                raise ConfigError(f"method.{key} must be one of {', '.join(choices)}, got {value!r}")
        if self.ar_weight < 0:
            raise ConfigError(f"method.ar_weight must be >= 0, got {self.ar_weight}")
        if self.distill_temperature <= 0:
            raise ConfigError(f"method.distill_temperature must be positive, got {self.distill_temperature}")
        if self.stages and self.stages[-1].jacobi_block_size != self.jacobi_block_size:
            raise ConfigError(f"method.jacobi_block_size={self.jacobi_block_size} but the last of method.stages "
                              f"trains jacobi_block_size={self.stages[-1].jacobi_block_size}; "
                              f"method.jacobi_block_size is the block size the final model is trained for: "
                              f"make them equal")


def check_sections(cfg: Config) -> None:
    """The rules that tie `method` to the shared sections, for every stage's block size."""
    m: JacobiForcingConfig = cfg.method
    for size in [stage.jacobi_block_size for stage in m.stages] or [m.jacobi_block_size]:
        check_rollout_sections(cfg, "jacobi_forcing", size)
    if m.stages and cfg.train.resume_from not in (None, "latest"):
        raise ConfigError("with method.stages, train.resume_from can only be latest (each stage resumes from its own "
                          f"OUTPUT_DIR/stage_k/checkpoints), got {cfg.train.resume_from!r}")


# ----- Stages -------------------------------------------------------------------------------


def stage_configs(cfg: Config) -> list[Config]:
    """One config per stage: stage k (from 1) trains in ``OUTPUT_DIR/stage_k`` from the model stage k-1
    exported to ``OUTPUT_DIR/stage_{k-1}/model``; only the last stage evaluates and exports to
    ``export.dir``. Without stages, ``[cfg]``."""
    check_sections(cfg)
    m: JacobiForcingConfig = cfg.method
    if not m.stages:
        return [cfg]
    configs, model = [], cfg.model.name_or_path
    for k, stage in enumerate(m.stages, 1):
        c = copy.deepcopy(cfg)
        c.output_dir = f"{cfg.output_dir}/stage_{k}"
        c.model.name_or_path = model
        c.method.jacobi_block_size, c.method.stages = stage.jacobi_block_size, []
        c.train.max_steps = stage.max_steps
        c.train.lr = cfg.train.lr if stage.lr is None else stage.lr
        if k < len(m.stages):
            c.export.dir, c.export.push_to = f"{c.output_dir}/model", None
            c.eval.at_end, c.eval.every = False, 0
        model = c.export.dir
        configs.append(c)
    return configs


# ----- Model and data -------------------------------------------------------------------------


def build_model(cfg: Config):
    """The model as the engine decodes it (sdpa/eager): rollouts, eval and export use it as it is;
    the loss switches to FlexAttention for its forward when the backend is flex (``two_stream_forward``)."""
    check_sections(cfg)
    if cfg.model.attn_implementation not in ("sdpa", "eager"):
        raise ConfigError("jacobi_forcing rolls out and evaluates through the engine, which needs "
                          f"model.attn_implementation sdpa or eager (got {cfg.model.attn_implementation!r}); "
                          "train.attention=flex trains with FlexAttention anyway")
    return load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.attn_implementation, cfg.model.tokenizer)


def rollout(cfg: Config, model, tokenizer, accelerator) -> None:
    m: JacobiForcingConfig = cfg.method
    collect_run_trajectories(cfg, model, tokenizer, accelerator, jacobi_block_size=m.jacobi_block_size,
                             init=m.init)


def build_dataset(cfg: Config, tokenizer) -> list[dict[str, Any]]:
    """Per prompt: its ids and its answer's (noisy state, fixed point) pairs chosen by the schedule."""
    m: JacobiForcingConfig = cfg.method
    path = current_rollouts(rollouts_dir(cfg))
    collected = json.loads((path / SETTINGS_FILE).read_text())["jacobi_block_size"]
    if collected != m.jacobi_block_size:
        raise RolloutError(f"the rollouts in {path} were collected with jacobi_block_size {collected}, but "
                           f"method.jacobi_block_size is {m.jacobi_block_size}; collect them again "
                           f"(rerun the rollout step)")
    ds = load_rollouts(path, cfg.rollout.drop_wrong)
    answers: dict[int, dict[str, Any]] = {}
    for index, prompt, block, states in zip(ds["prompt_index"], ds["prompt_ids"], ds["block_index"], ds["states"]):
        answers.setdefault(index, {"prompt_ids": prompt, "blocks": {}})["blocks"][block] = states
    samples = []
    for index in sorted(answers):
        blocks = answers[index]["blocks"]
        if sorted(blocks) != list(range(len(blocks))):
            raise RolloutError(f"prompt {index} of {path} has blocks {sorted(blocks)}; an answer's blocks must run "
                               "from 0 without gaps. Collect the rollouts again")
        offset = random.Random(f"{cfg.seed}:{index}").randrange(m.window_size) if m.window_offset == "random" else 0
        pairs = pick_states([blocks[j] for j in range(len(blocks))], window_size=m.window_size,
                            min_ratio=m.min_noise_ratio, max_ratio=m.max_noise_ratio, strategy=m.strategy,
                            offset=offset)
        samples.append({"prompt_ids": answers[index]["prompt_ids"], "pairs": pairs})
    return samples


def build_collator(cfg: Config, tokenizer):
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        prompts = [s["prompt_ids"] for s in samples]
        layout, targets = build_batch(prompts, [s["pairs"] for s in samples], pad_token_id=pad,
                                      stop_token_ids=stops)
        return {
            "layout": layout,
            "targets": targets,
            "n_targets": torch.tensor(len(targets.ar_labels)),  # answer tokens: the AR term's targets
            "n_tokens": torch.tensor(sum(len(p) + 2 * sum(len(f) for _, f in s["pairs"])
                                         for p, s in zip(prompts, samples))),
        }

    return collate


# ----- Loss ---------------------------------------------------------------------------------


def loss(model, batch, cfg: Config):
    m: JacobiForcingConfig = cfg.method
    device = next(model.parameters()).device
    layout, targets = batch["layout"].to(device), batch["targets"].to(device)
    mask = functools.partial(training_attention, noisy_context=m.noisy_context)
    if cfg.train.fused_loss:
        hidden, head = two_stream_forward(model, layout, cfg.train.attention, mask,
                                          hidden_states=True)  # [b, T, h], [V, h]
        return jacobi_forcing_loss_sum(hidden, targets, ar_weight=m.ar_weight,
                                       distill_temperature=m.distill_temperature, head=head)
    logits = two_stream_forward(model, layout, cfg.train.attention, mask)  # [b, T, V]
    return jacobi_forcing_loss_sum(logits, targets, ar_weight=m.ar_weight,
                                   distill_temperature=m.distill_temperature)


RECIPE = Recipe(
    name="jacobi_forcing",
    description="Jacobi Forcing: noise-conditioned training on the model's own Jacobi trajectories, in stages",
    method_config=JacobiForcingConfig,
    build_model=build_model,
    build_dataset=build_dataset,
    build_collator=build_collator,
    loss=loss,
    # several blocks in flight with rejection recycling, as the reference decodes (its last stage's block)
    decoder=lambda cfg: ("jacobi_multiblock", {"jacobi_block_size": cfg.method.jacobi_block_size}),
    rollout=rollout,
    stages=stage_configs,
    # The Jacobi block trained on (the last stage's); the decoder's own is in eval.decoder_settings.
    export_settings=lambda cfg, model, out_dir: {"jacobi_block_size": cfg.method.jacobi_block_size},
)
