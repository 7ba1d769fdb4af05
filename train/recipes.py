"""What a recipe is, and where each one lives.

A recipe plugs into the one trainer loop by naming five things: its method config, model
builder, dataset (with an optional rollout step that makes the data with the inference engine),
collator and loss (and, optionally, what its export records: ``export_settings``). Everything else (accumulation, precision, LoRA, checkpoints, resume,
logging, eval, export) is the trainer's.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

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
    "acceptance_head": "leaplm.train.acceptance_head",
}


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    method_config: type  # dataclass validated from the config's `method` section
    # (cfg) -> (model, tokenizer): the model to train, before LoRA wrapping
    build_model: Callable[[Any], tuple[Any, Any]]
    # (cfg, tokenizer) -> list of samples the collator understands
    build_dataset: Callable[[Any, Any], Sequence[dict]]
    # (cfg, tokenizer) -> callable(list of samples) -> batch dict with an `n_targets` count
    build_collator: Callable[[Any, Any], Callable[[Sequence[dict]], dict]]
    # (model, batch, cfg) -> (sum of the loss over the batch's n_targets items, extra metrics)
    loss: Callable[[Any, dict, Any], tuple[torch.Tensor, dict[str, float]]]
    # (cfg, model, tokenizer, accelerator) -> None: make training data with the engine first
    rollout: Callable[[Any, Any, Any, Any], None] | None = None
    # (model) -> ids of token rows the recipe added (e.g. a mask token): trained in full under LoRA
    new_token_ids: Callable[[Any], list[int]] | None = None
    # submodules the recipe adds to the model (e.g. draft heads): stay fully trainable under LoRA
    trained_in_full: tuple[str, ...] = ()
    # (cfg) -> configs run one after another, each by its own Trainer (progressive stages); None = [cfg]
    stages: Callable[[Any], list[Any]] | None = None
    # (cfg, model, out_dir) -> entries of config.json's `leaplm` section on export (block size, heads);
    # may write extra files (heads) under out_dir and list them under "files". See models/export.py.
    export_settings: Callable[[Any, Any, Any], dict[str, Any]] | None = None


def get_recipe(name: str) -> Recipe:
    if name not in RECIPE_MODULES:
        raise KeyError(f"unknown recipe {name!r}; available: {', '.join(RECIPE_MODULES)}")
    return importlib.import_module(RECIPE_MODULES[name]).RECIPE
