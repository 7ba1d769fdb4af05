"""The one inference engine: KV cache, batched prompts of different lengths, a decoder registry.

Rollouts (recipes making their own training data), evaluation and benchmarks all decode through
:meth:`Engine.generate`, so a decoder's accuracy and speed are measured exactly the way its
training data was made.

Batches are LEFT padded: every row's next token then sits in the same column, so one forward
serves the whole batch. Position ids are ``cumsum(mask) - 1`` per row, as in Hugging Face
``generate``, which makes greedy ``ar`` decoding equal to ``model.generate`` token for token
(tests/test_engine.py checks this on every tiny family).

A decoder is a function ``(engine, batch, max_new_tokens, **settings) -> DecodeResult``
registered by name with :func:`register_decoder`. The engine gives decoders the building blocks
they share: :meth:`Engine.forward` (new tokens at given positions on top of a cache, with a
padding mask or a custom attention pattern), :func:`crop_cache` (roll back rejected tokens),
:func:`fork_cache`, :func:`select_cache_rows`, :func:`shift_cache_rows`,
:func:`gather_cache_slots` (rows that keep different numbers of tokens per step) and
:func:`keep_cache_tail` (rows that keep the same number).

Conventions every decoder keeps:

- ``sequences`` hold the new tokens of each row up to and *including* its first stop token
  (EOS); nothing after it, never padding. ``texts`` are decoded without special tokens, so the
  EOS does not appear in them.
- ``stats.new_tokens`` counts exactly the tokens in ``sequences`` (EOS included: producing it
  cost a step like any other token).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import time
import typing
import weakref
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any, Callable, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase, StaticCache

from leaplm.config import Config, ConfigError, build
from leaplm.models.cache import cache_argument


class DecoderError(ValueError):
    """A decoder name or decoder setting that cannot be used; the message names the fix."""


class PromptTooLongError(ValueError):
    """A prompt that, with the requested new tokens, does not fit the model's positions."""


# ----- Results and statistics ---------------------------------------------------------------


@dataclass
class GenerationStats:
    """Cost of one ``generate`` call (or, summed with ``+``, of several).

    ``tokens_per_forward`` is per sequence: new tokens divided by the forwards each row took
    until it finished, so plain AR decoding scores exactly 1.0 at any batch size and a parallel
    decoder's score is the number of tokens it commits per step. ``forward_passes`` counts
    model calls for the whole batch (what the hardware actually runs).
    """

    forward_passes: int = 0  # model calls for the batch
    sequence_forwards: int = 0  # sum over rows of the forwards made until that row finished
    new_tokens: int = 0  # tokens in the returned sequences (EOS included)
    wall_time_s: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.sequence_forwards if self.sequence_forwards else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def __add__(self, other: GenerationStats) -> GenerationStats:
        return GenerationStats(
            self.forward_passes + other.forward_passes,
            self.sequence_forwards + other.sequence_forwards,
            self.new_tokens + other.new_tokens,
            self.wall_time_s + other.wall_time_s,
        )


@dataclass
class GenerationOutput:
    sequences: list[list[int]]  # new tokens per prompt, up to and including the first EOS
    texts: list[str]  # sequences decoded without special tokens
    stats: GenerationStats = field(default_factory=GenerationStats)


@dataclass
class DecodeResult:
    """What a decoder returns; the engine turns it into a :class:`GenerationOutput`."""

    tokens: torch.Tensor  # [b, n] new tokens; positions at or beyond `lengths` are ignored
    lengths: torch.Tensor  # [b] valid new tokens per row (through the first EOS, if any)
    forward_passes: int  # model calls made for the batch
    row_forwards: torch.Tensor  # [b] forwards made until each row finished


@dataclass
class PromptBatch:
    """Left-padded prompts, ready for a prefill forward."""

    input_ids: torch.Tensor  # [b, p] padding on the left
    attention_mask: torch.Tensor  # [b, p] 1 = real token, 0 = padding
    position_ids: torch.Tensor  # [b, p] cumsum(mask) - 1; 0 on padding
    lengths: torch.Tensor  # [b] prompt lengths = position of each row's first new token
    has_padding: bool  # False when all prompts have the same length: no mask needed at all

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]


class PaddingMask:
    """The 2D padding mask of a batch, allocated once for the prompt plus every new token.

    Decoders slice it instead of concatenating a column per step. Without padding it is
    ``None``, which lets the model skip mask construction (as ``generate`` does).
    """

    def __init__(self, batch: PromptBatch, max_new_tokens: int):
        self.mask: torch.Tensor | None = None
        if batch.has_padding:
            mask = batch.attention_mask.new_ones(batch.size, batch.width + max_new_tokens)  # [b, p + n]
            mask[:, : batch.width] = batch.attention_mask
            self.mask = mask

    def upto(self, kv_length: int) -> torch.Tensor | None:
        """Mask over the first ``kv_length`` cache slots (cached tokens plus the new ones)."""
        return None if self.mask is None else self.mask[:, :kv_length]  # [b, kv]


# ----- KV cache building blocks -------------------------------------------------------------


def new_cache() -> DynamicCache:
    """An empty cache that keeps every position of every layer.

    It is built without the model config on purpose: with one, sliding-window layers discard
    old positions and can then no longer be cropped back, which speculative and Jacobi decoders
    need. The models still apply their sliding windows through the attention mask.
    """
    return DynamicCache()


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Drop every cached position from ``length`` on (in place), e.g. rejected draft tokens."""
    current = cache.get_seq_length()
    if not 0 <= length <= current:
        raise ValueError(f"cannot crop a cache of {current} positions to {length}")
    if length < current:
        cache.crop(length - current)  # a negative count removes that many trailing positions


def fork_cache(cache: DynamicCache) -> DynamicCache:
    """An independent copy: decoding on the fork leaves the original untouched."""
    return copy.deepcopy(cache)


def select_cache_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Keep (or reorder to) the batch rows ``rows`` [k] of the cache, in place."""
    cache.batch_select_indices(rows)


def shift_cache_rows(cache: DynamicCache, shifts: torch.Tensor, length: int) -> None:
    """Move row b's cached positions ``shifts[b]`` slots right (left if negative), keep ``length`` slots.

    In place. Slot j of row b then holds what slot j - shifts[b] held; a slot with no source holds
    junk, which the caller masks out. Decoders that keep a different number of new tokens per row
    in one step (Jacobi; speculative decoding in general) use it to keep every row's tokens right-aligned against the
    end of the cache, as left padding aligns prompts: no holes between a row's tokens, so padding
    masks and sliding windows stay exact, and no row waits for another.
    """
    if not bool(shifts.any()):
        crop_cache(cache, length)
        return
    gather_cache_slots(cache, torch.arange(length, device=shifts.device)[None] - shifts[:, None])


def gather_cache_slots(cache: DynamicCache, source: torch.Tensor) -> None:
    """Rebuild the cache in place so that slot j of row b holds what slot ``source[b, j]`` held.

    ``source`` [b, length]; out-of-range sources are clamped (their slots hold junk the caller
    masks out). Tree and speculative decoders use it to keep only the accepted new tokens.
    """
    source = source.clamp(0, cache.get_seq_length() - 1)[:, None, :, None]  # [b, 1, length, 1]
    for layer in cache.layers:
        layer.keys = layer.keys.gather(2, source.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3]))
        layer.values = layer.values.gather(2, source.expand(-1, layer.values.shape[1], -1, layer.values.shape[3]))


def keep_cache_tail(cache: DynamicCache, start: int, source: torch.Tensor) -> None:
    """Slot ``start + j`` of row b gets what slot ``source[b, j]`` (>= start) held; the cache ends after them.

    ``source`` [b, w]. In place, and only the slots from ``start`` on are copied: when every row
    keeps the same number of new tokens (always so at batch 1) no row needs re-aligning, and the
    full-cache gather of :func:`gather_cache_slots` would copy every cached key for nothing.
    """
    w = source.shape[1]
    for layer in cache.layers:
        for name in ("keys", "values"):
            states = getattr(layer, name)  # [b, heads, slots, head_dim]
            kept = states.gather(2, source[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3]))
            states[:, :, start:start + w] = kept
            setattr(layer, name, states[:, :, :start + w])


# ----- Token selection ----------------------------------------------------------------------


def check_sampling(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> None:
    """Refuse sampling settings :class:`TokenPicker` cannot use, naming the fix."""
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or temperature < 0:
        raise DecoderError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 0:
        raise DecoderError(f"top_k must be >= 0 (0 = no top-k filter), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, Real) or not 0 < top_p <= 1:
        raise DecoderError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {top_p!r}")


class TokenPicker:
    """Greedy (temperature 0) or seeded sampling with temperature, top-k and top-p.

    All work is on-device tensor ops; a seeded ``torch.Generator`` makes sampling reproducible
    and independent of the global RNG.
    """

    def __init__(self, device: torch.device, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0):
        check_sampling(temperature, top_k, top_p)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.greedy = temperature == 0
        self.generator = None if self.greedy else torch.Generator(device=device).manual_seed(seed)

    def filtered_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Temperature-scaled logits with tokens outside top-k / top-p set to -inf."""
        logits = logits.float() / self.temperature  # [b, v]
        if self.top_k:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [b, 1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [b, v]
            probs = sorted_logits.softmax(dim=-1)
            # Drop a token when the tokens ranked above it already hold top_p of the mass; the
            # most likely token always survives.
            drop_sorted = probs.cumsum(dim=-1) - probs >= self.top_p
            logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
        return logits

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token per row [b] from next-token logits [b, v]."""
        if self.greedy:
            return logits.argmax(dim=-1)
        probs = self.filtered_logits(logits).softmax(dim=-1)  # [b, v]
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)


# ----- Decoder registry ---------------------------------------------------------------------

Decoder = Callable[..., DecodeResult]
DECODERS: dict[str, Decoder] = {}
SETTINGS_CHECKS: dict[str, tuple[Callable[..., None], ...]] = {}  # decoder name -> its model-free checks
RENAMED_SETTINGS: dict[str, dict[str, str]] = {}  # decoder name -> {old setting name: new name}


def register_decoder(name: str, checks: Sequence[Callable[..., None]] = (),
                     renamed: dict[str, str] | None = None) -> Callable[[Decoder], Decoder]:
    """Register ``fn(engine, batch, max_new_tokens, **settings) -> DecodeResult`` as ``name``.

    ``checks`` are the decoder's own settings checks that need no model (ranges, choices): the
    decoder calls them itself, and :func:`check_decoder_settings` runs them before any model is
    loaded, so a run's bad value fails as the trainer starts, not after training. ``renamed``
    maps a setting's former name to its new one, so a config still using the old name is told
    the new one.
    """

    def wrap(fn: Decoder) -> Decoder:
        if name in DECODERS:
            raise ValueError(f"a decoder named {name!r} is already registered ({DECODERS[name].__module__})")
        DECODERS[name] = fn
        SETTINGS_CHECKS[name] = tuple(checks)
        RENAMED_SETTINGS[name] = dict(renamed or {})
        return fn

    return wrap


def get_decoder(name: str) -> Decoder:
    if name not in DECODERS:
        raise DecoderError(f"unknown decoder {name!r}; available: {', '.join(sorted(DECODERS))}")
    return DECODERS[name]


def decoder_setting_names(name: str) -> list[str] | None:
    """The keyword settings decoder ``name`` accepts (for error messages); None when it takes any."""
    params = list(inspect.signature(get_decoder(name)).parameters.values())[3:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD]


def decoder_settings_type(name: str) -> type:
    """Decoder ``name``'s settings as a dataclass: one field per keyword setting, with the type and
    default its signature declares. Generated, so the signature stays the one definition."""
    fn = get_decoder(name)
    hints = typing.get_type_hints(fn)
    fields = []
    for p in list(inspect.signature(fn).parameters.values())[3:]:
        if p.kind is p.VAR_KEYWORD:
            continue
        default = dataclasses.field(default=p.default) if p.default is not p.empty else dataclasses.MISSING
        fields.append((p.name, hints.get(p.name, Any), default))
    return dataclasses.make_dataclass(f"{name.title().replace('_', '')}Settings", fields, frozen=True)


def check_decoder_settings(name: str, settings: dict[str, Any]) -> None:
    """Refuse an unknown decoder, a setting it does not have, a value of the wrong type, or a value
    its checks reject.

    Needs no model: each registered check gets the settings its signature names, the decoder's
    defaults filling those not given, then every value is typed against
    :func:`decoder_settings_type`. Settings that depend on the model (a default block size, draft
    heads, a draft's vocabulary) are checked by the decoder when it runs.
    """
    fn = get_decoder(name)
    allowed = decoder_setting_names(name)
    unknown = [k for k in settings if allowed is not None and k not in allowed]
    if unknown:
        if unknown[0] in RENAMED_SETTINGS.get(name, {}):
            raise DecoderError(f"decoder {name!r}: the setting {unknown[0]!r} was renamed to "
                               f"{RENAMED_SETTINGS[name][unknown[0]]!r}")
        raise DecoderError(
            f"decoder {name!r} has no setting {unknown[0]!r}; its settings: {', '.join(allowed) or 'none'}"
        )
    params = list(inspect.signature(fn).parameters.values())[3:]
    given = {p.name: p.default for p in params if p.default is not p.empty} | dict(settings)
    for check in SETTINGS_CHECKS.get(name, ()):  # a decoder put in DECODERS by hand has none
        wanted = inspect.signature(check).parameters
        try:
            check(**{k: v for k, v in given.items() if k in wanted})
        except TypeError as err:  # a comparison on a value of the wrong type, e.g. threshold: "high"
            raise DecoderError(f"decoder {name!r}: a setting in {settings} has the wrong type ({err})") from err
    # After the decoder's own checks, whose messages say what a setting means: the type of every
    # setting they do not look at.
    if allowed is not None:
        try:
            build(decoder_settings_type(name), dict(settings), f"decoder {name!r}")
        except ConfigError as err:
            raise DecoderError(str(err)) from None


def check_config_decoders(cfg: Config) -> None:
    """Check the decoders a run names (``eval``, ``rollout``) and their settings.

    A run's config is checked when it loads (``train/recipes.py::load_config``; ``config.py`` sits
    below the engine), before anything trains or rolls out; the error names the config key and
    lists the decoders or settings there are.
    """
    for section in ("eval", "rollout"):
        part = getattr(cfg, section)
        try:
            check_decoder_settings(part.decoder, part.decoder_settings)
        except DecoderError as err:
            key = f"{section}.decoder_settings" if part.decoder in DECODERS else f"{section}.decoder"
            raise ConfigError(f"{key}: {err}") from None


# ----- The engine ---------------------------------------------------------------------------


class Engine:
    """Decodes batches of token-id prompts with any registered decoder.

    ``stop_token_ids`` defaults to the tokenizer's EOS plus the model's
    ``generation_config.eos_token_id`` (chat models often end turns with a second token).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 stop_token_ids: list[int] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        if stop_token_ids is None:
            stop_token_ids = default_stop_ids(model, tokenizer)
        if not stop_token_ids:
            raise ValueError("the engine needs at least one stop token; set tokenizer.eos_token")
        self.stop_token_ids = list(dict.fromkeys(stop_token_ids))
        self._stop_ids = torch.tensor(self.stop_token_ids, device=self.device)  # [k]
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.stop_token_ids[0]
        self.max_positions = getattr(model.config, "max_position_embeddings", None)

    # --- inputs ---

    def prepare(self, prompts: list[list[int]], max_new_tokens: int) -> PromptBatch:
        """Left-pad ``prompts``; reject empty ones and ones that leave no room for new tokens."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            if self.max_positions is not None and len(prompt) + max_new_tokens > self.max_positions:
                raise PromptTooLongError(
                    f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it needs "
                    f"{len(prompt) + max_new_tokens} positions but the model has max_position_embeddings="
                    f"{self.max_positions}. Shorten the prompt to at most {self.max_positions - max_new_tokens} "
                    "tokens or lower max_new_tokens."
                )
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)  # [b, p]
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [b, p]
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt):] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # [b, p]
        lengths = attention_mask.sum(-1)  # [b]
        return PromptBatch(
            input_ids.to(self.device), attention_mask.to(self.device), position_ids.to(self.device),
            lengths.to(self.device), has_padding=bool((attention_mask == 0).any()),
        )

    # --- model calls ---

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: DynamicCache,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        custom_mask: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
        past_length: int | None = None,
        logits_to_keep: int = 0,
        **model_kwargs: Any,
    ):
        """One model call: new tokens ``input_ids`` [b, s] at ``positions`` [b, s] after ``cache``.

        Their keys/values are appended to ``cache``. Attention is either causal with a padding
        mask ``attention_mask`` [b, cache + s] (None = no padding), or ``custom_mask``
        [b, s, cache + s] (bool, True = may attend) for patterns such as trees or bidirectional
        blocks; see :meth:`mask_for_new_tokens`. With a custom mask fed out of position order,
        ``offsets`` [s] says where new token j belongs: sliding windows take it as sitting in
        slot ``cache + offsets[j]`` rather than its own ``cache + j`` (a tree node at its depth).
        ``past_length`` is the number of cached tokens a custom mask's keys begin with, where the
        layers that run hold fewer than the cache's first layer (which ``cache.get_seq_length()``
        reads): a forward of the later layers only, whose first layers cached the new tokens
        already (``models/early_exit.py``); default the cache's length.
        ``logits_to_keep=k`` computes logits for the last k tokens only (0 = all).
        """
        if custom_mask is not None:
            if attention_mask is not None:
                raise ValueError("pass either attention_mask (padding) or custom_mask, not both")
            past = cache.get_seq_length() if past_length is None else past_length
            attention_mask = self._model_mask(custom_mask, past, offsets)
        elif offsets is not None or past_length is not None:
            raise ValueError("offsets and past_length place the new tokens of a custom_mask; pass custom_mask too")
        return self.model(
            input_ids=input_ids,
            **{cache_argument(self.model): cache},
            position_ids=positions,
            attention_mask=attention_mask,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **model_kwargs,
        )

    @staticmethod
    def mask_for_new_tokens(padding_mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
        """Custom mask for ``s`` new tokens: every cached token per ``padding_mask``, then ``pattern``.

        ``padding_mask`` [b, cache + s] marks real tokens; ``pattern`` [s, s] (bool) says which new
        token may attend to which (lower-triangular = causal, all True = bidirectional block, a
        tree's ancestor matrix for tree decoding). Every token must be allowed to attend to itself.
        Returns [b, s, cache + s].
        """
        s = pattern.shape[0]
        real = padding_mask.bool()  # [b, kv]
        allowed = real[:, None, :].expand(-1, s, -1).clone()  # [b, s, kv]
        allowed[:, :, -s:] &= pattern.to(real.device)[None]
        return allowed

    def _model_mask(self, allowed: torch.Tensor, past: int, offsets: torch.Tensor | None = None
                    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Turn a bool [b, s, kv] pattern into what the model's attention implementation takes.

        Sliding-window layers get the window as transformers applies it to its own masks, a query
        at position q sees keys at positions k > q - window, counted on each token's *place*: a
        cached token's slot (every row's cached tokens are right-aligned without holes, so slots
        differ as positions do) and new token j's ``past + offsets[j]`` (default ``past + j``, its slot).
        """
        config = self.model.config
        impl = config._attn_implementation
        if impl not in ("sdpa", "eager"):
            raise NotImplementedError(
                f"custom attention masks need attn_implementation 'sdpa' or 'eager', the model uses {impl!r}; "
                "load it with attn_implementation='sdpa'"
            )
        s, kv = allowed.shape[1], allowed.shape[2]
        window = getattr(config, "sliding_window", None)
        windowed = allowed
        if window is not None and kv > window:
            order = torch.arange(s, device=allowed.device) if offsets is None else offsets.to(allowed.device)  # [s]
            place = torch.cat([torch.arange(past, device=allowed.device), past + order])  # [kv]
            windowed = allowed & (place[None, :] > place[past:, None] - window)[None]

        def to_model(mask: torch.Tensor) -> torch.Tensor:
            mask = mask[:, None]  # [b, 1, s, kv]
            if impl == "sdpa":
                return mask
            zero = torch.zeros((), dtype=self.model.dtype, device=mask.device)
            return torch.where(mask, zero, torch.finfo(self.model.dtype).min)

        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:  # models with per-layer-type masks accept a dict
            return {"full_attention": to_model(allowed), "sliding_attention": to_model(windowed)}
        return to_model(windowed)

    def is_stop(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bool mask of stop tokens, same shape as ``tokens``."""
        return torch.isin(tokens, self._stop_ids)

    # --- public entry ---

    def generate(
        self, prompts: list[list[int]], decoder: str = "ar", max_new_tokens: int = 128, **decoder_settings: Any
    ) -> GenerationOutput:
        """Decode ``prompts`` (token ids, chat formatted if the model expects it) with ``decoder``."""
        check_decoder_settings(decoder, decoder_settings)
        fn = get_decoder(decoder)
        if not prompts:
            return GenerationOutput([], [], GenerationStats())
        batch = self.prepare(prompts, max_new_tokens)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                _synchronize(self.device)
                start = time.perf_counter()
                result = fn(self, batch, max_new_tokens, **decoder_settings)
                _synchronize(self.device)
                wall = time.perf_counter() - start
        finally:
            self.model.train(was_training)
        tokens, lengths = result.tokens.tolist(), result.lengths.tolist()
        sequences = [row[:n] for row, n in zip(tokens, lengths)]
        stats = GenerationStats(
            forward_passes=result.forward_passes,
            sequence_forwards=int(result.row_forwards.sum()),
            new_tokens=sum(lengths),
            wall_time_s=wall,
        )
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return GenerationOutput(sequences, texts, stats)


def default_stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids += configured if isinstance(configured, (list, tuple)) else [configured]
    return ids


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall times measure the decode, not the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- Built-in decoders --------------------------------------------------------------------


_compiled_models: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_model(model: PreTrainedModel) -> Callable:
    """``torch.compile(model)`` built once per model, for decode steps of static shape: with CUDA
    graphs on a GPU (``mode="reduce-overhead"``), inductor's generated code on CPU."""
    if model not in _compiled_models:
        mode = "reduce-overhead" if next(model.parameters()).is_cuda else None
        _compiled_models[model] = torch.compile(model, mode=mode, dynamic=False)
    return _compiled_models[model]


def _check_ar(compile_step: bool = False) -> None:
    if not isinstance(compile_step, bool):
        raise DecoderError(f"compile_step must be true or false, got {compile_step!r}")


@register_decoder("ar", checks=(check_sampling, _check_ar))
def autoregressive(
    engine: Engine, batch: PromptBatch, max_new_tokens: int, *,
    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, compile_step: bool = False,
) -> DecodeResult:
    """One token per forward over the KV cache: the baseline every parallel decoder must beat.

    Greedy (temperature 0) equals ``model.generate(do_sample=False)`` token for token.
    ``compile_step`` runs the one-token steps through :func:`compiled_model` over a static cache
    sized for the prompt plus ``max_new_tokens`` and a full-length padding mask, so every step
    has the same shapes (CUDA graphs on a GPU). The first call per batch shape compiles (about
    two minutes on 2 CPU cores for the tiny teacher), so it is off by default and pays only on
    long decodes of one shape.
    """
    _check_ar(compile_step)
    pick = TokenPicker(engine.device, temperature, top_k, top_p, seed)
    b = batch.size
    span = batch.width + max_new_tokens
    cache = StaticCache(config=engine.model.config, max_cache_len=span) if compile_step else new_cache()
    padding = PaddingMask(batch, max_new_tokens)
    tokens = torch.full((b, max_new_tokens), engine.pad_token_id, dtype=torch.long, device=engine.device)  # [b, n]
    lengths = torch.zeros(b, dtype=torch.long, device=engine.device)  # [b]
    unfinished = torch.ones(b, dtype=torch.bool, device=engine.device)  # [b]
    pad = torch.tensor(engine.pad_token_id, device=engine.device)

    out = engine.forward(batch.input_ids, cache, batch.position_ids, padding.upto(batch.width), logits_to_keep=1)
    positions = batch.lengths[:, None].clone()  # [b, 1] position of the token being fed next
    forwards = 1
    for step in range(max_new_tokens):
        next_tokens = torch.where(unfinished, pick(out.logits[:, -1]), pad)  # [b]
        tokens[:, step] = next_tokens
        lengths += unfinished
        unfinished &= ~engine.is_stop(next_tokens)
        if step + 1 == max_new_tokens or not unfinished.any():
            break
        if compile_step:  # static shapes: the whole mask, the cache slot as a tensor
            out = compiled_model(engine.model)(
                input_ids=next_tokens[:, None], **{cache_argument(engine.model): cache}, position_ids=positions,
                attention_mask=padding.upto(span), cache_position=torch.tensor([batch.width + step], device=engine.device),
                use_cache=True, logits_to_keep=1)
        else:
            out = engine.forward(next_tokens[:, None], cache, positions, padding.upto(batch.width + step + 1),
                                 logits_to_keep=1)
        positions += 1
        forwards += 1
    return DecodeResult(tokens[:, :forwards], lengths, forwards, row_forwards=lengths)


@register_decoder("hf_generate")
def hf_generate(engine: Engine, batch: PromptBatch, max_new_tokens: int) -> DecodeResult:
    """Hugging Face ``model.generate`` (greedy, KV cache) on the same padded batch: the reference.

    Like any ``generate`` call, it still applies what the checkpoint's ``generation_config`` sets
    beyond these arguments (e.g. a repetition penalty); the tiny teacher sets nothing.
    """
    output = engine.model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=engine.stop_token_ids,
        pad_token_id=engine.pad_token_id,
    )
    tokens = output[:, batch.width:]  # [b, n]
    stops = engine.is_stop(tokens)  # [b, n]
    first_stop = torch.where(stops.any(-1), stops.int().argmax(-1) + 1, tokens.shape[1])  # [b]
    return DecodeResult(tokens, first_stop, tokens.shape[1], row_forwards=first_stop)

