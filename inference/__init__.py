"""Decoding: the engine (``engine.py``), per-task evaluation (``evaluate.py``), benchmarks against
HF generate (``bench.py``) and the ``eval`` / ``bench`` / ``quickstart`` commands (``cli.py``)."""
