"""leaplm: turn autoregressive language models into fast parallel decoders."""

__version__ = "0.1.0"
