"""Decoding: the engine (``engine.py``), per-task evaluation (``evaluate.py``), benchmarks against
HF generate (``bench.py``), the ``eval`` / ``bench`` / ``quickstart`` commands (``cli.py``) and
``load(DIR)``, which restores an exported model with its fast decoder (``loader.py``)."""

from leaplm.inference.loader import FastDecoder, load

__all__ = ["FastDecoder", "load"]
