"""Jacobi decoders: guess a block of tokens, refine every guess in parallel, keep what has converged.

Greedy Jacobi decoding is lossless: it writes exactly the tokens of greedy AR decoding (and of
``model.generate``), with the model's own causal attention and exact KV cache, in fewer forwards
when guesses turn out right. Untrained models gain little (about 1.05 tokens per forward); CLLM
and Jacobi Forcing train a model to converge in fewer iterations, on trajectories collected by
:func:`collect_jacobi_trajectories` below.

**The state.** Each row's answer is cut into blocks of ``jacobi_block_size`` new tokens, aligned to the
response (block r holds new tokens [r*n, (r+1)*n); the last block is cut at ``max_new_tokens``).
Per row, the first ``final`` new tokens are *final*: exactly what greedy AR decoding writes. The
tokens from ``final`` up to ``ends`` are *guesses*, the Jacobi state of the blocks in flight.

**One iteration** (one forward) feeds the guesses after the final tokens and, with the token
shift, compares each guess with the prediction made at the position before it:

1. the prediction at the first guessed index is final (its whole context is final), so every
   forward makes at least one token final, and a wrong guess costs nothing but compute;
2. each following guess that equals the prediction before it is *accepted*, and then the
   prediction after it is final too (the standard exact-convergence rule: accept the matched
   prefix);
3. every other guess is replaced by its prediction (the Jacobi update), and the KV cache keeps
   only the K/V of final tokens (the guesses' K/V are dropped).

When the guesses of a block have all become final the block has reached its fixed point, and the
forward that verified them also predicted the next block's first token. The next block is started
(*spawned*) as soon as the current one has no guess left: its first token is the prediction at
its index (final, or a guess when the block before it ended on a corrected token), and the rest
are initial guesses by ``init``: ``"prompt"`` draws tokens uniformly from the row's prompt (as
the reference does), ``"pad"`` uses the pad token, ``"repeat"`` repeats the block's first token,
``"lookup"`` copies what followed the latest earlier occurrence of the row's last 1-3 tokens in
its prompt and answer so far (prompt-lookup decoding's guess; our addition), drawing from the
prompt where it finds nothing.

**Several blocks in flight** (``jacobi_multiblock``). Up to ``n_blocks`` blocks are guessed at
once: a new block is spawned once the newest one has *settled* ``ceil(spawn_ratio * jacobi_block_size)``
tokens (a leading run of final tokens and of guesses the last forward left unchanged). The blocks
in flight are one longer Jacobi state, verified left to right in the same forward, so greedy
output is still exactly AR's. With ``recycle``, each row keeps a pool of its last ``pool_size``
rejected guess tails (the guesses from the first mismatch on, as they were before the forward
replaced them); a spawned block takes the tokens that followed its first token in the newest
pooled tail holding it as its guesses, and ``init`` fills the rest.

**Cost-aware widths** (``adaptive``, on by default when greedy). A forward that feeds k tokens
costs more than a 1-token one (little on a GPU at batch 1, several times more on a CPU or at large
batches), so each forward feeds only the first k - 1 guesses, k chosen by the engine's
:class:`~leaplm.inference.cost.WidthChooser` from the measured cost of a k-token forward and the
tokens that forwards of that width have been committing. The guesses not fed keep their values
for a later forward, and k = 1 is a plain AR step. Acceptance is still the matched prefix of what
was fed, so greedy output is unchanged whatever the widths. With ``init="lookup"`` every step also
looks up the row's context (prompt and final tokens) and, where it finds a match, replaces the
guesses by what followed it, as prompt-lookup decoding drafts; such steps are sized by a chooser of
their own, so a decoder widens its steps when lookup has candidates and falls back to 1-token
steps when it has none and Jacobi's own guesses do not pay. Trajectory collection always feeds
every guess and never refreshes them.

**Sampling** (``jacobi`` with ``temperature > 0``) uses the Speculative Jacobi Decoding rule: a
guess x drawn from q (the previous forward's distribution at its index) is accepted with
probability min(1, p(x)/q(x)) under the current distribution p; at the first rejection the final
token is drawn from norm(max(0, p - q)); if every guess is accepted, the prediction after the
last one is drawn from p; the unaccepted guesses are redrawn from p. The output is then
distributed exactly as AR sampling with the same ``temperature``/``top_k``/``top_p``.

**Batches.** Rows progress independently: no row waits for another. Every row's cached tokens
(prompt and final tokens but its newest) stay right-aligned against the end of the cache, as left
padding aligns the prompts. A forward feeds each row its newest final token and its guesses,
right-padded to the longest row's; afterwards each row keeps the K/V of the fed tokens that turned
out final and is shifted (:func:`~leaplm.inference.engine.shift_cache_rows`) so all rows end at
the same slot again. A row's tokens thus never have holes between them, so padding masks and
sliding windows work exactly as in ``generate``. ``row_forwards`` counts the forwards made while
a row was unfinished.

Where we differ from the reference code (hao-ai-lab Consistency_LLM / JacobiForcing, SJD):

- **Trajectories come from this KV-cached, batched decoder.** CLLM's ``generate_trajectory.py``
  collects one prompt at a time and recomputes prompt and block without a cache every
  iteration. Iterating only the unconverged tail over a cache gives the same states: a converged
  prefix never changes again, and the tail's predictions depend only on prefix and tail.
- **A block's first token is the previous forward's prediction** (as CLLM inference and Jacobi
  Forcing do), not a random prompt token (CLLM's collector); only the other n-1 are initial
  guesses.
- **A block's last forward also serves the next block.** The reference iterates a block until an
  iteration leaves it unchanged, then starts the next block from scratch. Our forward that
  verifies a block's last guesses also predicts the next block's first token, and a block whose
  last token was corrected starts the next block in the same forward. A trajectory holds each
  distinct state once, from the initial guess to the fixed point (no repeat of the fixed point).
- **Multi-block decoding needs no promotion.** Jacobi Forcing commits only the "real-active"
  block to the cache and re-verifies a pseudo block under the committed prefix when it is
  promoted; we verify all blocks in flight as one state, so a later block's matched tokens are
  accepted in the same forward in which the block before it converges. Our default
  ``spawn_ratio`` (0.85), ``n_blocks`` (2) and ``pool_size`` (4) are the reference's.
- **Recycling seeds guesses, it does not race candidates.** The reference stacks pool candidates
  on the batch dimension (KV repeated) and keeps the one with the longest accepted prefix; we use
  the pool only to initialise a spawned block's guesses, which costs no extra compute.
- **SJD's first guesses are point masses.** SJD draws its initial guesses at random and
  verifies them like drawn ones; ours (from ``init``) are chosen without the model, so we verify
  them against q = a point mass on the guess: accepted with probability p(x), else the final
  token is drawn from p without x (the Lookahead / Jacobi Forcing non-greedy rule). Exact either
  way.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from leaplm.inference.cost import WidthChooser, candidate_widths, width_chooser
from leaplm.inference.engine import (
    DecoderError,
    DecodeResult,
    Engine,
    PromptBatch,
    TokenPicker,
    check_sampling,
    new_cache,
    register_decoder,
    shift_cache_rows,
)
from leaplm.inference.kernels.verify import verify_block

INITS = ("prompt", "pad", "repeat", "lookup")
LOOKUP_NGRAM = 3  # longest context suffix that "lookup" matches
# `block_size` names the block-diffusion block everywhere else, so the Jacobi block has its own name.
RENAMED = {"block_size": "jacobi_block_size"}


# ----- Settings -----------------------------------------------------------------------------


def _positive_int(name: str, value: Any, meaning: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DecoderError(f"{name} must be a positive integer ({meaning}), got {value!r}")


def check_settings(jacobi_block_size: int, init: str, n_blocks: int = 1, spawn_ratio: float = 1.0,
                   pool_size: int = 1, recycle: bool = False, adaptive: bool | None = None) -> None:
    """Refuse settings the Jacobi decoders cannot use, naming the fix."""
    _positive_int("jacobi_block_size", jacobi_block_size, "tokens guessed per Jacobi block; the reference uses 16")
    _positive_int("n_blocks", n_blocks, "blocks guessed at once; the reference uses 2")
    _positive_int("pool_size", pool_size, "rejected tails kept per row for recycling; the reference keeps 4")
    if init not in INITS:
        raise DecoderError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if isinstance(spawn_ratio, bool) or not isinstance(spawn_ratio, (int, float)) or not 0 < spawn_ratio <= 1:
        raise DecoderError(
            f"spawn_ratio must be in (0, 1] (the fraction of the newest block that must settle before the next "
            f"block is spawned; the reference uses 0.85), got {spawn_ratio!r}"
        )
    if not isinstance(recycle, bool):
        raise DecoderError(f"recycle must be true or false (keep an n-gram pool of rejected tails), got {recycle!r}")
    if adaptive is not None and not isinstance(adaptive, bool):
        raise DecoderError(f"adaptive must be true or false (size each forward by its measured cost; unset: on "
                           f"when greedy), got {adaptive!r}")


def choosers_for(engine: Engine, batch: PromptBatch, max_new_tokens: int, adaptive: bool, key: tuple,
                 max_width: int, init: str) -> tuple[WidthChooser | None, WidthChooser | None]:
    """The engine's width choosers for these settings: one for steps that feed the guesses as they
    are, and (``init="lookup"``) one for steps whose guesses prompt lookup has just replaced; None
    when the widths are fixed."""
    if not adaptive:
        return None, None
    context = batch.width + max_new_tokens // 2
    widths = candidate_widths(max_width)
    plain = width_chooser(engine, key + ("plain",), widths, batch.size, context)
    looked_up = width_chooser(engine, key + ("lookup",), widths, batch.size, context) if init == "lookup" else None
    return plain, looked_up


# ----- Guesses ------------------------------------------------------------------------------


class NgramPool:
    """One row's most recently rejected guess tails, searched for what followed a token."""

    def __init__(self, capacity: int):
        self.tails: deque[list[int]] = deque(maxlen=capacity)

    def add(self, tail: list[int]) -> None:
        """Keep ``tail`` (the oldest tail goes when the pool is full); one token predicts nothing."""
        if len(tail) > 1:
            self.tails.append(tail)

    def continuation(self, key: int, length: int) -> list[int]:
        """At most ``length`` tokens that followed the first ``key`` of the newest tail holding it."""
        for tail in reversed(self.tails):
            for i, token in enumerate(tail[:-1]):
                if token == key:
                    return tail[i + 1:i + 1 + length]
        return []


def lookup_continuation(context: list[int], count: int, max_ngram: int = LOOKUP_NGRAM) -> list[int]:
    """At most ``count`` tokens that followed an earlier occurrence of the longest suffix of
    ``context`` found (``max_ngram`` tokens down to 1): prompt lookup, as prompt-lookup decoding.
    Of the occurrences, the latest followed by ``count`` tokens, else the one followed by most."""
    for k in range(min(max_ngram, len(context) - 1), 0, -1):
        suffix, best = context[-k:], []
        for start in range(len(context) - k - 1, -1, -1):  # latest first; the suffix itself excluded
            if context[start:start + k] == suffix:
                following = context[start + k:start + k + count]
                if len(following) == count:
                    return following
                best = max(best, following, key=len)
        if best:
            return best
    return []


def initial_guesses(init: str, batch: PromptBatch, first: torch.Tensor, count: int, pad_token_id: int,
                    generator: torch.Generator) -> torch.Tensor:
    """``count`` guesses per row [b, count] for a new block whose first token is ``first`` [b]."""
    if init == "pad":
        return torch.full((batch.size, count), pad_token_id, dtype=torch.long, device=first.device)
    if init == "repeat":
        return first[:, None].expand(-1, count).clone()
    # "prompt" (and where "lookup" found nothing): uniform over each row's real (unpadded) prompt tokens, at the right end.
    draws = torch.rand(batch.size, count, generator=generator, device=first.device)  # [b, count]
    columns = batch.width - batch.lengths[:, None] + (draws * batch.lengths[:, None]).long()  # [b, count]
    return batch.input_ids.gather(1, columns)


# ----- Verification rules ------------------------------------------------------------------
#
# A forward's logits column j of row b predicts new-token index ``index[b, j]``; ``guesses`` [b, w]
# holds the token at that index, which the rule checks against the prediction.


class GreedyRule:
    """Exact convergence: a guess is accepted when it equals the argmax before it."""

    def verify(self, logits: torch.Tensor, guesses: torch.Tensor, drawn: torch.Tensor,
               index: torch.Tensor) -> torch.Tensor:
        """The accepted prefix as a mask [b, w]: the fused kernel checks column j's guess against
        column j's argmax; the last column's guess lies past every row's guessed span."""
        verdict = verify_block(logits, guesses[:, :-1])
        self.predicted = verdict.predicted  # [b, w]
        return torch.arange(guesses.shape[1], device=guesses.device)[None] < verdict.accepted[:, None]

    def update(self, frontier: torch.Tensor, guesses: torch.Tensor, ends: torch.Tensor,
               index: torch.Tensor) -> torch.Tensor:
        return self.predicted


class SpeculativeRule:
    """Speculative Jacobi Decoding: accept with min(1, p/q), resample from norm(max(0, p - q)).

    Keeps the previous forward's distributions, from which the guesses it redrew were drawn.
    """

    def __init__(self, pick: TokenPicker):
        self.pick = pick
        self.previous: torch.Tensor | None = None  # [b, w', v] distributions of the last forward
        self.previous_first: torch.Tensor | None = None  # [b] new-token index its column 0 predicts

    def verify(self, logits: torch.Tensor, guesses: torch.Tensor, drawn: torch.Tensor,
               index: torch.Tensor) -> torch.Tensor:
        """Which guesses [b, w] pass the acceptance test. ``drawn`` [b, w] marks guesses drawn from
        the previous forward's distribution; the others (initial guesses) are point masses."""
        b, w, v = logits.shape
        self.probs = self.pick.filtered_logits(logits.reshape(b * w, v)).softmax(-1).view(b, w, v)  # p [b, w, v]
        proposal = F.one_hot(guesses, v).to(self.probs.dtype)  # [b, w, v]
        if self.previous is not None:
            # A drawn guess always lies in the previous forward's columns; the clamp only keeps the
            # other columns' gather in range.
            columns = (index - self.previous_first[:, None]).clamp(0, self.previous.shape[1] - 1)  # [b, w]
            carried = self.previous.gather(1, columns[..., None].expand(-1, -1, v))  # [b, w, v]
            proposal = torch.where(drawn[..., None], carried, proposal)
        self.proposal = proposal  # q [b, w, v]
        p = self.probs.gather(-1, guesses[..., None]).squeeze(-1)  # [b, w]
        q = proposal.gather(-1, guesses[..., None]).squeeze(-1)  # [b, w] > 0: the guess was drawn from q
        uniform = torch.rand(b, w, generator=self.pick.generator, device=logits.device)
        return uniform * q < p  # u < min(1, p/q)

    def update(self, frontier: torch.Tensor, guesses: torch.Tensor, ends: torch.Tensor,
               index: torch.Tensor) -> torch.Tensor:
        """The new tokens [b, w]: accepted guesses kept, the frontier token final, the rest redrawn."""
        b, w, v = self.probs.shape
        rows = torch.arange(b, device=guesses.device)
        redrawn = torch.multinomial(self.probs.view(b * w, v), 1, generator=self.pick.generator).view(b, w)
        at = (frontier - index[:, 0]).clamp(0, w - 1)  # [b] the frontier's column (clamped for finished rows)
        residual = (self.probs[rows, at] - self.proposal[rows, at]).clamp(min=0)  # [b, v]
        # A rejection implies p != q, so the residual has mass; the fallback guards float round-off.
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, self.probs[rows, at])
        resampled = torch.multinomial(residual, 1, generator=self.pick.generator).squeeze(1)  # [b]
        rejected = frontier < ends  # else every guess was accepted: the frontier token is drawn from p
        redrawn[rows, at] = torch.where(rejected, resampled, redrawn[rows, at])
        self.previous, self.previous_first = self.probs, index[:, 0]
        return torch.where(index < frontier[:, None], guesses, redrawn)


# ----- The decoding loop -------------------------------------------------------------------


@dataclass
class JacobiState:
    """What an observer sees after every forward (and after the first block is spawned).

    Columns are new-token indices. Tensors are the decoder's own: copy what you keep.
    """

    tokens: torch.Tensor  # [b, width] final tokens below `final`, then the guesses up to `ends`
    final: torch.Tensor  # [b] how many leading new tokens are final
    ends: torch.Tensor  # [b] end of the guessed span (the newest block in flight ends here)
    updated: torch.Tensor  # [b] rows that were unfinished when this step began (their state changed)


Observer = Callable[[JacobiState], None]


def jacobi_decode(engine: Engine, batch: PromptBatch, max_new_tokens: int, *, jacobi_block_size: int, init: str,
                  seed: int, pick: TokenPicker, n_blocks: int = 1, spawn_ratio: float = 1.0,
                  pool_size: int = 0, observer: Observer | None = None,
                  chooser: WidthChooser | None = None, lookup_chooser: WidthChooser | None = None) -> DecodeResult:
    """The loop behind both decoders (see the module docstring); ``pool_size=0`` turns recycling off;
    ``chooser`` caps each forward's width and ``lookup_chooser`` (with ``init="lookup"``) sizes the
    steps on which prompt lookup replaced the guesses (see "Cost-aware widths")."""
    b, device, n = batch.size, engine.device, jacobi_block_size
    rule = GreedyRule() if pick.greedy else SpeculativeRule(pick)
    generator = pick.generator if pick.generator is not None else torch.Generator(device=device).manual_seed(seed)
    settle_run = math.ceil(spawn_ratio * n)  # settled tokens of the newest block that allow a spawn
    pools = [NgramPool(pool_size) for _ in range(b)] if pool_size else None
    # "lookup" searches each row's real prompt tokens, then its answer so far
    prompts = [row[batch.width - int(n):].tolist() for row, n in zip(batch.input_ids, batch.lengths)] \
        if init == "lookup" else None

    # Indices read or written reach max_new_tokens + n_blocks * n + 1 (a finished row's columns
    # in a forward as wide as the widest guessed span); the columns past the budget are never kept.
    width = max_new_tokens + n_blocks * n + 2
    tokens = torch.full((b, width), engine.pad_token_id, dtype=torch.long, device=device)  # [b, width]
    drawn = torch.zeros(b, width, dtype=torch.bool, device=device)  # [b, width] guess drawn from the model
    final = torch.ones(b, dtype=torch.long, device=device)  # [b] the prefill makes token 0 final
    ends = torch.zeros(b, dtype=torch.long, device=device)  # [b] no block yet
    lengths = torch.zeros(b, dtype=torch.long, device=device)  # [b]
    unfinished = torch.ones(b, dtype=torch.bool, device=device)  # [b]
    row_forwards = torch.ones(b, dtype=torch.long, device=device)  # [b] the prefill
    cached = batch.lengths.clone()  # [b] real tokens in the cache, right-aligned against its end
    columns = torch.arange(width, device=device)  # [width]

    def settle(before: torch.Tensor) -> None:
        """End rows whose newly final tokens (from ``before`` on) hold a stop token or reach the budget."""
        fresh = (columns[None] >= before[:, None]) & (columns[None] < final[:, None].clamp(max=max_new_tokens))
        stops = engine.is_stop(tokens) & fresh  # [b, width]
        stopped = stops.any(-1)  # [b]
        done = unfinished & (stopped | (final >= max_new_tokens))  # [b]
        end = torch.where(stopped, stops.long().argmax(-1) + 1, final.clamp(max=max_new_tokens))  # [b]
        lengths[done] = end[done]
        unfinished[done] = False

    def spawn(settled: torch.Tensor) -> None:
        """Start a block after the guessed span of each unfinished row with room for it: when the
        row has no guess left, or when fewer than ``n_blocks`` blocks are in flight and its newest
        block has ``settle_run`` tokens settled."""
        in_flight = torch.where(final >= ends, 0, (ends - 1) // n - final // n + 1)  # [b] blocks still guessed
        grow = (unfinished & (ends < max_new_tokens) & (in_flight < n_blocks)
                & ((in_flight == 0) | (settled >= settle_run)))  # [b]
        if not grow.any():
            return
        first = tokens.gather(1, ends[:, None]).squeeze(1)  # [b] the new block's first token
        guesses = initial_guesses(init, batch, first, n - 1, engine.pad_token_id, generator)  # [b, n - 1]
        for row in grow.nonzero().squeeze(1).tolist():
            seeded = pools[row].continuation(int(first[row]), n - 1) if pools is not None else []
            if not seeded and prompts is not None:
                seeded = lookup_continuation(prompts[row] + tokens[row, : int(ends[row]) + 1].tolist(), n - 1)
            guesses[row, : len(seeded)] = torch.tensor(seeded, dtype=torch.long, device=device)
        slots = ends[:, None] + 1 + torch.arange(n - 1, device=device)  # [b, n - 1]
        tokens.scatter_(1, slots, torch.where(grow[:, None], guesses, tokens.gather(1, slots)))
        drawn.scatter_(1, slots, drawn.gather(1, slots) & ~grow[:, None])
        ends.copy_(torch.where(grow, (ends + n).clamp(max=max_new_tokens), ends))

    def refresh_from_lookup() -> bool:
        """Replace each unfinished row's guesses by what prompt lookup finds after its final tokens
        (within the guessed span); whether any row found something."""
        found = False
        for row in unfinished.nonzero().squeeze(1).tolist():
            start, stop = int(final[row]), int(ends[row])
            if stop <= start:
                continue
            seeded = lookup_continuation(prompts[row] + tokens[row, :start].tolist(), stop - start)
            if seeded:
                tokens[row, start:start + len(seeded)] = torch.tensor(seeded, dtype=torch.long, device=device)
                drawn[row, start:start + len(seeded)] = False  # chosen without the model: point masses
                found = True
        return found

    cache = new_cache()
    out = engine.forward(batch.input_ids, cache, batch.position_ids,
                         batch.attention_mask if batch.has_padding else None, logits_to_keep=1)
    forwards = 1
    tokens[:, 0] = pick(out.logits[:, -1])
    settle(torch.zeros_like(final))
    updated = unfinished.clone()
    spawn(torch.zeros_like(final))
    if observer is not None:
        observer(JacobiState(tokens, final, ends, updated))

    while unfinished.any():
        # Each row feeds its newest final token (not cached yet) and its guesses; column j of the
        # logits then predicts new-token index final + j.
        context = cache.get_seq_length()
        w = int((ends - final + 1)[unfinished].max())
        step_chooser = chooser
        if lookup_chooser is not None and refresh_from_lookup():
            step_chooser = lookup_chooser
        if step_chooser is not None:
            arm = step_chooser.choose()
            w = min(w, arm)
        offsets = torch.arange(w, device=device)  # [w]
        index = final[:, None] + offsets  # [b, w] the index each column predicts
        fed = tokens.gather(1, index - 1)  # [b, w]
        mask = None
        if bool((cached[unfinished] < context).any()):  # some row has padding on the left
            real = torch.arange(context, device=device)[None] >= context - cached[:, None]  # [b, context]
            mask = torch.cat([real, torch.ones(b, w, dtype=torch.bool, device=device)], dim=1).long()  # [b, kv]
        logits = engine.forward(fed, cache, batch.lengths[:, None] + index - 1, mask).logits  # [b, w, v]
        forwards += 1
        row_forwards += unfinished
        updated = unfinished.clone()

        guesses = tokens.gather(1, index)  # [b, w]
        in_state = index < ends[:, None]  # [b, w]
        accepted = rule.verify(logits, guesses, drawn.gather(1, index), index) & in_state
        frontier = final + accepted.long().cumprod(-1).sum(-1)  # [b] first index not accepted: its prediction is final
        new_tokens = rule.update(frontier, guesses, ends, index)  # [b, w]

        if pools is not None:
            for row in (unfinished & (frontier < ends - 1)).nonzero().squeeze(1).tolist():
                pools[row].add(tokens[row, int(frontier[row]):int(ends[row])].tolist())
        # The newest block's settled run, for the spawn rule: final, or a guess this forward left unchanged.
        newest = (ends - 1).clamp(min=0) // n * n  # [b] where the newest block in flight starts
        steady = ((index <= frontier[:, None]) | (guesses == new_tokens) | (index < newest[:, None])) & in_state
        settled = final + steady.long().cumprod(-1).sum(-1) - newest  # [b]

        # The Jacobi update of the guessed span, and the token at its end (the next block's first).
        write = unfinished[:, None] & (index <= ends[:, None])  # [b, w]
        tokens.scatter_(1, index, torch.where(write, new_tokens, guesses))
        drawn.scatter_(1, index, index > frontier[:, None])
        if chooser is not None:
            # Guesses past the fed columns were drawn from an older forward, whose distribution is
            # gone: verify them as point masses, which is exact for any guess (module docstring).
            drawn &= columns[None] <= index[:, -1:]
            step_chooser.observe(arm, float((frontier + 1 - final)[unfinished].float().mean()))
        # Keep the K/V of the fed tokens that were final (the newest final one and the accepted
        # guesses), then right-align the rows again.
        kept = torch.where(unfinished, frontier + 1 - final, 0)  # [b]
        before = final.clone()
        final.copy_(torch.where(unfinished, frontier + 1, final))
        settle(before)
        if unfinished.any():
            cached += kept
            length = int(cached[unfinished].max())
            shift_cache_rows(cache, length - context - kept, length)
        spawn(settled)
        if observer is not None:
            observer(JacobiState(tokens, final, ends, updated))

    return DecodeResult(tokens[:, :max_new_tokens], lengths, forwards, row_forwards)


# ----- Registered decoders -----------------------------------------------------------------


@register_decoder("jacobi", checks=(check_settings, check_sampling), renamed=RENAMED)
def jacobi(
    engine: Engine, batch: PromptBatch, max_new_tokens: int, *,
    jacobi_block_size: int = 16, init: str = "prompt", seed: int = 0, adaptive: bool | None = None,
    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, observer: Observer | None = None,
) -> DecodeResult:
    """Jacobi decoding, one block of ``jacobi_block_size`` guesses at a time (see the module docstring).

    Greedy (temperature 0) equals ``ar`` and ``model.generate`` token for token; with
    ``temperature > 0`` it samples by the Speculative Jacobi Decoding rule, distributed like
    ``ar`` with the same settings. ``seed`` seeds the ``"prompt"`` initial guesses and sampling.
    ``observer`` (for :func:`collect_jacobi_trajectories`) sees the state after every forward.
    ``adaptive`` sizes each forward by its measured cost (module docstring); false feeds every
    guess. Unset, it is on when greedy and off when sampling, where the widths, which depend on
    timings, would change which draws a seed makes (the distribution stays exact either way).
    """
    check_settings(jacobi_block_size, init, adaptive=adaptive)
    pick = TokenPicker(engine.device, temperature, top_k, top_p, seed)
    chooser, lookup_chooser = choosers_for(engine, batch, max_new_tokens, pick.greedy if adaptive is None else adaptive,
                                           ("jacobi", jacobi_block_size, init, temperature, top_k, top_p),
                                           jacobi_block_size + 1, init)
    return jacobi_decode(engine, batch, max_new_tokens, jacobi_block_size=jacobi_block_size, init=init, seed=seed,
                         pick=pick, observer=observer, chooser=chooser, lookup_chooser=lookup_chooser)


@register_decoder("jacobi_multiblock", checks=(check_settings,), renamed=RENAMED)
def jacobi_multiblock(
    engine: Engine, batch: PromptBatch, max_new_tokens: int, *,
    jacobi_block_size: int = 16, n_blocks: int = 2, spawn_ratio: float = 0.85, recycle: bool = True,
    pool_size: int = 4, init: str = "prompt", seed: int = 0, adaptive: bool | None = None,
) -> DecodeResult:
    """Greedy Jacobi decoding with up to ``n_blocks`` blocks in flight and rejection recycling.

    Equals ``ar`` and ``model.generate`` token for token. ``n_blocks=1, recycle=False`` is greedy
    ``jacobi``; ``adaptive`` as ``jacobi``'s.
    """
    check_settings(jacobi_block_size, init, n_blocks, spawn_ratio, pool_size, recycle, adaptive)
    pick = TokenPicker(engine.device)
    chooser, lookup_chooser = choosers_for(
        engine, batch, max_new_tokens, adaptive is not False,
        ("jacobi_multiblock", jacobi_block_size, init, n_blocks, spawn_ratio, recycle, pool_size),
        n_blocks * jacobi_block_size + 1, init)
    return jacobi_decode(engine, batch, max_new_tokens, jacobi_block_size=jacobi_block_size, init=init, seed=seed,
                         pick=pick, n_blocks=n_blocks, spawn_ratio=spawn_ratio, pool_size=pool_size if recycle else 0,
                         chooser=chooser, lookup_chooser=lookup_chooser)


# ----- Trajectory collection ---------------------------------------------------------------


class TrajectoryRecorder:
    """An observer that keeps, per row and block, every distinct state of the block while it was guessed."""

    def __init__(self, jacobi_block_size: int):
        self.jacobi_block_size = jacobi_block_size
        self.states: list[dict[int, list[list[int]]]] = []  # per row: block index -> its states
        self.open_from: list[int] = []  # per row: the first block not yet at its fixed point

    def __call__(self, state: JacobiState) -> None:
        if not self.states:
            self.states = [{} for _ in range(state.tokens.shape[0])]
            self.open_from = [0] * state.tokens.shape[0]
        n = self.jacobi_block_size
        tokens = state.tokens.tolist()
        for row, (live, final, end) in enumerate(zip(state.updated.tolist(), state.final.tolist(),
                                                     state.ends.tolist())):
            if not live:
                continue
            for block in range(self.open_from[row], -(-end // n)):
                block_end = min((block + 1) * n, end)
                states = self.states[row].setdefault(block, [])
                current = tokens[row][block * n:block_end]
                # An unchanged state is the fixed point already (the Jacobi map has only one), and
                # the forward that verified it adds nothing: the reference stores no repeat either.
                if not states or states[-1] != current:
                    states.append(current)
                if final >= block_end:
                    self.open_from[row] = block + 1

    def rows(self, prompts: list[list[int]], sequences: list[list[int]], indices: list[int]) -> list[dict[str, Any]]:
        """One dataset row per block of each answer, ``prompt_index`` from ``indices``; a row's last
        block is cut where its answer ends.

        A stop token that the forward finishing the block before it predicted is final at once:
        its block was never guessed, and its row holds the fixed point as its only state.
        """
        n = self.jacobi_block_size
        out = []
        for row, (prompt, answer) in enumerate(zip(prompts, sequences)):
            for block in range(-(-len(answer) // n)):
                begin = block * n
                fixed_point = answer[begin:begin + n]
                states = self.states[row].get(block, [fixed_point])
                out.append(dict(
                    prompt_index=indices[row],
                    prompt_ids=list(prompt),
                    prefix_ids=answer[:begin],  # the answer before this block: the block's context after the prompt
                    block_index=block,
                    states=[s[:len(fixed_point)] for s in states],
                    fixed_point=fixed_point,
                ))
        return out


def collect_jacobi_trajectories(
    engine: Engine, prompts: list[list[int]], jacobi_block_size: int = 16, max_new_tokens: int = 256, *,
    init: str = "prompt", seed: int = 0, batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Greedy Jacobi trajectories of ``engine.model`` on ``prompts`` (token ids, chat formatted).

    Decodes ``batch_size`` prompts at a time with the ``jacobi`` decoder (KV cache, batched;
    prompts of similar length together, since a batch runs until its longest answer ends and
    prompt length predicts answer length) and records each block's states, from its initial guess
    to its fixed point. Returns rows, in prompt order, for
    ``datasets.Dataset.from_list``: ``prompt_index``, ``prompt_ids``, ``prefix_ids`` (the answer
    before the block), ``block_index``, ``states`` (each a list of token ids; the last equals the
    fixed point) and ``fixed_point``. The fixed points of a prompt's blocks, in order, are its
    greedy answer through its stop token, so the last block of an answer is shorter than
    ``jacobi_block_size`` when the answer ends inside it; a block holding only the stop token that the
    block before it predicted (or an answer that is a lone stop token) has that as its only state.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    rows: list[dict[str, Any]] = []
    for first in range(0, len(prompts), batch_size):
        indices = order[first:first + batch_size]
        chunk = [prompts[i] for i in indices]
        recorder = TrajectoryRecorder(jacobi_block_size)
        # Fixed widths: a trajectory is the full Jacobi iteration of every block (what the recipes train on).
        out = engine.generate(chunk, "jacobi", max_new_tokens, jacobi_block_size=jacobi_block_size, init=init,
                              seed=seed, adaptive=False, observer=recorder)
        rows += recorder.rows(chunk, out.sequences, indices)
    return sorted(rows, key=lambda row: (row["prompt_index"], row["block_index"]))
