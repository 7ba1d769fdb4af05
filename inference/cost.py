"""What a decoder's forwards cost: their widths, and the measured time of a k-token forward.

A parallel decoder commits several tokens per forward, but each of its forwards feeds k new
tokens instead of 1. Whether that turns into wall-clock speed depends on how much more a
k-token forward costs than a 1-token one on the machine at hand: close to 1x while a step is
bound by reading the weights (small batches on a GPU), growing toward k x as it becomes bound by
arithmetic (larger batches; sooner on a CPU than on a GPU). :func:`step_cost` measures that ratio on the spot;
:func:`record_forwards` records the widths of the forwards a decode makes.
"""

from __future__ import annotations

import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from transformers import PreTrainedModel

from leaplm.inference.engine import _synchronize, crop_cache, new_cache
from leaplm.models.cache import cache_argument

COST_WIDTHS = (1, 2, 4, 8, 16, 32)  # the widths a bench tabulates
REPEATS = 7


@dataclass
class Forward:
    """One model call: ``width`` new tokens per row, on a cache already holding ``cached`` tokens."""

    width: int
    cached: int


@contextmanager
def record_forwards(model: PreTrainedModel) -> Iterator[list[Forward]]:
    """Record every call of ``model`` made inside the block, in order, into the yielded list.

    A forward pre-hook reads each call's ``input_ids`` and KV cache, so it sees calls from the
    engine and from Hugging Face ``generate`` alike, but not those of other models (a
    speculative decoder's draft); steps run through a compiled copy of the model (``ar`` with
    ``compile_step``) may go unrecorded. A call with an empty cache is a prefill; the others are
    decode steps.
    """
    calls: list[Forward] = []
    cache_kw = cache_argument(model)

    def hook(module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            return
        cache = kwargs.get(cache_kw)
        calls.append(Forward(input_ids.shape[1], cache.get_seq_length() if cache is not None else 0))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def decode_widths(calls: Sequence[Forward]) -> list[int]:
    """Widths of the decode steps among ``calls``: prefills (calls on an empty cache) left out."""
    return [c.width for c in calls if c.cached > 0]


# model -> {(dtype, device, batch_size, context, widths): ratios}; weak, so a freed model's entries go with it
_measured: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def step_cost(model: PreTrainedModel, widths: Sequence[int] = COST_WIDTHS, batch_size: int = 1, context: int = 128,
              repeats: int = REPEATS) -> dict[int, float]:
    """Time of one forward of k new tokens over a KV cache of ``context`` tokens, relative to one
    forward of 1 token, for every k in ``widths`` and 1: ``{k: ratio}`` with ``ratio[1] == 1.0``.

    Measured now, on the model's device and dtype, with ``batch_size`` rows: one warm-up forward
    per width, then ``repeats`` rounds that time every width once (the order rotating each round,
    so a slow moment hits all widths alike); each width's time is its fastest round, as other work
    on the machine only ever adds time, so the fastest is the most repeatable measure of what the
    forward itself costs (on a shared CPU the median of a few rounds still swings by 2x). The
    forwards are causal and compute logits for all k tokens, as parallel decoders' steps do (a
    tree's or a block's custom mask costs about the same). The cache is cropped back after each
    forward, so every one sees exactly ``context`` cached tokens.

    Results are kept per model (and dtype, device, batch size, context and widths) for the life
    of the process: asking again costs nothing. A decoder that sizes its steps from the measured
    cost can call it freely.
    """
    widths = sorted({1, *(int(k) for k in widths)})
    if widths[0] < 1:
        raise ValueError(f"widths must be >= 1 new tokens, got {widths}")
    if batch_size < 1 or context < 1 or repeats < 1:
        raise ValueError(f"batch_size, context and repeats must be >= 1, got {batch_size}, {context}, {repeats}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and context + widths[-1] > limit:
        raise ValueError(f"a context of {context} plus {widths[-1]} new tokens exceeds the model's "
                         f"max_position_embeddings={limit}; lower context to at most {limit - widths[-1]}")
    device = next(model.parameters()).device
    key = (model.dtype, device, batch_size, context, tuple(widths))
    cached = _measured.setdefault(model, {})
    if key not in cached:
        cached[key] = _measure(model, widths, batch_size, context, repeats, device)
    return dict(cached[key])


def _measure(model: PreTrainedModel, widths: list[int], batch_size: int, context: int, repeats: int,
             device: torch.device) -> dict[int, float]:
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (batch_size, context + widths[-1]), generator=generator).to(device)  # [b, c + K]
    positions = torch.arange(context + widths[-1], device=device)[None].expand(batch_size, -1)  # [b, c + K]
    cache = new_cache()
    cache_kw = cache_argument(model)
    was_training = model.training
    model.eval()

    def step(k: int) -> float:
        _synchronize(device)
        start = time.perf_counter()
        model(input_ids=ids[:, context:context + k], **{cache_kw: cache},
              position_ids=positions[:, context:context + k], use_cache=True)
        _synchronize(device)
        elapsed = time.perf_counter() - start
        crop_cache(cache, context)
        return elapsed

    try:
        with torch.inference_mode():
            model(input_ids=ids[:, :context], **{cache_kw: cache}, position_ids=positions[:, :context], use_cache=True,
                  logits_to_keep=1)
            for k in widths:
                step(k)
            times: dict[int, list[float]] = {k: [] for k in widths}
            for r in range(repeats):
                shift = r % len(widths)
                for k in widths[shift:] + widths[:shift]:
                    times[k].append(step(k))
    finally:
        model.train(was_training)
    return {k: min(t) / min(times[1]) for k, t in times.items()}
