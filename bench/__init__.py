"""Measurements, side by side with their baselines: decoders against HF generate and prompt lookup
(``decoders.py``, the ``leaplm bench`` command), the report that regenerates docs/benchmarks.md
(``report.py``), and the maintainers' benches of attention masks, losses, kernels, rollouts and
draft lengths. Nothing in the library imports this package."""
