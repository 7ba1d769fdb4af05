"""Shared fixtures. Append new fixtures at the end; several test files rely on these."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from leaplm.models.zoo import TINY_CONFIGS, build_from_config, tiny_model


@pytest.fixture(scope="session")
def tiny():
    """``tiny(family)`` -> (model, tokenizer): random-initialised tiny models, built once per session.

    Tests must not change the weights; put a model in train mode only if you restore eval mode.
    """
    built: dict[str, tuple] = {}

    def get(family: str):
        if family not in built:
            built[family] = tiny_model(family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny) -> Path:
    """A tiny Llama saved like a real checkpoint (weights + tokenizer), for CLI tests."""
    model, tokenizer = tiny("llama")
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def lively_tiny():
    """``lively_tiny(family, scale=1.0, **config)`` -> (model, tokenizer): a tiny model whose layer
    weights are re-drawn ``scale`` times larger than the default init, built once per session;
    ``config`` overrides the family's tiny config (e.g. ``sliding_window=8``).

    At the default init the residual stream is mostly the input embedding, so greedy output
    hardly depends on the prompt (tied-embedding families repeat the last prompt token). Tests
    must not change the weights.
    """
    built: dict[tuple, tuple] = {}

    def get(family: str, scale: float = 1.0, **config):
        key = (family, scale, tuple(sorted(config.items())))
        if key not in built:
            model, tokenizer = tiny_model(family)
            if config:
                model = build_from_config(dict(TINY_CONFIGS[family], **config), tokenizer).eval()
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if param.dim() >= 2 and "embed" not in name:
                        param.copy_(torch.randn(param.shape, generator=generator) * scale / param.shape[-1] ** 0.5)
            built[key] = (model, tokenizer)
        return built[key]

    return get
