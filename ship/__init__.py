"""What leaves a run: checkpoints (``checkpoint.py``), the Hub-layout export with its model card
and push (``export.py``), ``load(DIR)``, which restores an export with its fast decoder
(``load.py``), and the lm-evaluation-harness model (``harness.py``)."""

from leaplm.ship.load import FastDecoder, load

__all__ = ["FastDecoder", "load"]
