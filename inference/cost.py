"""What a decoder's forwards cost: their widths, and the measured time of a k-token forward.

A parallel decoder commits several tokens per forward, but each of its forwards feeds k new
tokens instead of 1. Whether that turns into wall-clock speed depends on how much more a
k-token forward costs than a 1-token one on the machine at hand: close to 1x while a step is
bound by reading the weights (small batches on a GPU), growing toward k x as it becomes bound by
arithmetic (larger batches; sooner on a CPU than on a GPU). :func:`step_cost` measures that ratio on the spot;
:func:`record_forwards` records the widths of the forwards a decode makes; :class:`WidthChooser`
sizes a parallel decoder's steps from the measured cost and the decoder's running yield, so that a
step widens only when the tokens it commits pay for what the wider forward costs.
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
SIZING_REPEATS = 3  # rounds of the measurement behind a WidthChooser: it only needs the ratios' rough size


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
    The seconds behind the ratios are :func:`step_seconds`' (measured once, then kept)."""
    seconds = step_seconds(model, widths, batch_size, context, repeats)
    return {k: t / seconds[1] for k, t in seconds.items()}


def step_seconds(model: PreTrainedModel, widths: Sequence[int] = COST_WIDTHS, batch_size: int = 1,
                 context: int = 128, repeats: int = REPEATS) -> dict[int, float]:
    """Seconds of one forward of k new tokens over a KV cache of ``context`` tokens, for every k in
    ``widths`` and 1: ``{k: seconds}``.

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
    return {k: min(t) for k, t in times.items()}


# ----- Sizing parallel steps by cost ----------------------------------------------------------


class WidthChooser:
    """Chooses the width of each step of a parallel decoder: the forward width k (new tokens per
    row) with the highest expected yield per unit of time, ``yield(k) / cost(k)``.

    ``cost`` holds :func:`step_cost` ratios for the candidate widths (1 among them). ``yield(k)`` is
    the decoder's running mean of the tokens a forward of width k committed per row (an
    exponential moving average with weight ``decay`` on the past); a 1-token step always commits
    exactly one, so its rate is 1 and a width is chosen only while it beats plain AR. A width not
    tried yet counts as fully accepted (k tokens), so the decoder starts wide and narrows to what
    pays. Once 1 token wins, a wider step is tried again only in bursts of ``burst`` forwards
    (parallel decoders such as Jacobi need a forward or two before their guesses converge), after
    ``gap`` 1-token steps; the gap doubles after every burst that did not pay and returns to
    ``gap`` after one that did, so a decoder on which no width pays ends up within a few percent of
    AR. The chooser only picks widths: what a decoder feeds within one never changes its output.
    """

    def __init__(self, cost: dict[int, float], decay: float = 0.8, gap: int = 16, burst: int = 2):
        if 1 not in cost or any(k < 1 or c <= 0 for k, c in cost.items()):
            raise ValueError(f"cost needs ratios > 0 for widths >= 1, width 1 among them; got {cost}")
        self.cost = dict(cost)
        self.units = dict(cost)  # the relative cost of every width measured (width_chooser may add more)
        self.widths = sorted(cost)
        self.decay = decay
        self.base_gap = self.gap = gap
        self.burst = burst
        self.yields: dict[int, float] = {1: 1.0}
        self.since_wide = 0  # 1-token steps since the last wider one
        self.probe: int | None = None  # the width a running burst tries
        self.probe_left = 0
        self.probe_tokens = 0.0

    def rate(self, k: int) -> float:
        """Expected tokens per unit of 1-token-step time at width k."""
        return self.yields.get(k, float(k)) / self.cost[k]

    def best(self) -> int:
        return max(self.widths, key=lambda k: (self.rate(k), -k))  # ties to the narrower, cheaper step

    def leaning_wide(self) -> bool:
        """Whether the next choice will likely be wider than 1 token, for work that must start
        before it is made (it changes no state)."""
        return self.probe is not None or self.best() > 1

    def choose(self) -> int:
        """The width of the next forward."""
        if self.probe is not None:
            return self.probe
        best = self.best()
        if best > 1:
            return best
        self.since_wide += 1
        if self.since_wide < self.gap or len(self.widths) == 1:
            return 1
        self.probe = max(self.widths[1:], key=lambda k: (self.rate(k), -k))
        self.probe_left, self.probe_tokens = self.burst, 0.0
        return self.probe

    def observe(self, k: int, tokens: float) -> None:
        """Record that a forward of width ``k`` committed ``tokens`` tokens per row (a mean over rows)."""
        if k not in self.cost:
            raise ValueError(f"width {k} is not among the chooser's widths {self.widths}")
        if k > 1:
            previous = self.yields.get(k)
            self.yields[k] = tokens if previous is None else self.decay * previous + (1 - self.decay) * tokens
            self.since_wide = 0
        if self.probe is None:
            return
        self.probe_tokens += tokens
        self.probe_left -= 1
        if self.probe_left > 0:
            return
        paid = self.probe_tokens / self.burst / self.cost[self.probe] > 1.0
        # A burst's mean, not one forward's, is what the width showed: Jacobi's first forward over
        # fresh guesses commits about one token whatever the model.
        self.yields[self.probe] = self.probe_tokens / self.burst
        self.gap = self.base_gap if paid else 2 * self.gap
        self.probe = None


# engine -> {(decoder key, batch size, context bucket): WidthChooser}; weak, so a freed engine's go with it
_choosers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def candidate_widths(max_width: int) -> list[int]:
    """1, the powers of two below ``max_width``, and ``max_width``."""
    return sorted({1, max_width, *(2 ** i for i in range(max_width.bit_length()) if 2 ** i < max_width)})


def sizing_context(engine, context: int, widest: int) -> int:
    """The context a sizing measurement runs at: a power of two near ``context`` (one measurement
    serves many calls), within the model's positions."""
    context = max(64, 1 << max(context - 1, 0).bit_length())
    if engine.max_positions is not None:
        context = max(1, min(context, engine.max_positions - widest))
    return context


def width_chooser(engine, key: tuple, widths: Sequence[int], batch_size: int, context: int,
                 draft: PreTrainedModel | None = None, also: Sequence[int] = ()) -> WidthChooser:
    """The engine's :class:`WidthChooser` over ``widths`` (1 is always added) for one decoder and its
    settings (``key``) at this batch size: made on first use, from :func:`step_cost` measured then
    over about ``context`` cached tokens (a fraction of a second to a few seconds), then kept with
    the engine for every later call, whatever its context (the ratios move little with it), so the
    running yields carry over from one call to the next and nothing is measured twice.

    With a ``draft`` model (speculative decoding), a width-k step is a verification of k - 1
    drafted tokens, so its cost also counts k - 1 of the draft's 1-token forwards, timed the same
    way and expressed in the target's 1-token forwards. Widths in ``also`` are measured in the same
    run without being choices: the chooser's ``units`` holds the relative cost of every measured
    width, for a decoder that also counts forwards of other widths."""
    widths = sorted({1, *widths})
    slot = (key, batch_size, tuple(widths))
    choosers = _choosers.setdefault(engine, {})
    if slot not in choosers:
        context = sizing_context(engine, context, widths[-1])
        draft_limit = getattr(draft.config, "max_position_embeddings", None) if draft is not None else None
        if draft_limit is not None:
            context = max(1, min(context, draft_limit - 1))
        seconds = step_seconds(engine.model, sorted({*widths, *also}), batch_size=batch_size, context=context,
                               repeats=SIZING_REPEATS)
        units = {k: t / seconds[1] for k, t in seconds.items()}
        cost = {k: units[k] for k in widths}
        if draft is not None:
            drafted = step_seconds(draft, [1], batch_size=batch_size, context=context, repeats=SIZING_REPEATS)[1]
            cost = {k: c + (k - 1) * drafted / seconds[1] for k, c in cost.items()}
        choosers[slot] = WidthChooser(cost)
        choosers[slot].units = units
    return choosers[slot]
