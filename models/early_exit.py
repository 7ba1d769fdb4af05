"""Running part of a causal LM's decoder layers: the first n (an early exit), or only the others.

Self-speculative decoding (Kangaroo, ``models/kangaroo.py``) drafts with the target's own first
layers and verifies with the rest. Both helpers wrap an ordinary call of the model (e.g.
``Engine.forward``), so its embeddings, masks, positions, rotary embeddings and cache handling stay
the model's own:

- :func:`first_layers` makes the call but stops after decoder layer n-1: a forward hook on that
  layer raises a private exception that carries the layer's output, so layers n..L-1, the final
  norm and the LM head never run. The cache's layers 0..n-1 get the new tokens' keys and values,
  the others nothing.
- :func:`later_layers` makes decoder layers 0..n-1 return given hidden states (the input of layer
  n) without computing or caching anything, so a call inside it runs only layers n..L-1, then the
  final norm and the LM head.

The output of :func:`first_layers` is what ``model(..., output_hidden_states=True).hidden_states[n]``
holds, and :func:`later_layers` on it gives the logits of a whole forward (tests/test_kangaroo.py
checks both on several families). Any model whose decoder (``model.get_decoder()``) keeps its layers
in ``.layers`` and calls them in order, each returning its hidden states, can be split so.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn


class _Exited(Exception):
    """Raised by the exit hook: carries the hidden states of the layer the call stops after."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("early exit")
        self.hidden = hidden


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of ``model`` (a causal LM), in the order its forward calls them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(decoder).__name__} keeps no decoder layers in `.layers`: running only some of "
                         "its layers (an early exit) needs them there")
    return layers


def check_split(model, n: int) -> nn.ModuleList:
    """The decoder layers, after checking that ``n`` splits them into two non-empty parts."""
    layers = decoder_layers(model)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < len(layers):
        raise ValueError(f"the split must leave layers on both sides: 1 <= n <= {len(layers) - 1} for this "
                         f"model's {len(layers)} layers, got {n!r}")
    return layers


def first_layers(model, n: int, call: Callable[[], Any]) -> torch.Tensor:
    """Run ``call()`` (a forward of ``model``) through decoder layers 0..n-1 only; the output of
    layer n-1 [b, s, H] (pre-norm)."""
    layers = check_split(model, n)

    def exit_after(module, args, output) -> None:
        raise _Exited(output[0] if isinstance(output, tuple) else output)

    handle = layers[n - 1].register_forward_hook(exit_after)
    try:
        call()
    except _Exited as exited:
        return exited.hidden
    finally:
        handle.remove()
    raise RuntimeError(f"the call never ran decoder layer {n - 1}; pass a forward of the model")


@contextmanager
def later_layers(model, n: int, hidden: torch.Tensor) -> Iterator[None]:
    """Inside, a forward of ``model`` runs only decoder layers n..L-1, on ``hidden`` [b, s, H] (the
    input of layer n, e.g. what :func:`first_layers` returned) in place of what layers 0..n-1 would
    compute; those layers neither compute nor cache anything. The call's ``input_ids`` and positions
    must be those of ``hidden``'s tokens (the embeddings are still looked up, and rotary positions
    and masks are made from them)."""
    layers = check_split(model, n)

    def given(*args, **kwargs) -> torch.Tensor:
        return hidden

    # A layer may carry a forward of its own already (accelerate's hooks put one on the instance).
    own = [layer.__dict__.get("forward") for layer in layers[:n]]
    for layer in layers[:n]:
        layer.forward = given
    try:
        yield
    finally:
        for layer, forward in zip(layers[:n], own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
