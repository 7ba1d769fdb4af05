"""Decoding: the engine (``engine.py``: KV cache, batching, the decoder registry and the AR
decoders), the parallel decoders (``decoders/``, registered on import), the decode-step kernels
(``kernels/``) and per-task evaluation (``evaluate.py``)."""

from leaplm.inference import decoders  # noqa: F401  (registers every decoder with the engine)
