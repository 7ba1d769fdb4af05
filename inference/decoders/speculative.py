"""``speculative``: draft-model speculative decoding, fixed length or adaptive (SpecDec++).

**One round.** A smaller draft model with the same tokenizer proposes tokens one at a time
(each drawn from its distribution q, or its argmax when greedy); the target verifies them all in
one forward (the last committed token plus the drafts). Draft i is accepted with probability
min(1, p(x)/q(x)) under the target's distribution p (greedy: when it is the target's argmax); at
the first rejection the next token is drawn from norm(max(0, p - q)) (greedy: the target's
argmax), and when every draft is accepted the target's prediction after the last one is a free
bonus. The output is distributed exactly as sampling from the target with the same
``temperature``/``top_k``/``top_p`` (the standard rule, Leviathan et al. / Chen et al.); greedy
output equals ``ar`` and ``model.generate`` token for token.

**Draft length.** Fixed (``draft_tokens``), or adaptive with an acceptance head on the draft
(``stop_threshold``; ``models/heads.py``, trained by ``train/acceptance_head.py``). Each
draft forward feeds the token drafted by the one before; the head reads the draft's last hidden
state there and predicts the chance that token is accepted. Drafting stops once
1 - prod(p_accept) exceeds the threshold, within ``[min_draft, max_draft]`` (SpecDec++; the first
forward feeds a committed token, so it is not counted, as in the reference).

**Cost-aware draft length** (``adaptive``, on by default when greedy). A round that drafts d
tokens costs d draft forwards plus a (d + 1)-token target forward, and pays only if it commits
more tokens than that time would give plain decoding. Each round's length (the cap, with an
acceptance head) is chosen by a :class:`~leaplm.inference.cost.WidthChooser` from both models'
forward times, measured once per engine (``inference/cost.py``), and the tokens rounds of each
length committed so far; d = 0 is a plain 1-token target step, taken when no length pays (a
draft that is rarely right, or a target whose wide forwards cost nearly k 1-token ones). The
length never changes what is committed: greedy output stays ``generate``'s, sampled output keeps
its distribution.

**Caches.** The target's cache holds every committed token but the newest; the draft's every
committed token but the two newest after a drafting round (one more for every round since
that did not draft), so each round's first draft forward feeds the same number of tokens per
unfinished row and every row stays aligned. Rows advance independently; their cached tokens are
kept right-aligned by :func:`~leaplm.inference.decoders.tree.keep_new_slots`.

``forward_passes`` and tokens/forward count target forwards (tokens per target forward = the
mean accepted length plus one); the draft's forwards are in the wall-clock time only.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch

from leaplm.inference.cost import candidate_widths, width_chooser
from leaplm.inference.decoders import tree as tree_decoding
from leaplm.inference.engine import (
    DecoderError,
    DecodeResult,
    Engine,
    PromptBatch,
    TokenPicker,
    check_sampling,
    crop_cache,
    new_cache,
    register_decoder,
)
from leaplm.models.cache import cache_argument
from leaplm.models.heads import heads_of


@lru_cache(maxsize=2)
def _load_draft(path: str, device: str, dtype: torch.dtype):
    from leaplm.models.zoo import load_model

    model, _ = load_model(path, device=device)
    return model.to(dtype).eval()


def check_settings(draft=None, draft_tokens: int = 4, stop_threshold: float | None = None, min_draft: int = 2,
                   max_draft: int = 20, adaptive: bool | None = None) -> None:
    """Refuse settings the decoder cannot use whatever the models, naming the fix."""
    if draft is None:
        raise DecoderError("speculative needs a draft model: set draft to a model directory (a smaller model "
                           "with the same tokenizer, e.g. one made by configs/pretrain/tiny_draft.yaml)")
    if stop_threshold is not None:
        if not 0 < stop_threshold < 1 or not 1 <= min_draft <= max_draft:
            raise DecoderError(f"need 0 < stop_threshold < 1 and 1 <= min_draft <= max_draft, got {stop_threshold}, "
                               f"[{min_draft}, {max_draft}]")
    elif not isinstance(draft_tokens, int) or isinstance(draft_tokens, bool) or draft_tokens < 1:
        raise DecoderError(f"draft_tokens must be a positive integer, got {draft_tokens!r}")
    if adaptive is not None and not isinstance(adaptive, bool):
        raise DecoderError(f"adaptive must be true or false (size each round's draft by its measured cost; unset: "
                           f"on when greedy), got {adaptive!r}")


def draft_model_for(engine: Engine, draft):
    """The draft model (checked by :func:`check_settings` first): a loaded model, or a directory /
    zoo name loaded once and kept."""
    model = draft if not isinstance(draft, str) else _load_draft(draft, str(engine.device), engine.model.dtype)
    if model.config.vocab_size != engine.model.config.vocab_size:
        raise DecoderError(f"the draft's vocabulary ({model.config.vocab_size}) differs from the target's "
                           f"({engine.model.config.vocab_size}); use a draft with the same tokenizer")
    return model


def _mask(cached: torch.Tensor, context: int, s: int) -> torch.Tensor | None:
    """Padding mask [b, context + s] over right-aligned cached tokens and s new ones; None without padding."""
    if bool((cached == context).all()):
        return None
    return torch.cat([tree_decoding.real_slots(cached, context), torch.ones(cached.shape[0], s, dtype=torch.bool,
                                                               device=cached.device)], 1).long()


@register_decoder("speculative", checks=(check_settings, check_sampling))
def speculative(engine: Engine, batch: PromptBatch, max_new_tokens: int, *, draft=None, draft_tokens: int = 4,
                stop_threshold: float | None = None, min_draft: int = 2, max_draft: int = 20,
                temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                adaptive: bool | None = None, observer: Callable[[int, int], None] | None = None) -> DecodeResult:
    """Speculative decoding with ``draft`` (see the module docstring).

    ``draft_tokens`` drafts per round; with ``stop_threshold`` set, the draft's acceptance head
    chooses the length per round within ``[min_draft, max_draft]`` instead. ``adaptive`` sizes
    each round (or caps the head's length) by its measured cost (module docstring); false
    drafts as set in every round. ``observer`` is
    called after every round with the tokens drafted and accepted in it (summed over the rows
    that were unfinished), e.g. by :func:`draft_efficiency`.
    """
    check_settings(draft, draft_tokens, stop_threshold, min_draft, max_draft, adaptive)
    drafter = draft_model_for(engine, draft)
    headed = stop_threshold is not None
    if headed:
        acceptance = heads_of(drafter, ("acceptance",))
    limit = max_draft if headed else draft_tokens
    pick = TokenPicker(engine.device, temperature, top_k, top_p, seed)
    chooser = None
    if pick.greedy if adaptive is None else adaptive:
        widths = range(1, limit + 2) if limit <= 8 else candidate_widths(limit + 1)  # verified width = drafts + 1
        key = ("speculative", draft if isinstance(draft, str) else id(drafter), limit, stop_threshold, min_draft)
        chooser = width_chooser(engine, key, widths, batch.size, batch.width + max_new_tokens // 2, draft=drafter)
    device, b = engine.device, batch.size
    rows = torch.arange(b, device=device)
    answers = tree_decoding.Answers(engine, batch, max_new_tokens, spare=limit + 2)
    cache, draft_cache = new_cache(), new_cache()
    padding = batch.attention_mask if batch.has_padding else None
    out = engine.forward(batch.input_ids, cache, batch.position_ids, padding, logits_to_keep=1)
    answers.commit(pick(out.logits[:, -1])[:, None], torch.ones(b, dtype=torch.long, device=device))
    drafter(input_ids=batch.input_ids, **{cache_argument(drafter): draft_cache}, position_ids=batch.position_ids,
            attention_mask=padding, use_cache=True, logits_to_keep=1)
    crop_cache(draft_cache, batch.width - 1)  # the draft keeps all but the two newest committed tokens
    cached, draft_cached = batch.lengths.clone(), batch.lengths - 1  # [b] real tokens in each cache
    lag = 2  # committed tokens not yet in the draft's cache, alike for every unfinished row

    def distribution(logits: torch.Tensor) -> torch.Tensor:
        """Probabilities [..., V] the tokens are drawn from (one-hot on the argmax when greedy)."""
        flat = logits.flatten(0, -2)
        probs = (torch.nn.functional.one_hot(flat.argmax(-1), flat.shape[-1]).float() if pick.greedy
                 else pick.filtered_logits(flat).softmax(-1))
        return probs.view(*logits.shape[:-1], -1)

    while answers.unfinished.any():
        count = answers.count
        root_pos = batch.lengths + count - 1  # [b] position of the newest committed token
        width = chooser.choose() if chooser is not None else limit + 1
        if width == 1:  # no draft pays: a plain target step
            context = cache.get_seq_length()
            newest = answers.tokens.gather(1, (count - 1)[:, None])  # [b, 1]
            logits = engine.forward(newest, cache, root_pos[:, None], _mask(cached, context, 1)).logits  # [b, 1, V]
            answers.stepped()
            live = answers.unfinished.clone()
            answers.commit(pick(logits[:, -1])[:, None], torch.ones(b, dtype=torch.long, device=device))
            counts = live.long()
            tree_decoding.keep_new_slots([cache], context, torch.zeros(b, 1, dtype=torch.long, device=device), counts)
            cached += counts
            lag += 1
            chooser.observe(1, 1.0)
            continue
        round_limit = width - 1

        # Draft: the committed tokens the draft has not seen (the prompt's last token leads the answer), then
        # one drafted token per forward.
        committed = torch.cat([batch.input_ids[:, -1:], answers.tokens], 1)  # [b, 1 + answer slots]
        back = torch.arange(lag - 1, -1, -1, device=device)  # [lag]
        fed = committed.gather(1, (count[:, None] - back[None]).clamp(min=0))  # [b, lag]
        positions = root_pos[:, None] - back[None]  # [b, lag]
        draft_context = draft_cache.get_seq_length()
        drafts = torch.zeros(b, round_limit, dtype=torch.long, device=device)
        q = []
        n_drafted = torch.full((b,), round_limit, dtype=torch.long, device=device)  # [b] drafts proposed per row
        active = answers.unfinished.clone()
        confidence = torch.ones(b, device=device)  # prod of predicted acceptance chances
        for i in range(round_limit):
            step = drafter(input_ids=fed, **{cache_argument(drafter): draft_cache}, position_ids=positions,
                           attention_mask=_mask(draft_cached, draft_context, draft_cache.get_seq_length()
                                                - draft_context + fed.shape[1]),
                           use_cache=True, logits_to_keep=1, output_hidden_states=headed)
            q.append(distribution(step.logits[:, -1]))  # [b, V]
            drafts[:, i] = torch.where(active, pick(step.logits[:, -1]), engine.pad_token_id)
            if headed:
                p_accept = acceptance.accept_logits(step.hidden_states[-1][:, -1]).float().softmax(-1)[:, 1]  # [b]
                if i > 0:
                    confidence *= p_accept
                stop = active & (((1 - confidence > stop_threshold) & (i + 1 >= min_draft)) | (i + 1 >= round_limit))
                n_drafted = torch.where(stop, i + 1, n_drafted)
                active &= ~stop
                if not active.any():
                    break
            if i + 1 < round_limit:
                fed, positions = drafts[:, i:i + 1], positions[:, -1:] + 1
        n_drafts = len(q)
        q = torch.stack(q, 1)  # [b, n, V]
        drafts = drafts[:, :n_drafts]

        # Verify: the newest committed token and the drafts in one target forward.
        context = cache.get_seq_length()
        fed = torch.cat([answers.tokens.gather(1, (count - 1)[:, None]), drafts], 1)  # [b, n + 1]
        positions = root_pos[:, None] + torch.arange(n_drafts + 1, device=device)[None]
        logits = engine.forward(fed, cache, positions, _mask(cached, context, n_drafts + 1)).logits  # [b, n + 1, V]
        answers.stepped()
        p = distribution(logits)  # [b, n + 1, V]
        p_draft = p[:, :-1].gather(-1, drafts[..., None]).squeeze(-1)  # [b, n]
        q_draft = q.gather(-1, drafts[..., None]).squeeze(-1)  # [b, n] > 0: the draft was drawn from q
        if pick.greedy:
            ok = p_draft > 0
        else:
            uniform = torch.rand(b, n_drafts, generator=pick.generator, device=device)
            ok = uniform * q_draft < p_draft  # u < min(1, p/q)
        ok &= torch.arange(n_drafts, device=device)[None] < n_drafted[:, None]
        accepted = ok.long().cumprod(-1).sum(-1)  # [b]
        at = accepted  # column of p the next token comes from
        residual = (p[rows, at] - torch.cat([q, torch.zeros_like(q[:, :1])], 1)[rows, at]).clamp(min=0)  # [b, V]
        rejected = accepted < n_drafted
        target = torch.where(rejected[:, None] & (residual.sum(-1, keepdim=True) > 0), residual, p[rows, at])
        nxt = (target.argmax(-1) if pick.greedy
               else torch.multinomial(target / target.sum(-1, keepdim=True), 1, generator=pick.generator).squeeze(1))

        new = torch.cat([drafts, nxt[:, None]], 1)
        new.scatter_(1, accepted[:, None], nxt[:, None])
        live = answers.unfinished.clone()
        if observer is not None:
            observer(int(n_drafted[live].sum()), int(accepted[live].sum()))
        if chooser is not None:
            chooser.observe(width, float((accepted[live] + 1).float().mean()))
        answers.commit(new, accepted + 1)
        # The target keeps accepted + 1 of the tokens it was fed; the draft keeps as many of the drafts, after the
        # committed tokens it was fed but the newest two: it lags two tokens again.
        counts = torch.where(live, accepted + 1, 0)
        draft_counts = torch.where(live, accepted + lag - 1, 0)
        order = torch.arange(n_drafts + lag, device=device)[None].expand(b, -1)
        tree_decoding.keep_new_slots([cache], context, order[:, :n_drafts + 1], counts)
        tree_decoding.keep_new_slots([draft_cache], draft_context, order, draft_counts)
        cached += counts
        draft_cached += draft_counts
        lag = 2
    return answers.result()


def draft_efficiency(engine: Engine, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 1,
                     **settings) -> dict[str, float]:
    """Decode ``prompts`` with ``speculative`` and ``settings``; report drafted and rejected draft
    tokens per generated token, tokens per target forward and tokens/s (SpecDec++'s comparison)."""
    counts = [0, 0]

    def observe(drafted: int, accepted: int) -> None:
        counts[0] += drafted
        counts[1] += accepted

    tokens, forwards, seconds = 0, 0, 0.0
    for first in range(0, len(prompts), batch_size):
        out = engine.generate(prompts[first:first + batch_size], "speculative", max_new_tokens, observer=observe,
                              **settings)
        tokens, forwards, seconds = (tokens + out.stats.new_tokens, forwards + out.stats.sequence_forwards,
                                     seconds + out.stats.wall_time_s)
    return {"drafted_per_token": counts[0] / tokens, "rejected_per_token": (counts[0] - counts[1]) / tokens,
            "tokens_per_forward": tokens / forwards, "tokens_per_s": tokens / seconds}

