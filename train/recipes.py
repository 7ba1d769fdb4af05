"""What a recipe is, and where each one lives.

A recipe plugs into the one trainer loop by naming six things: its method config, model
builder, dataset (with an optional rollout step that makes the data with the inference engine),
collator, loss and the decoder its models decode with (and, optionally, what its export records:
``export_settings``). Everything else (accumulation, precision, LoRA, checkpoints, resume,
logging, eval, export) is the trainer's.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from leaplm.config import Config, ConfigError, build, parse_config
from leaplm.inference.engine import check_config_decoders

# recipe name -> module defining RECIPE. One readable file per recipe.
RECIPE_MODULES = {
    "pretrain": "leaplm.train.pretrain",
    "ar2bd": "leaplm.train.ar2bd",
    "cllm": "leaplm.train.cllm",
    "jacobi_forcing": "leaplm.train.jacobi_forcing",
    "dparallel": "leaplm.train.dparallel",
    "cd4lm": "leaplm.train.cd4lm",
    "learn2pd": "leaplm.train.learn2pd",
    "draft_heads": "leaplm.train.draft_heads",
    "eagle3": "leaplm.train.eagle3",
    "kangaroo": "leaplm.train.kangaroo",
    "acceptance_head": "leaplm.train.acceptance_head",
}


# The key the trainer adds to every sample it hands to a collator: the seed of that sample's noise.
NOISE_SEED = "noise_seed"


def noise_seed(seed: int, position: int) -> int:
    """Seed of the noise (mask rates, masks, picked states) of the sample at ``position`` in the
    run's sample stream (step s holds positions [s*E, (s+1)*E), E the global batch).

    Keyed by the global position, not by a process's generator: a sample gets the same noise
    whichever process and micro-batch it lands in, so the loss curve does not depend on how a
    step is split, and resuming redraws exactly what the interrupted run would have drawn.
    """
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch.Generator.manual_seed takes < 2**63


def sample_generators(seeds: Iterable[int]) -> list[torch.Generator]:
    """One fresh CPU generator per sample, from the seeds the trainer put under ``NOISE_SEED``."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    method_config: type  # dataclass validated from the config's `method` section
    # (cfg) -> (model, tokenizer): the model to train, before LoRA wrapping
    build_model: Callable[[Any], tuple[Any, Any]]
    # (cfg, tokenizer) -> list of samples the collator understands
    build_dataset: Callable[[Any, Any], Sequence[dict]]
    # (cfg, tokenizer) -> callable(list of samples) -> batch dict with an `n_targets` count. Each sample
    # carries NOISE_SEED: a collator or loss that draws noise seeds one generator per sample from it.
    build_collator: Callable[[Any, Any], Callable[[Sequence[dict]], dict]]
    # (model, batch, cfg) -> (sum of the loss over the batch's n_targets items, extra metrics)
    loss: Callable[[Any, dict, Any], tuple[torch.Tensor, dict[str, float]]]
    # (cfg) -> (decoder, settings) the trained model decodes fastest with: eval.decoder unless the config
    # names one, and so what the export stores for `leaplm.ship.load` (see load_config)
    decoder: Callable[[Any], tuple[str, dict[str, Any]]]
    # (cfg, model, tokenizer, accelerator) -> None: make training data with the engine first
    rollout: Callable[[Any, Any, Any, Any], None] | None = None
    # (model) -> ids of token rows the recipe added (e.g. a mask token): trained in full under LoRA
    new_token_ids: Callable[[Any], list[int]] | None = None
    # submodules the recipe adds to the model (e.g. draft heads): stay fully trainable under LoRA
    trained_in_full: tuple[str, ...] = ()
    # (cfg) -> configs run one after another, each by its own Trainer (progressive stages); None = [cfg]
    stages: Callable[[Any], list[Any]] | None = None
    # (cfg, model, out_dir) -> entries of config.json's `leaplm` section on export (block size, heads);
    # may write extra files (heads) under out_dir and list them under "files". See ship/export.py.
    export_settings: Callable[[Any, Any, Any], dict[str, Any]] | None = None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A run's config: defaults < YAML < dotted overrides, its ``method`` section checked by the
    recipe and its decoders' settings by their decoders, so a bad value fails before anything runs.

    An ``eval.decoder`` left unset becomes the recipe's (``Recipe.decoder``), with ``eval.decoder_settings``
    over the recipe's settings; a named one is kept as it is.
    """
    cfg = parse_config(path, overrides)  # `method` still a plain mapping: its class is the recipe's
    try:
        recipe = get_recipe(cfg.recipe)
    except KeyError as err:
        raise ConfigError(f"recipe: {err.args[0]}") from None
    cfg.method = build(recipe.method_config, cfg.method or {}, "method")
    if cfg.eval.decoder is None:
        decoder, settings = recipe.decoder(cfg)
        cfg.eval.decoder, cfg.eval.decoder_settings = decoder, {**settings, **cfg.eval.decoder_settings}
    check_config_decoders(cfg)
    return cfg


def get_recipe(name: str) -> Recipe:
    if name not in RECIPE_MODULES:
        raise KeyError(f"unknown recipe {name!r}; available: {', '.join(RECIPE_MODULES)}")
    return importlib.import_module(RECIPE_MODULES[name]).RECIPE
