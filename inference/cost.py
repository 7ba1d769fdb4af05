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
    row) with the most tokens per second, ``yield(k) / seconds(k)``.

    A step is whatever the decoder does between :meth:`choose` and :meth:`observe`: one forward
    for most decoders, a whole block for block diffusion. ``yield(k)`` is the running mean of the
    tokens per row such a step committed, ``seconds(k)`` the running mean of its time (exponential
    moving averages with weight ``decay`` on the past). A ``timed`` chooser takes each step's time
    from the clock, from :meth:`choose` to :meth:`observe`, so everything the step costs counts: its
    forward and the decoder's own work around it (masks, acceptance, cache upkeep), which on a
    small model or a large batch can outweigh the forward. Until a width has been seen, or when
    the chooser is not timed, its seconds are the prior ``cost[k] * unit_seconds`` (``cost`` holds
    :func:`step_cost` ratios, 1 among them; ``unit_seconds`` the measured time of a 1-token
    forward). A timed chooser times one 1-token step right after its first wide one, and another
    after every ``gap`` wide steps, so that AR, the step every width must beat, is priced by the
    clock too, and by a recent one.

    A 1-token step commits one token, so the decoder widens only while a width beats plain AR. A
    width not tried yet counts as fully accepted (k tokens), so the decoder starts wide and narrows
    to what pays. Other widths are tried again in bursts of ``burst`` steps (parallel decoders such
    as Jacobi need a forward or two before their guesses converge) after ``gap`` steps at the best
    width, and not before those steps took ``gap`` times the burst's expected extra time over them
    (a burst of whole denoised blocks can cost several AR blocks): when 1 token wins, the most
    promising wider width; when a width wins, the other width seen longest ago, whose estimate may
    be stale (a hard stretch of text lowers a wide width's yield, and nothing else would raise it
    again). The gap doubles after every burst that did not beat the best width and returns to
    ``gap`` after one that did, so a decoder on which no width pays ends up within a few percent
    of AR. The chooser only picks
    widths: what a decoder feeds within one never changes its output.
    """

    def __init__(self, cost: dict[int, float], decay: float = 0.8, gap: int = 16, burst: int = 2,
                 unit_seconds: float = 1.0, timed: bool = False):
        if 1 not in cost or any(k < 1 or c <= 0 for k, c in cost.items()):
            raise ValueError(f"cost needs ratios > 0 for widths >= 1, width 1 among them; got {cost}")
        if unit_seconds <= 0:
            raise ValueError(f"unit_seconds must be > 0, got {unit_seconds}")
        self.cost = dict(cost)
        self.unit_seconds = unit_seconds
        self.timed = timed
        self.widths = sorted(cost)
        self.decay = decay
        self.base_gap = self.gap = gap
        self.burst = burst
        self.yields: dict[int, float] = {}  # width -> running tokens per row of its steps
        self.spent: dict[int, float] = {}  # width -> running seconds of its steps (timed)
        self.chosen_at = 0.0  # clock at the last choice
        self.since_probe = 0  # steps since the last burst
        self.idle = 0.0  # their seconds
        self.since_narrow = 0  # wide steps since the last 1-token one
        self.steps = 0  # steps observed
        self.seen: dict[int, int] = {}  # width -> the step it was last observed at
        self.probe: int | None = None  # the width a running burst tries
        self.probe_against = 1  # the best width when the burst began: what it must beat
        self.probe_left = 0
        self.probe_tokens = self.probe_seconds = 0.0

    def seconds(self, k: int) -> float:
        """Expected seconds of a width-k step."""
        return self.spent.get(k, self.cost[k] * self.unit_seconds)

    def rate(self, k: int) -> float:
        """Expected tokens per second at width k."""
        return self.yields.get(k, float(k)) / self.seconds(k)

    def best(self) -> int:
        return max(self.widths, key=lambda k: (self.rate(k), -k))  # ties to the narrower, cheaper step

    def overdue(self, k: int, steps: int = 1, done: float = 1.0) -> bool:
        """Whether the step chosen last is behind a width-k step's pace: it has already taken longer
        than ``done`` (the fraction of its work done so far) of what a width-k step is expected to
        take, counting ``steps`` width-k forwards while width k has not been timed (its prior is one
        forward's; an observed step may be several, as a block diffusion decoder's AR block is). A
        decoder whose wide step falls behind can finish it by narrower means; checking the pace as
        the step goes, not only its whole time, lets a step that will not pay stop early."""
        expected = self.spent[k] if k in self.spent else steps * self.seconds(k)
        return self.timed and time.perf_counter() - self.chosen_at > done * expected

    def leaning_wide(self) -> bool:
        """Whether the next choice will likely be wider than 1 token, for work that must start
        before it is made (it changes no state)."""
        return self.probe is not None or self.best() > 1

    def choose(self) -> int:
        """The width of the next step."""
        self.chosen_at = time.perf_counter()
        if self.probe is not None:
            return self.probe
        if self.timed and 1 not in self.spent and self.spent:
            return 1  # once a wide step is timed, time a 1-token one: its prior leaves out the decoder's own work
        best = self.best()
        if best > 1:
            self.since_narrow += 1
            if self.timed and self.since_narrow > self.gap:
                self.since_narrow = 0
                return 1  # re-time AR now and then: a width wins only against what AR costs now
        self.since_probe += 1
        others = [k for k in self.widths[1:] if k != best]
        if self.since_probe < self.gap or not others:
            return best
        if best == 1:  # does any width pay now? try the most promising
            probe = max(others, key=lambda k: (self.rate(k), -k))
        else:  # is another width's estimate stale (a hard stretch lowered it)? try the one seen longest ago
            probe = min(others, key=lambda k: (self.seen.get(k, -1), -k))
        if self.idle < self.gap * self.burst * (self.seconds(probe) - self.seconds(best)):
            return best
        self.probe, self.probe_against = probe, best
        self.probe_left, self.probe_tokens, self.probe_seconds = self.burst, 0.0, 0.0
        return self.probe

    def observe(self, k: int, tokens: float) -> None:
        """Record that a step of width ``k`` committed ``tokens`` tokens per row (a mean over rows),
        and, when timed, that it took the time since the last :meth:`choose`."""
        if k not in self.cost:
            raise ValueError(f"width {k} is not among the chooser's widths {self.widths}")
        seconds = time.perf_counter() - self.chosen_at if self.timed else self.seconds(k)
        self._average(self.yields, k, tokens)
        if self.timed:
            self._average(self.spent, k, seconds)
        self.steps += 1
        self.seen[k] = self.steps
        if self.probe is None:
            self.idle += seconds
            return
        self.probe_tokens += tokens
        self.probe_seconds += seconds
        self.probe_left -= 1
        if self.probe_left > 0:
            return
        paid = self.probe_tokens / self.probe_seconds > self.rate(self.probe_against)
        # A burst's mean, not one step's, is what the width showed: Jacobi's first forward over
        # fresh guesses commits about one token whatever the model.
        self.yields[self.probe] = self.probe_tokens / self.burst
        if self.timed:
            self.spent[self.probe] = self.probe_seconds / self.burst
        self.gap = self.base_gap if paid else 2 * self.gap
        self.probe, self.since_probe, self.idle = None, 0, 0.0

    def _average(self, means: dict[int, float], k: int, value: float) -> None:
        previous = means.get(k)
        means[k] = value if previous is None else self.decay * previous + (1 - self.decay) * value


# engine -> {(decoder key, batch size, context bucket): WidthChooser}; weak, so a freed engine's go with it
_choosers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def candidate_widths(max_width: int) -> list[int]:
    """Every width up to 4, the powers of two below ``max_width``, and ``max_width``.

    Every narrow width is a candidate, as the cost often steps there rather than growing smoothly:
    on a CPU a forward of a few tokens can cost about what 1 does (the matrix products stay bound
    by reading the weights) while one more token costs much more."""
    narrow = range(1, min(max_width, 4) + 1)
    return sorted({*narrow, max_width, *(2 ** i for i in range(max_width.bit_length()) if 2 ** i < max_width)})


def sizing_context(engine, context: int, widest: int) -> int:
    """The context a sizing measurement runs at: a power of two near ``context`` (one measurement
    serves many calls), within the model's positions."""
    context = max(64, 1 << max(context - 1, 0).bit_length())
    if engine.max_positions is not None:
        context = max(1, min(context, engine.max_positions - widest))
    return context


def width_chooser(engine, key: tuple, widths: Sequence[int], batch_size: int, context: int,
                 draft: PreTrainedModel | None = None, burst: int = 2) -> WidthChooser:
    """The engine's timed :class:`WidthChooser` over ``widths`` (1 is always added) for one decoder
    and its settings (``key``) at this batch size: made on first use, its prior from
    :func:`step_seconds` measured then over about ``context`` cached tokens (a fraction of a second
    to a few seconds), then kept with the engine for every later call, whatever its context, so
    the running yields and step times carry over from one call to the next and nothing is
    measured twice.

    With a ``draft`` model (speculative decoding), a width-k step is a verification of k - 1
    drafted tokens, so its prior also counts k - 1 of the draft's 1-token forwards, timed the same
    way. ``burst``: the chooser's steps per retry of a wider width."""
    widths = sorted({1, *widths})
    slot = (key, batch_size, tuple(widths))
    choosers = _choosers.setdefault(engine, {})
    if slot not in choosers:
        context = sizing_context(engine, context, widths[-1])
        draft_limit = getattr(draft.config, "max_position_embeddings", None) if draft is not None else None
        if draft_limit is not None:
            context = max(1, min(context, draft_limit - 1))
        seconds = step_seconds(engine.model, widths, batch_size=batch_size, context=context, repeats=SIZING_REPEATS)
        if draft is not None:
            drafted = step_seconds(draft, [1], batch_size=batch_size, context=context, repeats=SIZING_REPEATS)[1]
            seconds = {k: t + (k - 1) * drafted for k, t in seconds.items()}
        choosers[slot] = WidthChooser({k: t / seconds[1] for k, t in seconds.items()}, burst=burst,
                                      unit_seconds=seconds[1], timed=True)
    return choosers[slot]
