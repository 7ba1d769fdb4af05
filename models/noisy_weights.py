"""Separate noisy-stream weights: adapt a model to block diffusion and leave its AR model untouched.

A block-diffusion model runs two kinds of tokens through the same network: *clean* ones (the
prompt and finished blocks; their K/V is the cache and their logits are the model's AR
predictions) and *noisy* ones (the block being written, with mask tokens). Plain adaptation
trains one set of weights for both, so the AR model drifts (the tiny teacher lost 3.5-4 points
on word problems, ``docs/recipes/ar2bd.md``). :func:`split_noisy_weights` gives every ``nn.Linear`` a
second, trainable copy of its weights that only noisy tokens go through; everything the clean
tokens touch (embeddings, norms, the original linears) is frozen. Then:

- the clean stream *is* the original model: its K/V cache and logits are the teacher's (the mask
  token's new row is the mean of the others, so its logit is the mean logit and never the argmax);
- ``block_diffusion`` with ``verify=True`` emits exactly the teacher's greedy output;
- plain ``transformers`` loading the export gets the teacher (plus the mask-token row): the
  noisy copies live beside it in ``noisy_weights.safetensors``.

The cost is a second copy of every linear layer's weights. Each token goes through one of the
two, so FLOPs are unchanged, but a forward mixing both streams (the fused commit pass) runs two
smaller matmuls per layer: on a CPU 12.3-12.9 ms against 8.5-9.4 ms for 32 tokens of the tiny
teacher (``docs/recipes/ar2bd.md``). Not a paper's choice: Fast-dLLM v2 and NBDiff share the weights, and
NBDiff's auxiliary AR loss is its answer to the drift; this is a self-speculative reading of the
same recipe, where the noisy weights draft and the untouched model verifies.

Which tokens are noisy is set per forward with :func:`noisy_tokens` (the training loss passes its
layout's stream tags, the decoder the columns it feeds as noisy); outside it every token is
clean, so ``generate`` and every other decoder run the original model.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

NOISY_WEIGHTS_FILE = "noisy_weights.safetensors"
ROLES_ATTR = "stream_roles"
NOISY_SUFFIXES = ("noisy_weight", "noisy_bias")


class StreamRoles:
    """Which tokens of the current forward are noisy; shared by every :class:`TwoStreamLinear` of a model.

    ``noisy`` is a bool mask [b, s] over the forward's tokens, or None (all clean). A linear that
    sees fewer tokens than the mask (the LM head under ``logits_to_keep``) uses the mask's last
    columns, as those are the tokens it was given.
    """

    def __init__(self) -> None:
        self.noisy: torch.Tensor | None = None
        self._plans: dict[int, tuple] = {}

    def set(self, noisy: torch.Tensor | None) -> None:
        self.noisy, self._plans = noisy, {}

    def plan(self, n_tokens: int) -> tuple[str, int, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """How a linear fed ``n_tokens`` columns runs: (kind, split, clean index, noisy index, inverse order).

        kind "clean" or "noisy": one weight for all; "split": every row is clean before column
        ``split`` and noisy from it (the decoder's forwards: two slices); "mixed": rows differ (the
        training layout: tokens gathered by stream, flat indices into [b * n])."""
        if n_tokens not in self._plans:
            mask = self.noisy[:, -n_tokens:]  # [b, n]
            first = mask[0]  # [n]
            split = int((~first).sum())
            if bool((mask == first).all()) and not bool(first[:split].any()):
                kind = "clean" if split == n_tokens else "noisy" if split == 0 else "split"
                self._plans[n_tokens] = (kind, split, None, None, None)
            else:
                flat = mask.reshape(-1)  # [b * n]
                clean, noisy = (~flat).nonzero().squeeze(1), flat.nonzero().squeeze(1)
                self._plans[n_tokens] = ("mixed", 0, clean, noisy, torch.cat([clean, noisy]).argsort())
        return self._plans[n_tokens]


class TwoStreamLinear(nn.Linear):
    """An ``nn.Linear`` whose noisy tokens use ``noisy_weight``/``noisy_bias`` (see the module docstring)."""

    stream_roles: StreamRoles
    noisy_weight: nn.Parameter
    noisy_bias: nn.Parameter | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., s, in]
        if self.stream_roles.noisy is None:
            return F.linear(x, self.weight, self.bias)
        kind, split, clean, noisy, inverse = self.stream_roles.plan(x.shape[-2])
        if kind == "clean":
            return F.linear(x, self.weight, self.bias)
        if kind == "noisy":
            return F.linear(x, self.noisy_weight, self.noisy_bias)
        if kind == "split":
            return torch.cat([F.linear(x[..., :split, :], self.weight, self.bias),
                              F.linear(x[..., split:, :], self.noisy_weight, self.noisy_bias)], dim=-2)
        flat = x.reshape(-1, x.shape[-1])  # [b * s, in]
        out = torch.cat([F.linear(flat[clean], self.weight, self.bias),
                         F.linear(flat[noisy], self.noisy_weight, self.noisy_bias)])[inverse]  # [b * s, out]
        return out.view(*x.shape[:-1], -1)


def has_noisy_weights(model: nn.Module) -> bool:
    return getattr(model, ROLES_ATTR, None) is not None


def split_noisy_weights(model: nn.Module) -> int:
    """Give every linear layer of ``model`` a trainable noisy copy and freeze the rest; returns the layer count.

    The copies start equal to the originals, so the split model computes what it did before
    until it is trained. They are left out of ``save_pretrained`` (the weights saved are the
    original model's); :func:`save_noisy_weights` writes them beside.
    """
    if has_noisy_weights(model):
        raise ValueError("this model already has separate noisy weights")
    model.requires_grad_(False)
    roles = StreamRoles()
    ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    linears = [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to give noisy copies")
    for name, module in linears:
        module.__class__ = TwoStreamLinear
        module.stream_roles = roles
        module.noisy_weight = nn.Parameter(module.weight.detach().clone())
        module.noisy_bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone())
        ignored |= {f"{name}.{suffix}" for suffix in NOISY_SUFFIXES}
    model._keys_to_ignore_on_save = ignored
    setattr(model, ROLES_ATTR, roles)
    return len(linears)


@contextmanager
def noisy_tokens(model: nn.Module, noisy: torch.Tensor | None) -> Iterator[None]:
    """Run the forwards inside with ``noisy`` [b, s] (bool) marking noisy tokens; a no-op without noisy weights."""
    roles = getattr(model, ROLES_ATTR, None)
    if roles is None or noisy is None:
        yield
        return
    roles.set(noisy)
    try:
        yield
    finally:
        roles.set(None)


def noisy_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in model.state_dict().items() if name.endswith(NOISY_SUFFIXES)}


def save_noisy_weights(model: nn.Module, directory: str | Path, dtype: torch.dtype | None = None) -> list[str]:
    """Write the noisy copies beside the saved model; the file names, or [] when the model has none."""
    if not has_noisy_weights(model):
        return []
    tensors = {name: t.detach().to(dtype or t.dtype).contiguous().cpu() for name, t in noisy_state_dict(model).items()}
    save_file(tensors, str(Path(directory) / NOISY_WEIGHTS_FILE))
    return [NOISY_WEIGHTS_FILE]


def attach_saved_noisy_weights(model: nn.Module, directory: str | Path) -> None:
    """Split ``model`` and load the noisy copies saved in ``directory``, when there are any (else a no-op)."""
    path = Path(directory) / NOISY_WEIGHTS_FILE
    if not path.is_file():
        return
    split_noisy_weights(model)
    saved = load_file(str(path))
    expected = noisy_state_dict(model)
    if set(saved) != set(expected):
        missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        raise ValueError(f"{path} does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}); "
                         "load it onto the model it was trained from")
    reference = next(iter(expected.values()))
    model.load_state_dict({k: v.to(reference.dtype) for k, v in saved.items()}, strict=False)
