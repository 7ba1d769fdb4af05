"""How a model takes its KV cache, across the transformers releases leaplm allows."""

from __future__ import annotations

import inspect

import torch

_CACHE_ARGUMENT: dict[type, str] = {}


def cache_argument(module: torch.nn.Module) -> str:
    """The keyword ``module`` (a model or a decoder layer) takes its KV cache under: ``cache`` in
    current transformers, ``past_key_values`` in releases before it (where the new name is unknown;
    in current ones the old name warns on every call and is announced for removal)."""
    inner = module.get_base_model() if hasattr(module, "get_base_model") else module  # under a LoRA adapter
    kind = type(inner)
    if kind not in _CACHE_ARGUMENT:
        _CACHE_ARGUMENT[kind] = "cache" if "cache" in inspect.signature(kind.forward).parameters else "past_key_values"
    return _CACHE_ARGUMENT[kind]
