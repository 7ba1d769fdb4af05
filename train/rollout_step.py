"""The rollout step shared by the recipes that train on the model's own outputs: Jacobi
trajectories (CLLM, Jacobi Forcing) or a decoder's final answers (dParallel): the rules that tie
their `method` to the shared config sections, and the step that collects (or reuses) the
rollouts into ``OUTPUT_DIR/rollouts`` (``data/rollouts.py``)."""

from __future__ import annotations

from pathlib import Path

from leaplm.config import Config, ConfigError
from leaplm.data.rollouts import (
    RolloutPrompt,
    choose_prompts,
    collect_decoded_rollouts,
    collect_jacobi_rollouts,
    model_fingerprint,
)


def check_rollout_sections(cfg: Config, recipe: str, block_size: int, decoder: str = "jacobi") -> None:
    """Refuse shared-section settings a rollout recipe cannot use, naming the fix."""
    r = cfg.rollout
    if r.decoder != decoder:
        raise ConfigError(f"{recipe} collects {decoder} rollouts: set rollout.decoder={decoder} (got {r.decoder!r})")
    if decoder == "jacobi" and r.decoder_args:
        raise ConfigError(f"{recipe} sets its Jacobi rollouts from `method` (block_size, init): remove "
                          f"rollout.decoder_args {r.decoder_args}")
    if r.temperature != 0:
        raise ConfigError(f"{recipe} needs greedy rollouts (its targets are the model's own greedy answers): "
                          "set rollout.temperature=0")
    if r.max_new_tokens < block_size:
        raise ConfigError(f"rollout.max_new_tokens={r.max_new_tokens} is shorter than one block "
                          f"(method.block_size={block_size})")
    if r.max_new_tokens >= cfg.data.max_length:
        raise ConfigError(f"rollout.max_new_tokens={r.max_new_tokens} leaves no room for a prompt within "
                          f"data.max_length={cfg.data.max_length}")
    if cfg.model.init is not None:
        raise ConfigError(f"{recipe} distills an existing model: set model.name_or_path and remove model.init")
    if cfg.data.packing or cfg.train.group_by_length:
        raise ConfigError(f"{recipe} trains on rollout blocks: data.packing and train.group_by_length do not apply; "
                          "set both to false")


def rollouts_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / "rollouts"


def _prompts_and_model(cfg: Config, model, tokenizer, accelerator, max_prompts: int,
                       model_name: str | None = None) -> tuple[list[RolloutPrompt], dict]:
    prompts = choose_prompts(cfg.data, tokenizer, max_prompts, cfg.rollout.max_new_tokens, cfg.seed)
    model.to(accelerator.device)
    model_id = {**model_fingerprint(model_name or cfg.model.name_or_path), "tokenizer": cfg.model.tokenizer,
                "dtype": cfg.model.dtype}
    return prompts, model_id


def collect_rollouts(cfg: Config, model, tokenizer, accelerator, *, block_size: int, init: str,
                     max_prompts: int, model_name: str | None = None) -> Path:
    """Collect (or reuse) the model's Jacobi rollouts on the accelerator's device, one slice per rank.

    ``model_name`` names ``model`` when it is not ``cfg.model`` (e.g. a target answering for a draft).
    """
    prompts, model_id = _prompts_and_model(cfg, model, tokenizer, accelerator, max_prompts, model_name)
    return collect_jacobi_rollouts(model, tokenizer, prompts, rollouts_dir(cfg), model_id=model_id,
                                   block_size=block_size, max_new_tokens=cfg.rollout.max_new_tokens, init=init,
                                   seed=cfg.seed, batch_size=cfg.rollout.batch_size, accelerator=accelerator,
                                   progress=cfg.logging.progress_bar)


def collect_answers(cfg: Config, model, tokenizer, accelerator, *, max_prompts: int) -> Path:
    """Collect (or reuse) the final answers of ``rollout.decoder`` with ``rollout.decoder_args``."""
    prompts, model_id = _prompts_and_model(cfg, model, tokenizer, accelerator, max_prompts)
    return collect_decoded_rollouts(model, tokenizer, prompts, rollouts_dir(cfg), model_id=model_id,
                                    decoder=cfg.rollout.decoder, decoder_args=cfg.rollout.decoder_args,
                                    max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed,
                                    batch_size=cfg.rollout.batch_size, accelerator=accelerator,
                                    progress=cfg.logging.progress_bar)
