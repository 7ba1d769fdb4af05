"""Add-ons: parts a recipe adds to a causal LM that ``save_pretrained`` leaves out, each saved in its
own files beside the weights: draft or acceptance heads (``heads.py``), an EAGLE-3 draft
(``eagle3.py``), a Kangaroo adapter (``kangaroo.py``) and separate noisy weights
(``noisy_weights.py``). Declared once here; checkpoints, exports and the zoo's loader save and
attach every add-on through :func:`save_addons` and :func:`attach_addons`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from leaplm.models.eagle3 import attach_saved_eagle3, save_attached_eagle3
from leaplm.models.heads import attach_saved_heads, save_attached_heads
from leaplm.models.kangaroo import attach_saved_kangaroo, save_attached_kangaroo
from leaplm.models.noisy_weights import attach_saved_noisy_weights, save_noisy_weights


@dataclass(frozen=True)
class AddOn:
    name: str
    # (model, directory, dtype or None) -> the files written, [] when the model has no such add-on
    save: Callable[[nn.Module, Path, torch.dtype | None], list[str]]
    # (model, directory) -> None: attach what the directory holds, a no-op when it holds none
    attach: Callable[[nn.Module, Path], None]


ADDONS = (
    # heads stay in their training dtype: they are small, and the tree decoders read their accuracies
    AddOn("heads", lambda model, directory, dtype: save_attached_heads(model, directory), attach_saved_heads),
    AddOn("eagle3", lambda model, directory, dtype: save_attached_eagle3(model, directory), attach_saved_eagle3),
    AddOn("kangaroo", lambda model, directory, dtype: save_attached_kangaroo(model, directory), attach_saved_kangaroo),
    AddOn("noisy_weights", save_noisy_weights, attach_saved_noisy_weights),
)


def save_addons(model: nn.Module, directory: str | Path, dtype: torch.dtype | None = None) -> list[str]:
    """Save every add-on ``model`` carries (under LoRA too) beside its weights; the file names written."""
    return [name for addon in ADDONS for name in addon.save(model, Path(directory), dtype)]


def attach_addons(model: nn.Module, directory: str | Path) -> None:
    """Attach every add-on saved in ``directory`` to ``model`` (the base model, under LoRA)."""
    for addon in ADDONS:
        addon.attach(model, Path(directory))
