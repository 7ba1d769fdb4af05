"""The ``block_diffusion`` decoder: write the answer a block at a time, filling masked slots in parallel.

It decodes models made by :func:`leaplm.models.block_diffusion.convert`, under the conventions
stated there (blocks aligned to the response, first slot of a block from the clean logit, token
shift, ``clean_attention``). Each block of ``block_size`` slots goes through:

1. **Slot 0** is the argmax of the last clean logit (the prompt's, or the previous block's commit
   pass): exactly the token the AR model would write next. The other slots start as the mask
   token.
2. **Denoising steps.** The block is fed over the KV cache of everything before it,
   bidirectional inside the block; its noisy K/V is dropped again. With the token shift, slot j
   is predicted by the logit at slot j-1. Slots are committed only inside the *active
   sub-block*: the first run of ``sub_block_size`` slots that still has an uncommitted slot in
   some unfinished row. Each row picks among its uncommitted slots there by ``rule``, where a
   slot's confidence is the probability of its argmax token:

   - ``threshold``: every slot with confidence > ``threshold``, plus the most confident one
     (``threshold=1`` is one token per step);
   - ``entropy``: every slot whose predictive entropy is <= ``entropy_bound``, plus the
     lowest-entropy one (LLaDA, NBDiff);
   - ``factor`` (Fast-dLLM v1): with confidences sorted c_(1) >= c_(2) >= ..., the largest n
     such that c_(i) >= 1 - factor / (i + 1) for every i <= n, at least one;
   - ``top_k``: the ``top_k`` most confident (all of them when fewer remain);
   - ``filter`` (Learn2PD): every slot a learned unmask filter accepts (``unmask_filter``, the
     directory ``train/learn2pd.py`` exports; probability > ``accept``), plus the most confident
     one. The filter reads the whole block's confidences, committed slots as 1.

   Every rule commits at least one slot per step, and committed tokens never change.
   ``max_per_step`` > 0 caps any rule at that many slots (the best ranked): with ``threshold``
   (0.95) it is CD4LM's confidence-adaptive top-k, ``k = clamp(#{conf > 0.95}, 1, max_per_step)``.
   ``eos_fill`` (Learn2PD's end-of-text prediction): once a row commits a stop token, every later
   slot of the block counts as committed (fed as the mask token, the padding training puts after
   an answer), so no step is spent on slots after the end.
3. A row is **done with the block** when all its slots are committed, or when it has committed
   a stop token with every slot before it committed; the stop ends the row for good.
4. **Commit pass.** The finished block is fed once more with the clean attention (causal, or
   bidirectional inside the block for ``block_causal``). Its K/V stays in the cache, and its
   last logit gives the next block's slot 0.

   ``fuse_commit_pass`` (default) runs the next block's first denoising step in the same
   forward, speculatively: the next block is fed behind the clean one (seeing it and the cache,
   bidirectional inside itself) with slot 0 guessed from the finished block's last *noisy*
   logit, the one that predicts past the block's end in its last denoising step. A row whose
   guess equals the clean logit's argmax keeps that step's predictions (exactly what a separate
   step would compute, as it saw the true slot 0 over the same clean K/V); a row whose guess
   was wrong discards them and takes a normal step. The output is the same either way; a right
   guess saves one forward per block, which lifts the ceiling from ``block_size / 2`` tokens
   per forward to ``block_size``. Fast-dLLM v2 has no such pass (its decoder spends the forward).

5. **Verification** (``verify=True``, for ``causal`` clean attention). The commit pass's logits
   are the model's own AR predictions for every slot of the block (causal attention over the
   clean block), so they check it for free: at a row's first slot that differs from its AR
   token (up to its first stop), the AR token is written there, every later slot is masked
   again, and the block is denoised from there and committed again. A row is only finished by
   a verified block, so the output is exactly the model's greedy AR output (``generate``) and
   the commit rule only decides the speed: self-speculative decoding with the diffusion steps
   as the drafter. This is our addition; Fast-dLLM v2 and NBDiff keep whatever the steps commit.

6. **Blocks sized by cost** (``adaptive``, on with ``verify``). A denoising step feeds a whole
   block (the fused commit pass two), which costs several 1-token forwards where the forward is
   compute-bound (a CPU, large batches); an untrained or weak model then spends more time per
   token than AR. So before each block the engine's
   :class:`~leaplm.inference.cost.WidthChooser` picks between denoising it and writing it
   with plain 1-token AR forwards of the clean stream (which leave the same clean K/V as a
   commit pass), by the tokens per second each kind of block has been writing: each block is
   timed whole, so the denoising path's masks and commit rules count as well as its forwards
   (before either kind has run, the measured cost of the forward widths stands in). A block
   whose denoising falls behind AR's pace (before each step: the share of the block its slowest
   row has committed, against the share of an AR block's time spent) is finished with AR steps,
   so a block that will not pay costs a step or two more than an AR block. Verified
   output is the model's greedy AR output either way; unverified decoding is never switched,
   since its output depends on its steps.

Caches. The *block cache* holds only clean K/V: the prompt and the commit passes of finished
blocks, never a denoising step's. ``sub_block_cache=True`` adds Fast-dLLM's *DualCache*: the
first step of each sub-block is a full-block forward whose block K/V is kept; the next steps of
that sub-block feed only its slots, attending to the context and to the kept (stale) K/V of the
block's other slots, and to their own fresh K/V in place of the stale copy. RoPE is applied
before caching, so a key's position travels with it and the fresh K/V can sit at the end of the
cache, behind a mask that hides the stale copy; the engine is told where each fed slot belongs
(``offsets``), so sliding windows are measured from its position as well. Slot a, the
sub-block's first, is predicted by slot a-1's logit, which is not fed again: it is carried from
the full-block forward.

Where we differ from Fast-dLLM v2:

- **Slot 0 comes from the clean logit.** v2 decodes it so too but trains it from the previous
  block's noisy copy; our training supervises it the way it is decoded.
- **Blocks are aligned to the response.** v2 prefills the prompt in whole blocks counted from
  the start of the sequence; we prefill it causally in one pass and put response token r in
  block r // block_size, so the rows of a left-padded batch share block boundaries and one
  forward serves them all.
- **The active sub-block is shared by the batch**, again so that one forward serves every
  row; a row that has finished it waits (commits nothing) until the others have.
- **DualCache is refreshed at the start of every sub-block** by a full-block forward, so the
  kept K/V of the other slots is never staler than the current sub-block's steps. A step's
  fresh K/V is not written back over the kept slice (v2's ``replace_position``): the next steps
  of the sub-block feed the same slots again and the next sub-block refreshes everything, so
  nothing would read it.

Greedy only: committed tokens are argmaxes; there is no sampling. Unverified, the output is the
model's own parallel decode, which can differ from its AR output where a step commits a
confident wrong token; verified, it cannot.

``forward_passes`` counts every model call for the batch (the prefill included); a row's
``row_forwards`` counts the calls made while it was unfinished, waiting steps included, so
``tokens_per_forward`` is the number of tokens a row commits per forward it had to wait for.
With ``block_size=1`` there are no denoising steps and the decoder is exactly ``ar`` (greedy).
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers import DynamicCache

from leaplm.inference.cost import width_chooser
from leaplm.inference.engine import (
    DecoderError,
    DecodeResult,
    Engine,
    PaddingMask,
    PromptBatch,
    crop_cache,
    new_cache,
    register_decoder,
)
from leaplm.inference.kernels.commit import commit_stats
from leaplm.models.block_diffusion import BlockDiffusionError, check_block_size, spec_of
from leaplm.models.noisy_weights import noisy_tokens

RULES = ("threshold", "entropy", "factor", "top_k", "filter")


def forward(engine: Engine, input_ids: torch.Tensor, *args, noisy_from: int, **kwargs):
    """``engine.forward`` with tokens ``noisy_from``.. [b, s] marked as the noisy stream: a model with
    separate noisy weights (``models/noisy_weights.py``) runs them through those, the rest through
    its clean weights; any other model ignores the mark."""
    noisy = (torch.arange(input_ids.shape[1], device=input_ids.device) >= noisy_from).expand_as(input_ids)  # [b, s]
    with noisy_tokens(engine.model, noisy):
        return engine.forward(input_ids, *args, **kwargs)


def select_commits(confidence: torch.Tensor, entropy: torch.Tensor | None, open_slots: torch.Tensor, rule: str, *,
                   threshold: float = 0.9, entropy_bound: float = 0.5, factor: float = 1.0,
                   top_k: int = 1, max_per_step: int = 0, unmask_filter: Callable | None = None,
                   accept: float = 0.96) -> torch.Tensor:
    """Which open slots each row commits this step, by ``rule``; bool [b, s].

    ``confidence`` [b, s] is the probability of each slot's argmax token, ``entropy`` [b, s] its
    predictive entropy (read by the ``entropy`` rule only, None is fine otherwise), and
    ``open_slots`` [b, s] marks the uncommitted slots a row may commit now. A row with an open
    slot commits at least one (its best: most confident, or lowest entropy); a row without
    commits nothing; ``max_per_step`` > 0 keeps at most that many, the best. ``unmask_filter``
    maps confidences [b, s] (closed slots read as 1) to acceptance probabilities [b, s] for the
    ``filter`` rule. Pure tensor code, so the rules are tested on hand-made numbers.
    """
    if rule == "entropy":
        if entropy is None:
            raise ValueError("the entropy rule needs the predictive entropy of each slot")
        score = -entropy  # lower entropy ranks first
    else:
        score = confidence
    score = score.masked_fill(~open_slots, float("-inf"))  # [b, s]
    ranked, order = score.sort(dim=-1, descending=True, stable=True)  # [b, s]
    rank = torch.arange(1, score.shape[-1] + 1, device=score.device)  # [s] 1-based

    def by_rank(keep: torch.Tensor) -> torch.Tensor:
        """Slots whose rank is kept: ``keep`` [b, s] is in rank order, the result in slot order."""
        return torch.zeros_like(open_slots).scatter(-1, order, keep)

    if rule == "threshold":
        chosen = confidence > threshold
    elif rule == "entropy":
        chosen = entropy <= entropy_bound
    elif rule == "factor":
        passes = ranked >= 1 - factor / (rank + 1)  # [b, s]; -inf (closed) never passes
        n = passes.long().cumprod(-1).sum(-1, keepdim=True)  # [b, 1] leading run of passing ranks
        chosen = by_rank(rank <= n)
    elif rule == "top_k":
        chosen = by_rank((rank <= top_k).expand_as(ranked))
    elif rule == "filter":
        if unmask_filter is None:
            raise DecoderError("the filter rule needs unmask_filter (a filter trained by train/learn2pd.py)")
        chosen = unmask_filter(confidence.masked_fill(~open_slots, 1.0)) > accept
    else:
        raise DecoderError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    chosen = chosen | by_rank((rank == 1).expand_as(ranked))  # the best slot: progress every step
    if max_per_step:
        chosen = chosen & by_rank((rank <= max_per_step).expand_as(ranked))
    return chosen & open_slots


def check_settings(block_size: int | None, sub_block_size: int | None, rule: str, threshold: float,
                   entropy_bound: float, factor: float, top_k: int, max_per_step: int = 0, verify: bool = False,
                   adaptive: bool | None = None) -> None:
    """Refuse settings the decoder cannot use, naming the fix.

    A size of None (the model's block size, before a model is loaded) is not checked.
    """
    for name, size in (("block_size", block_size), ("sub_block_size", sub_block_size)):
        if size is not None:
            try:
                check_block_size(size, what=name)
            except BlockDiffusionError as err:
                raise DecoderError(str(err)) from None
    if block_size is not None and sub_block_size is not None and block_size % sub_block_size:
        divisors = ", ".join(str(d) for d in range(1, block_size + 1) if block_size % d == 0)
        raise DecoderError(
            f"sub_block_size={sub_block_size} does not divide block_size={block_size}; choose one of {divisors}"
        )
    if rule not in RULES:
        raise DecoderError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    if not 0 < threshold <= 1:
        raise DecoderError(
            f"threshold must be in (0, 1] (a slot commits when its confidence exceeds it; 1 = one token per step), "
            f"got {threshold}"
        )
    if not entropy_bound > 0:
        raise DecoderError(f"entropy_bound must be > 0 (in nats; 0.5 is LLaDA's), got {entropy_bound}")
    if not factor > 0:
        raise DecoderError(f"factor must be > 0 (Fast-dLLM v1 uses 1.0), got {factor}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise DecoderError(f"top_k must be an integer >= 1 (slots committed per step), got {top_k!r}")
    if not isinstance(max_per_step, int) or isinstance(max_per_step, bool) or max_per_step < 0:
        raise DecoderError(f"max_per_step must be an integer >= 0 (0 = no cap; CD4LM uses 32), got {max_per_step!r}")
    if adaptive is not None and not isinstance(adaptive, bool):
        raise DecoderError(f"adaptive must be true or false (write a block with AR steps where denoising does not "
                           f"pay; unset: on with verify), got {adaptive!r}")
    if adaptive and not verify:
        raise DecoderError("adaptive needs verify=true: an unverified decode's output depends on its steps, so "
                           "switching blocks to AR would change it")


def filter_for(path: str | None, rule: str, block_size: int, sub_block_size: int, accept: float,
               device: torch.device) -> Callable | None:
    """The unmask filter of the ``filter`` rule, loaded from ``path`` and checked against the block."""
    if rule != "filter":
        return None
    if not 0 <= accept <= 1:
        raise DecoderError(f"accept must be in [0, 1] (Learn2PD uses 0.96), got {accept}")
    if path is None:
        raise DecoderError("rule=filter needs unmask_filter=PATH, a filter written by train/learn2pd.py")
    if sub_block_size != block_size:
        raise DecoderError("rule=filter reads a whole block's confidences: leave sub_block_size at block_size")
    from leaplm.models.unmask_filter import load_filter

    net = load_filter(path).to(device)
    if net.width != block_size - 1:
        raise DecoderError(f"the unmask filter in {path} reads blocks of {net.width + 1} slots, the decoder uses "
                           f"block_size={block_size}; train a filter for this block size")
    return net.accept_probability


def fill_after_stop(engine: Engine, block: torch.Tensor, committed: torch.Tensor, fill_token: int) -> None:
    """End-of-text prediction: every slot after a row's first committed stop token becomes
    ``fill_token``, committed; ``block`` and ``committed`` [b, B] are changed in place.

    The decoder fills with the mask token: training pads every answer past its end with it, so
    the later steps of the block see what the model was trained on (feeding stop tokens there cost
    the tiny teacher 35 points on word problems); the returned sequence ends at the stop either way.
    """
    stops = engine.is_stop(block) & committed  # [b, B]
    first = torch.where(stops.any(-1), stops.long().argmax(-1), block.shape[1])  # [b] first committed stop
    after = torch.arange(block.shape[1], device=block.device)[None] > first[:, None]  # [b, B]
    block.masked_fill_(after, fill_token)
    committed |= after


def sub_block_forward(engine: Engine, cache: DynamicCache, tokens: torch.Tensor, positions: torch.Tensor,
                      visible: torch.Tensor, context: int, start: int, end: int) -> torch.Tensor:
    """A DualCache step: feed block slots [start, end) only; return their logits [b, end - start, v].

    ``cache`` holds ``context`` positions and then the whole block's K/V from the sub-block's
    full-block forward. The fed slots attend to the context (per ``visible`` [b, >= kv], True =
    a real token), to the kept K/V of the block's other slots, and to each other: their fresh
    K/V lands at the end of the cache and their stale copies are masked out. The fresh K/V is
    then dropped rather than copied over the stale copies, as nothing would read it: the next
    steps of the sub-block feed the same slots again, and the next sub-block starts with a
    full-block forward. The cache is left as it was, ``context + block_size`` positions.

    The fed slots sit ``block_size - start`` cache slots past their place in the block, so the
    engine is given their offsets from the cache end (negative): a sliding window is measured
    from each slot's true position, as in the full-block forward and ``generate``.
    """
    width = end - start
    block_size = tokens.shape[1]
    kv = context + block_size + width
    allowed = engine.mask_for_new_tokens(visible[:, :kv], torch.ones(width, width, dtype=torch.bool))  # [b, s, kv]
    allowed[:, :, context + start:context + end] = False  # the stale copies of the fed slots
    offsets = torch.arange(start, end, device=tokens.device) - block_size  # [s] slot j at context + start + j
    out = forward(engine, tokens[:, start:end], cache, positions[:, start:end], custom_mask=allowed, offsets=offsets,
                  noisy_from=0)
    crop_cache(cache, context + block_size)
    return out.logits


@register_decoder("block_diffusion", checks=(check_settings,))
def block_diffusion(
    engine: Engine, batch: PromptBatch, max_new_tokens: int, *,
    block_size: int | None = None, sub_block_size: int | None = None, rule: str = "threshold",
    threshold: float = 0.9, entropy_bound: float = 0.5, factor: float = 1.0, top_k: int = 1,
    sub_block_cache: bool = False, max_per_step: int = 0, unmask_filter: str | None = None, accept: float = 0.96,
    eos_fill: bool = False, fuse_commit_pass: bool = True, verify: bool = False, adaptive: bool | None = None,
) -> DecodeResult:
    """Greedy block-diffusion decoding of a converted model (see the module docstring).

    ``block_size`` defaults to the model's (``config.block_diffusion``) and ``sub_block_size``
    to ``block_size``. Whole blocks are decoded and then cut at ``max_new_tokens``, so a longer
    budget extends the output and never changes it.
    """
    try:
        spec = spec_of(engine.model)
    except BlockDiffusionError as err:
        raise DecoderError(str(err)) from err
    block_size = spec.block_size if block_size is None else block_size
    sub_block_size = block_size if sub_block_size is None else sub_block_size
    check_settings(block_size, sub_block_size, rule, threshold, entropy_bound, factor, top_k, max_per_step, verify,
                   adaptive)
    if verify and spec.clean_attention != "causal":
        raise DecoderError("verify checks a block against the model's causal (AR) predictions, and this model's "
                           f"clean attention is {spec.clean_attention!r}; decode it with verify=False")
    settings = dict(threshold=threshold, entropy_bound=entropy_bound, factor=factor, top_k=top_k,
                    max_per_step=max_per_step, accept=accept,
                    unmask_filter=filter_for(unmask_filter, rule, block_size, sub_block_size, accept, engine.device))

    b, device = batch.size, engine.device
    span = -(-max_new_tokens // block_size) * block_size  # whole blocks
    padding = PaddingMask(batch, span)  # for causal forwards; None-valued without padding
    # Real cache slots for custom masks, with room for a DualCache step's extra slots.
    visible = torch.ones(b, batch.width + span + sub_block_size, dtype=torch.bool, device=device)  # [b, kv]
    visible[:, : batch.width] = batch.attention_mask.bool()
    bidirectional = torch.ones(block_size, block_size, dtype=torch.bool)
    slots = torch.arange(block_size, device=device)  # [B]
    # The fused commit pass's pattern over [clean block, next block]: the clean block as trained,
    # the next one sees all of it and itself.
    clean = bidirectional.tril() if spec.clean_attention == "causal" else bidirectional
    fused_pattern = torch.ones(2 * block_size, 2 * block_size, dtype=torch.bool)  # [2B, 2B]
    fused_pattern[:block_size] = torch.cat([clean, torch.zeros_like(clean)], dim=1)

    tokens = torch.full((b, span), engine.pad_token_id, dtype=torch.long, device=device)  # [b, span]
    lengths = torch.zeros(b, dtype=torch.long, device=device)  # [b]
    unfinished = torch.ones(b, dtype=torch.bool, device=device)  # [b]
    row_forwards = torch.ones(b, dtype=torch.long, device=device)  # [b] the prefill

    cache = new_cache()
    out = engine.forward(batch.input_ids, cache, batch.position_ids, padding.upto(batch.width), logits_to_keep=1)
    first = out.logits[:, -1].argmax(-1)  # [b] slot 0 of block 0
    forwards = 1
    guess = torch.full_like(first, spec.mask_token_id)  # [b] the next block's slot 0 per the last noisy logit
    fused = None  # (logits [b, B, v] of slots 0 .. B-1, hit [b]): this block's first step, run with the commit pass

    chooser = None  # picks, per block, between denoising it (width block_size) and AR steps (width 1)
    if (verify if adaptive is None else adaptive) and block_size > 1:
        chooser = width_chooser(engine, ("block_diffusion", block_size, sub_block_size, rule, threshold,
                                         entropy_bound, factor, top_k, max_per_step, unmask_filter, accept, eos_fill,
                                         fuse_commit_pass), [block_size], b, batch.width + max_new_tokens // 2,
                                burst=1)  # a block shows what denoising pays

    def stopped_at(block: torch.Tensor, committed: torch.Tensor) -> torch.Tensor:
        """[b, B]: committed stop tokens with every slot before them committed (they end the row)."""
        return engine.is_stop(block) & committed.long().cumprod(-1).bool()

    def settle(block: torch.Tensor, committed: torch.Tensor, start: int) -> None:
        """End the rows that are done: a committed stop with every slot before it committed, or a
        complete block that reaches ``max_new_tokens``."""
        stops = stopped_at(block, committed)  # [b, B]
        stopped = stops.any(-1)  # [b]
        full = committed.all(-1) & (start + block_size >= max_new_tokens)  # [b]
        ends = unfinished & (stopped | full)  # [b]
        length = torch.where(stopped, start + stops.long().argmax(-1) + 1, start + block_size)  # [b]
        lengths[ends] = length[ends].clamp(max=max_new_tokens)
        unfinished[ends] = False

    def reopen_unverified(block: torch.Tensor, committed: torch.Tensor, clean_logits: torch.Tensor,
                          start: int) -> torch.Tensor:
        """``verify``: check each unfinished row's block against its own greedy AR continuation.

        ``clean_logits`` [b, B, v] are the commit pass's (causal): slot j's predicts slot j + 1.
        At a row's first slot that differs, up to its first stop and within ``max_new_tokens``,
        the AR token replaces the committed one and every later slot is masked and reopened
        (``block``, ``committed`` change in place). Returns the rows reopened [b]."""
        ar = clean_logits[:, :-1].argmax(-1)  # [b, B - 1] the AR tokens of slots 1 .. B-1
        stops = engine.is_stop(block).long()  # [b, B]
        before_stop = (stops.cumsum(-1) - stops)[:, 1:] == 0  # [b, B - 1] slots up to the first stop
        within = slots[1:] < max_new_tokens - start  # [B - 1]
        wrong = (block[:, 1:] != ar) & before_stop & within & unfinished[:, None]  # [b, B - 1]
        reopened = wrong.any(-1)  # [b]
        at = torch.where(reopened, wrong.long().argmax(-1) + 1, block_size)  # [b] first wrong slot
        fixed = slots[None] == at[:, None]  # [b, B]
        block[:, 1:] = torch.where(fixed[:, 1:], ar, block[:, 1:])
        later = slots[None] > at[:, None]  # [b, B]
        block.masked_fill_(later, spec.mask_token_id)
        committed &= ~later
        return reopened

    def ar_block(block: torch.Tensor, committed: torch.Tensor, start: int, positions: torch.Tensor) -> None:
        """Write the block with 1-token forwards of the clean stream (``block``, ``committed`` [b, B]
        change in place); they leave in the cache the clean K/V a commit pass would, and the last
        one's logit is the next block's slot 0 (``first``)."""
        nonlocal first, forwards
        context = batch.width + start
        last = min(block_size, max_new_tokens - start)  # slots past the budget are cut anyway
        for j in range(last):
            logits = engine.forward(block[:, j:j + 1], cache, positions[:, j:j + 1],
                                    padding.upto(context + j + 1)).logits[:, -1]  # [b, v]
            forwards += 1
            row_forwards.add_(unfinished.long())
            if j + 1 < block_size:
                block[:, j + 1] = logits.argmax(-1)
                committed[:, j + 1] = True
            else:
                first = logits.argmax(-1)
            if j + 1 == last:
                committed[:] = True
            settle(block, committed, start)
            if not unfinished.any():
                return

    def written(live: torch.Tensor, start: int) -> float:
        """Tokens per row the block at ``start`` wrote for the rows ``live`` [b] when it began."""
        return float(torch.where(unfinished, block_size, lengths - start)[live].float().mean())

    # The chooser times each block from its choice to its observation: the block's whole cost,
    # masks and bookkeeping included, against AR's.
    width = chooser.choose() if chooser is not None else block_size
    for start in range(0, span, block_size):
        context = batch.width + start  # cached: the prompt and the finished blocks
        positions = batch.lengths[:, None] + start + slots  # [b, B]
        block = torch.full((b, block_size), spec.mask_token_id, dtype=torch.long, device=device)  # [b, B]
        block[:, 0] = first
        committed = slots[None].expand(b, -1) == 0  # [b, B]
        settle(block, committed, start)
        live = unfinished.clone()  # [b] rows this block writes for
        if chooser is not None and width == 1 and unfinished.any():
            fused = None  # a fused step run for this block is not needed, and its noisy K/V goes
            crop_cache(cache, context)
            ar_block(block, committed, start, positions)
            tokens[:, start:start + block_size] = block
            if not unfinished.any():
                break
            chooser.observe(1, written(live, start))
            width = chooser.choose()
            continue
        kept = carried = None  # DualCache: the sub-block whose block K/V is cached, and slot lo-1's logit
        overdue = False  # denoising fell behind the pace of writing the block with AR steps
        while True:  # denoise the block; under ``verify``, again from a row's first wrong slot
            while True:
                open_slots = ~committed & unfinished[:, None] & ~stopped_at(block, committed).any(-1, keepdim=True)
                active = open_slots.any(0)  # [B]
                if not active.any():
                    break
                # Behind AR's pace (the slowest row's share of the block done, against the share of an
                # AR block's time spent): a block that will not pay stops after a step or two.
                if chooser is not None and chooser.overdue(1, steps=block_size,
                                                           done=1 - float(open_slots.sum(-1).max()) / block_size):
                    overdue = True
                    break
                lo = int(active.nonzero()[0]) // sub_block_size * sub_block_size  # the active sub-block [lo, hi)
                hi = lo + sub_block_size
                first_open = max(lo, 1)  # slot 0 is never open; slot j is predicted at j - 1
                ran = fused is None  # a fused step already ran, and was counted, with the commit pass
                if fused is not None:  # rows that guessed the slot wrong wait for the next step
                    logits, hit = fused
                    fused = None
                    logits = logits[:, first_open - 1:]  # [b, B - first_open + 1, v] from slot first_open - 1
                    if sub_block_cache:  # the batch shares the kept block K/V: right for every row, or not used
                        hit &= bool((hit | ~unfinished).all())
                        if hit.any():
                            kept, carried = lo, logits[:, :1].clone()
                    open_slots &= hit[:, None]
                elif kept != lo:
                    crop_cache(cache, context)  # drop the noisy K/V of earlier steps
                    mask = engine.mask_for_new_tokens(visible[:, : context + block_size], bidirectional)  # [b, B, kv]
                    logits = forward(engine, block, cache, positions, custom_mask=mask, noisy_from=0,
                                            logits_to_keep=block_size - first_open + 1).logits  # from first_open - 1
                    if sub_block_cache:
                        kept, carried = lo, logits[:, :1].clone()  # [b, 1, v] slot lo - 1 when lo >= 1
                else:
                    fed = sub_block_forward(engine, cache, block, positions, visible, context, lo, hi)  # [b, S, v]
                    logits = fed if lo == 0 else torch.cat([carried, fed], dim=1)  # from slot first_open - 1
                if logits.shape[1] == block_size - first_open + 1:  # it reaches slot B-1, which predicts past the block
                    guess = logits[:, -1].argmax(-1)
                shifted = logits[:, : hi - first_open]  # [b, hi - first_open, v] slots first_open-1 .. hi-2
                if ran:
                    forwards += 1
                    row_forwards += unfinished

                stats = commit_stats(shifted)  # [b, hi - first_open] each; one fused pass over the vocabulary
                chosen = select_commits(stats.prob, stats.entropy, open_slots[:, first_open:hi], rule, **settings)
                block[:, first_open:hi] = torch.where(chosen, stats.token, block[:, first_open:hi])
                committed[:, first_open:hi] |= chosen
                if eos_fill:
                    fill_after_stop(engine, block, committed, spec.mask_token_id)
                if not verify:
                    settle(block, committed, start)

            if overdue:
                # Write the block with AR steps instead (from slot 0: verified slots come out as they
                # are) rather than risk as many denoising rounds again; at large batches some row's
                # block is almost always reopened. Its output is the same, as it is verified.
                fused = kept = None
                crop_cache(cache, context)
                block[:, 1:] = spec.mask_token_id  # unverified slots, whose stops must not end a row
                committed[:, 1:] = False
                ar_block(block, committed, start, positions)
                break
            if not unfinished.any():
                break
            # Commit pass: the finished block's clean K/V, and its logits (the last gives the next
            # slot 0; under ``verify`` all of them check the block).
            crop_cache(cache, context)  # drop the noisy K/V
            keep = block_size if verify else 1
            next_logits = None  # [b, B, v] the next block's first step, when fused
            fuse = fuse_commit_pass and block_size > 1 and start + block_size < span
            if fuse and (chooser is None or chooser.leaning_wide()):  # not when the next block is likely AR's
                guessed = block.new_full((b, block_size), spec.mask_token_id)  # [b, B] the next block
                guessed[:, 0] = guess
                mask = engine.mask_for_new_tokens(visible[:, : context + 2 * block_size], fused_pattern)  # [b, 2B, kv]
                logits = forward(engine, torch.cat([block, guessed], dim=1), cache,
                                        torch.cat([positions, positions + block_size], dim=1), custom_mask=mask,
                                        logits_to_keep=block_size + keep, noisy_from=block_size).logits  # [b, keep + B, v]
                clean_logits, next_logits = logits[:, :keep], logits[:, keep:]
                # The next block's K/V stays: its first step keeps it as DualCache's block K/V or crops it.
            elif spec.clean_attention == "causal":
                clean_logits = engine.forward(block, cache, positions, padding.upto(context + block_size),
                                              logits_to_keep=keep).logits
            else:  # block_causal: the clean block is bidirectional, as it was trained
                mask = engine.mask_for_new_tokens(visible[:, : context + block_size], bidirectional)
                clean_logits = engine.forward(block, cache, positions, custom_mask=mask, logits_to_keep=keep).logits
            first = clean_logits[:, -1].argmax(-1)  # [b]
            forwards += 1
            row_forwards += unfinished
            if next_logits is not None:
                fused = next_logits, first == guess
            if verify and reopen_unverified(block, committed, clean_logits, start).any():
                fused = kept = None
                continue
            settle(block, committed, start)
            break

        tokens[:, start:start + block_size] = block
        if not unfinished.any():
            break
        if chooser is not None:
            chooser.observe(block_size, written(live, start))
            width = chooser.choose()

    tokens = tokens[:, :max_new_tokens].masked_fill(
        torch.arange(max_new_tokens, device=device)[None] >= lengths[:, None], engine.pad_token_id
    )  # [b, n] nothing after a row's end
    return DecodeResult(tokens, lengths, forwards, row_forwards)
