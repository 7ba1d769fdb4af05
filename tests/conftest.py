"""Shared fixtures. Append new fixtures at the end; several test files rely on these."""

from __future__ import annotations

from pathlib import Path

import pytest

from leaplm.models.zoo import tiny_model


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
