"""``kangaroo``: self-speculative decoding with a double early exit (Kangaroo, ``models/kangaroo.py``).

The self-draft is the target's own first n = ``exit_layer`` layers, then the adapter and the
target's LM head; the target's other layers (n..L-1) verify. Nothing is computed twice: the first
layers' keys, values and output states of the drafted tokens, computed while drafting, are the
target's own, so verification runs only the later layers on those states (Kangaroo,
arXiv 2404.18911; Equationliu/Kangaroo ``evaluation/inference_kangaroo.py``).

**One round.** The *root* is the token the target predicted last (committed, in no cache yet).

1. The root runs through the first n layers (``models/early_exit.py::first_layers``): their
   cache gets its keys and values, and its exit state h_r comes out.
2. *Catch up*: the adapter runs over the exit states it has not seen, the root's last, in one
   forward: the prompt's at the first round; the last draft's when the round before accepted every
   draft (the adapter never ran on it: drafting stopped there); every token a plain step (below)
   committed. Its output at the root ranks the first draft.
3. *Draft*: each draft runs through the first n layers (its exit state), then the adapter (the
   next draft), one token at a time, until ``steps`` drafts or the second early exit: the latest
   draft's top-1 probability under the adapter is below ``threshold``. Rows stop on their own;
   a row that stopped rides along the others' forwards, its extra slots dropped after.
4. *Verify*: only layers n..L-1 run (``later_layers``), over the exit states of the root and the
   drafts, with the target's cache of those layers; a draft is accepted while it is the target's
   greedy token, and the target's token after the last accepted one (the bonus) becomes the next root.
5. Every layer's cache keeps the root and the accepted drafts (right-aligned per row, so rows
   advance independently, as in ``speculative.py``), the adapter's cache what it computed of them.

Greedy decoding is lossless: every committed token is the target's greedy token, and the later
layers read exactly the states a whole forward passes them, so the output equals ``generate``
token for token (tests check it on several families, padded batches included).

**Draft length by cost** (``adaptive``, on by default): each round's cap on drafts is chosen by
the engine's :class:`~leaplm.inference.cost.WidthChooser` (``inference/cost.py``) over verified
widths 1..``steps`` + 1, timing each round whole (first-layer, adapter and verification forwards);
the prior is the target's measured k-token forward. Width 1 is a plain step: the root runs through
the first n layers and then the rest (one whole forward), and the adapter catches up on it later.

**Counting.** A round's first-layer forwards and its verification compute, over the round's tokens,
what one forward of the whole target computes: ``forward_passes`` (and tokens per forward) count
verifications, plain steps included, so tokens per forward is the mean accepted length plus one.
The first-layer forwards of the drafts and the adapter's forwards are in the wall-clock time only.
"""

from __future__ import annotations

from numbers import Integral, Real

import torch

from leaplm.inference.cost import candidate_widths, width_chooser
from leaplm.inference.decoders.tree import Answers, keep_new_slots, real_slots
from leaplm.inference.engine import DecoderError, DecodeResult, Engine, PromptBatch, new_cache, register_decoder
from leaplm.models.early_exit import first_layers, later_layers
from leaplm.models.kangaroo import KangarooAdapter, kangaroo_of

THRESHOLD = 0.6  # Kangaroo's kangaroo_forward default (its command line passes 0.4)


def check_settings(steps: int = 6, threshold: float = THRESHOLD, adaptive: bool = True) -> None:
    """Refuse settings the decoder cannot use whatever the model, naming the fix."""
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 1:
        raise DecoderError(f"steps must be an integer >= 1 (drafts per round at most), got {steps!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, Real) or not 0 <= threshold <= 1:
        raise DecoderError(f"threshold must be in [0, 1] (drafting stops once the latest draft's top-1 probability "
                           f"is below it; 0 = never early), got {threshold!r}")
    if not isinstance(adaptive, bool):
        raise DecoderError(f"adaptive must be true or false (cap each round's drafts by their measured cost), "
                           f"got {adaptive!r}")


def causal_mask(real: torch.Tensor, s: int) -> torch.Tensor:
    """[b, s, kv + s]: s new tokens, causal among themselves, after ``real`` [b, kv] (True = a real cached token)."""
    pattern = torch.ones(s, s, dtype=torch.bool, device=real.device).tril()
    return Engine.mask_for_new_tokens(torch.cat([real, real.new_ones(real.shape[0], s)], 1), pattern)


def exit_states(engine: Engine, n: int, tokens: torch.Tensor, cache, positions: torch.Tensor,
                allowed: torch.Tensor) -> torch.Tensor:
    """``tokens`` [b, s] through the target's first n layers (their cache gets the keys and values);
    the exit states [b, s, H]."""
    return first_layers(engine.model, n, lambda: engine.forward(tokens, cache, positions, custom_mask=allowed))


def verify(engine: Engine, n: int, hidden: torch.Tensor, tokens: torch.Tensor, cache, positions: torch.Tensor,
           allowed: torch.Tensor, past: int) -> torch.Tensor:
    """The target's logits [b, s, V] of ``tokens`` [b, s] from their exit states ``hidden`` [b, s, H]:
    layers n..L-1 only, whose cache holds ``past`` tokens (``allowed`` [b, s, past + s])."""
    with later_layers(engine.model, n, hidden):
        return engine.forward(tokens, cache, positions, custom_mask=allowed, past_length=past).logits


def adapter_forward(adapter: KangarooAdapter, cache, hidden: torch.Tensor, positions: torch.Tensor,
                    allowed: torch.Tensor) -> torch.Tensor:
    """The adapter over exit states ``hidden`` [b, s, H] after ``cache`` (its new keys and values
    join it); ``allowed`` [b, s, cache + s]. Returns its outputs [b, s, H]."""
    layer = cache.layers[0] if cache.get_seq_length() else None
    out, (k, v) = adapter(hidden, positions, allowed, None if layer is None else (layer.keys, layer.values))
    cache.update(k, v, 0)
    return out


class Pending:
    """Exit states the adapter has not run on yet, per row: ``states[b, :count[b]]`` [b, P, H], those
    of the committed positions right before the root's (consecutive, the newest last)."""

    def __init__(self, states: torch.Tensor, count: torch.Tensor):
        self.states, self.count = states, count

    def append(self, h: torch.Tensor) -> None:
        """One more state per row [b, H] (the newest)."""
        b = h.shape[0]
        self.states = torch.cat([self.states, h.new_zeros(b, 1, h.shape[-1])], 1)
        self.states[torch.arange(b, device=h.device), self.count] = h
        self.count = self.count + 1


def catch_up(adapter: KangarooAdapter, cache, cached: torch.Tensor, pending: Pending, root_pos: torch.Tensor,
             live: torch.Tensor) -> torch.Tensor:
    """Run the adapter over the pending states of the ``live`` rows (the root's last, at ``root_pos``
    [b]) in one forward, keeping their keys and values (right-aligned; ``cached`` [b] grows in place);
    the pending states are then cleared. Returns the adapter's output at each row's root [b, H]."""
    counts = torch.where(live, pending.count, 0)  # [b]
    w = int(counts.max())
    states = pending.states[:, :w]  # [b, w, H]
    b, device = counts.shape[0], counts.device
    index = torch.arange(w, device=device)[None]  # [1, w]
    positions = (root_pos[:, None] - counts[:, None] + 1 + index).clamp(min=0)  # [b, w]
    context = cache.get_seq_length()
    new = index < counts[:, None]  # [b, w] real new slots
    causal = torch.ones(w, w, dtype=torch.bool, device=device).tril()
    allowed = torch.cat([real_slots(cached, context)[:, None].expand(-1, w, -1), causal[None] & new[:, None, :]], -1)
    allowed[:, :, context:] |= torch.eye(w, dtype=torch.bool, device=device)[None]  # padding sees itself
    out = adapter_forward(adapter, cache, states, positions, allowed)  # [b, w, H]
    keep_new_slots([cache], context, index.expand(b, -1), counts)
    cached += counts
    pending.states, pending.count = states[:, :0], torch.zeros_like(counts)
    return out[torch.arange(b, device=device), (counts - 1).clamp(min=0)]


def kangaroo_decode(engine: Engine, batch: PromptBatch, max_new_tokens: int, adapter: KangarooAdapter, steps: int,
                    threshold: float, chooser) -> DecodeResult:
    device, b = engine.device, batch.size
    n = adapter.config.exit_layer
    rows = torch.arange(b, device=device)
    answers = Answers(engine, batch, max_new_tokens, spare=steps + 2)
    cache, adapter_cache = new_cache(), new_cache()
    padding = batch.attention_mask if batch.has_padding else None
    out = engine.forward(batch.input_ids, cache, batch.position_ids, padding, logits_to_keep=1,
                         output_hidden_states=True)
    root = out.logits[:, -1].argmax(-1)  # [b]
    answers.commit(root[:, None], torch.ones_like(root))
    cached = batch.lengths.clone()  # [b] real tokens in the target's cache (at every layer, between rounds)
    # The adapter has seen nothing: every prompt position's exit state waits, left padding turned into
    # left-aligned real states (a row's real positions are its last lengths[b]).
    order = (torch.arange(batch.width, device=device)[None] + batch.width - batch.lengths[:, None]) % batch.width
    exited = out.hidden_states[n].gather(1, order[..., None].expand(-1, -1, out.hidden_states[n].shape[-1]))
    pending = Pending(exited, batch.lengths.clone())
    adapter_cached = torch.zeros_like(cached)  # [b] real tokens in the adapter's cache
    del out

    while answers.unfinished.any():
        context = cache.get_seq_length()
        width = chooser.choose() if chooser is not None else steps + 1
        limit = width - 1  # drafts this round at most
        root_pos = batch.lengths + answers.count - 1  # [b] the root's position
        live = answers.unfinished.clone()
        real = real_slots(cached, context)  # [b, context]
        h = exit_states(engine, n, root[:, None], cache, root_pos[:, None], causal_mask(real, 1))  # [b, 1, H]
        pending.append(h[:, 0])
        if limit == 0:  # no draft pays: the root through the later layers too, a plain step
            logits = verify(engine, n, h, root[:, None], cache, root_pos[:, None], causal_mask(real, 1), context)
            answers.stepped()
            root = logits[:, -1].argmax(-1)
            answers.commit(root[:, None], torch.ones_like(root))
            keep_new_slots([cache], context, torch.zeros(b, 1, dtype=torch.long, device=device), live.long())
            cached += live.long()
            chooser.observe(1, 1.0)
            continue

        # Draft: the adapter catches up to the root, then each draft runs through the first layers and the adapter.
        out = catch_up(adapter, adapter_cache, adapter_cached, pending, root_pos, live)  # [b, H]
        adapter_context = adapter_cache.get_seq_length()  # its slots up to the root's
        states = [h]
        drafts = torch.full((b, limit), engine.pad_token_id, dtype=torch.long, device=device)
        n_drafted = torch.where(live, limit, 0)  # [b] drafts each row proposes
        active = live.clone()
        i = 0  # drafts made so far
        while True:
            probs = adapter.logits(out).float().softmax(-1)  # [b, V]
            confidence, token = probs.max(-1)
            drafts[:, i] = torch.where(active, token, engine.pad_token_id)
            i += 1
            positions = (root_pos + i)[:, None]  # [b, 1]
            h = exit_states(engine, n, drafts[:, i - 1:i], cache, positions,
                            causal_mask(torch.cat([real, real.new_ones(b, i)], 1), 1))
            states.append(h)
            if i == limit:
                break
            stop = active & (confidence < threshold)  # the second early exit: the latest draft is not confident
            n_drafted = torch.where(stop, i, n_drafted)
            active &= ~stop
            if not active.any():
                break
            allowed = torch.cat([real_slots(adapter_cached, adapter_context), real.new_ones(b, i)], 1)[:, None]
            out = adapter_forward(adapter, adapter_cache, h, positions, allowed)[:, 0]

        # Verify: the later layers on the exit states of the root and the i drafts.
        hidden = torch.cat(states, 1)  # [b, i + 1, H]
        fed = torch.cat([root[:, None], drafts[:, :i]], 1)  # [b, i + 1]
        positions = root_pos[:, None] + torch.arange(i + 1, device=device)[None]
        logits = verify(engine, n, hidden, fed, cache, positions, causal_mask(real, i + 1), context)  # [b, i + 1, V]
        answers.stepped()
        greedy = logits.argmax(-1)  # [b, i + 1]
        ok = (drafts[:, :i] == greedy[:, :i]) & (torch.arange(i, device=device)[None] < n_drafted[:, None])
        accepted = ok.long().cumprod(-1).sum(-1)  # [b]
        bonus = greedy[rows, accepted]
        new = torch.cat([drafts[:, :i], bonus[:, None]], 1)
        new.scatter_(1, accepted[:, None], bonus[:, None])  # the bonus right after the accepted drafts
        if chooser is not None:
            chooser.observe(width, float((accepted[live] + 1).float().mean()))
        answers.commit(new, accepted + 1)
        order = torch.arange(i + 1, device=device)[None].expand(b, -1)
        counts = torch.where(live, accepted + 1, 0)  # the root and the accepted drafts stay at every layer
        keep_new_slots([cache], context, order, counts)
        cached += counts
        # The adapter ran on the root and drafts 1..i-1: it keeps those accepted; the exit state of an
        # accepted i-th draft waits for the next catch-up.
        kept = torch.where(live, torch.clamp(accepted + 1, max=i), 0)
        keep_new_slots([adapter_cache], adapter_context - 1, order[:, :i], kept)
        adapter_cached += kept - live.long()
        waiting = live & (accepted == i)
        pending = Pending(hidden[:, i:], waiting.long())
        root = bonus
    return answers.result()


@register_decoder("kangaroo", checks=(check_settings,))
def kangaroo(engine: Engine, batch: PromptBatch, max_new_tokens: int, *, steps: int = 6,
             threshold: float = THRESHOLD, adaptive: bool = True) -> DecodeResult:
    """Greedy self-speculative decoding with the model's Kangaroo adapter (see the module docstring):
    at most ``steps`` drafts a round, fewer once the latest is below ``threshold``; ``adaptive`` caps
    each round's drafts by their measured cost. Equals ``generate`` token for token."""
    check_settings(steps, threshold, adaptive)
    adapter = kangaroo_of(engine.model)
    chooser = None
    if adaptive:
        widths = range(1, steps + 2) if steps <= 8 else candidate_widths(steps + 1)  # verified width = drafts + 1
        chooser = width_chooser(engine, ("kangaroo", id(adapter), steps, threshold), widths, batch.size,
                                batch.width + max_new_tokens // 2)
    return kangaroo_decode(engine, batch, max_new_tokens, adapter, steps, threshold, chooser)
