"""``eagle3``: tree decoding with an EAGLE-3 draft (``models/eagle3.py``).

**One step.** The *root* is the token the target predicted last (committed, not yet in the
target's cache). The draft's cache holds its first-step keys and values for every committed
position before the root, each computed from the target's own fused features there. A step:

1. *Catch up*: the draft runs over the positions the last verification accepted (their target
   features, each with the token that followed it), in one forward; its output at the newest
   gives the root's children (depth 1).
2. *Draft*: for depth d = 2 .. D, the draft runs once over the nodes of depth d - 1 that have
   children, each reading its own token and its parent's output hidden state at position
   root + d - 2 (as in training, a step drafts one position on), attending to the draft's cache
   and to its ancestors (a tree mask); their logits' ranked tokens are the depth-d nodes. The
   tree's shape is the ``"auto"`` tree grown from the draft's measured rank accuracy per depth (as
   the Medusa and Hydra decoders grow theirs), or an explicit list of rank paths.
3. *Verify*: the target runs the root and every node in one forward with the tree mask, as the
   ``medusa``/``hydra`` decoders do (``tree.py``); the deepest node whose whole path is the
   target's greedy choice wins, its path is committed, and the target's token after it (the
   bonus) becomes the next root. The hidden states of that forward give the accepted
   positions' features for the next catch-up.

Greedy decoding is lossless: every committed token is the target's greedy token, so the output
equals ``generate`` whatever the draft proposes (tests check it on several families, padded
batches included).

The default tree's shape is fixed per step (EAGLE-1's static tree, grown from measured
accuracies). ``tree="dynamic"`` is EAGLE-2's dynamic tree (``eagle/model/cnets.py:topK_genrate``):
each step, depth by depth, the best nodes so far are expanded into their top children and the
nodes whose whole path the draft finds most likely make the tree (:func:`grow_dynamic`). Where we
differ: EAGLE-2 ranks by each row's own log-probability and builds a tree per row; ours ranks by
the path probability averaged over the batch's live rows, so a batch verifies with one tree mask
(at batch 1 the two are the same). With ``adaptive`` (on by default, greedy) the engine's
:class:`~leaplm.inference.cost.WidthChooser` takes the best-scoring part of the tree that pays, 1 (a
plain AR step, no drafting) to ``tree_size`` nodes, timing each step whole: drafting included;
a dynamic tree fills the node budget the chooser picks.

``lookup=L`` (leaplm's addition, as the ``medusa``/``hydra``/``clover`` decoders have it): the steps
where prompt lookup finds a match for some row also verify a chain of L tokens drafted by prompt
lookup (``tree.py``), and are sized by a chooser of their own; verification picks whichever path
goes deepest, so the output is still ``generate``'s. On code, whose answers repeat their prompts'
names, it adds accepted tokens the draft misses at no drafting cost.
"""

from __future__ import annotations

from typing import Any

import torch

from leaplm.inference.decoders.tree import (
    Answers,
    LookupContexts,
    Tree,
    TreeSizes,
    auto_paths,
    catch_up,
    check_adaptive,
    check_lookup,
    choose_tree,
    fixed_sizes,
    keep_new_slots,
    make_tree,
    real_slots,
    tree_sizes,
)
from leaplm.inference.engine import (
    DecoderError,
    DecodeResult,
    Engine,
    PromptBatch,
    crop_cache,
    new_cache,
    register_decoder,
)
from leaplm.models.eagle3 import Eagle3Draft, eagle3_of

DYNAMIC_TOP_K = 8  # children per expanded node of a dynamic tree (EAGLE-2 takes 10)


def draft_forward(draft: Eagle3Draft, cache, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                  allowed: torch.Tensor) -> torch.Tensor:
    """One draft forward of ``tokens`` [b, s] with ``hidden`` [b, s, H] after ``cache``; its new keys
    and values join the cache. ``allowed`` [b, s, cache + s]. Returns the output states [b, s, H]."""
    layer = cache.layers[0] if cache.get_seq_length() else None
    out, (k, v) = draft.layer_forward(tokens, hidden, positions, allowed,
                                      None if layer is None else (layer.keys, layer.values))
    cache.update(k, v, 0)
    return out


def propose(draft: Eagle3Draft, cache, cached: torch.Tensor, tree: Tree, root: torch.Tensor, root_out: torch.Tensor,
            root_pos: torch.Tensor) -> torch.Tensor:
    """Tokens [b, N] of the tree's nodes (column 0 the root), drafted depth by depth from the draft's
    output ``root_out`` [b, H] at the position before the root (``root_pos`` [b]). ``cached`` [b]:
    real tokens in the draft's cache, which is left as it was."""
    b, n = root.shape[0], tree.size
    tokens = root[:, None].expand(b, n).clone()  # [b, N] the lookup chain's columns hold the root, filled later
    if tree.heads_size == 1:  # no drafted node: the root (and the lookup chain)
        return tokens
    context = cache.get_seq_length()
    max_rank = int(tree.rank.max()) + 1
    outputs = root_out.new_zeros(b, n, root_out.shape[-1])  # [b, N, H] each drafted node's output
    outputs[:, 0] = root_out
    appended: list[torch.Tensor] = []  # nodes whose keys joined the draft's cache, in order
    for d, (nodes, parents, slot) in enumerate(tree.levels, 1):
        if d > 1:  # run the parents (depth d - 1): their outputs rank this depth's tokens
            appended.append(parents)
            keyed = torch.cat(appended)  # [a]
            allowed = torch.cat([real_slots(cached, context)[:, None].expand(-1, len(parents), -1),
                                 tree.ancestors[parents][:, keyed][None].expand(b, -1, -1)], -1)  # [b, P, ctx + a]
            positions = (root_pos[:, None] + d - 2).expand(-1, len(parents))  # [b, P] depth e drafts at root + e - 1
            outputs[:, parents] = draft_forward(draft, cache, tokens[:, parents], outputs[:, tree.parent[parents]],
                                                positions, allowed)
        logits = draft.logits(outputs[:, parents])  # [b, P, D_vocab]
        top = draft.to_target(logits.topk(max_rank, dim=-1).indices)  # [b, P, R] target ids
        tokens[:, nodes] = top[:, slot, tree.rank[nodes]]
    crop_cache(cache, context)
    return tokens


def grow_dynamic(draft: Eagle3Draft, cache, cached: torch.Tensor, budget: int, depth: int, root: torch.Tensor,
                 root_out: torch.Tensor, root_pos: torch.Tensor, live: torch.Tensor, lookup: int = 0
                 ) -> tuple[Tree, torch.Tensor]:
    """EAGLE-2's dynamic tree of ``budget`` nodes (root included), shared by the rows, and its tokens
    [b, N] (column 0 the root; a ``lookup`` chain's columns hold the root, to be filled).

    A node's score is the draft's probability of its whole path (the product of its tokens'
    probabilities along it), averaged over the ``live`` rows: the expected number of rows that accept
    it. Depth by depth, the best-scoring nodes of the last depth that could still make the tree are
    expanded (one draft forward over them, as :func:`propose` runs a level), each into its top
    children; then the ``budget - 1`` best-scoring nodes are the tree. A child never outscores its
    parent, so they always form a tree. ``cached`` [b]: real tokens in the draft's cache, which is
    left as it was."""
    keep = budget - 1
    b = root.shape[0]
    if keep == 0:
        tree = make_tree([], depth, lookup)
        return tree, root[:, None].expand(b, tree.size).clone()
    ranks = min(keep, DYNAMIC_TOP_K)  # children drafted per expanded node
    weight = live.float() / live.float().sum().clamp(min=1)  # [b] finished rows do not count
    context = cache.get_seq_length()
    paths: list[tuple[int, ...]] = []
    tokens: list[torch.Tensor] = []  # per node [b]
    logp: list[torch.Tensor] = []  # per node [b] log-probability of its path
    scores: list[float] = []  # per node: its path's probability averaged over the live rows
    lineage: list[list[int]] = []  # per node: its ancestors among the nodes, then itself
    outputs: dict[int, torch.Tensor] = {}  # expanded node -> its draft output state [b, H]
    run: list[int] = []  # expanded nodes, in the order their keys joined the draft's cache

    def add_children(parents: list[int], states: torch.Tensor) -> list[int]:
        top = draft.logits(states).log_softmax(-1).topk(ranks, dim=-1)  # [b, P, R]
        ids = draft.to_target(top.indices)
        added = []
        for i, parent in enumerate(parents):
            for r in range(ranks):
                added.append(len(paths))
                paths.append((paths[parent] if parent >= 0 else ()) + (r,))
                tokens.append(ids[:, i, r])
                logp.append(top.values[:, i, r] + (logp[parent] if parent >= 0 else 0))
                scores.append(float((logp[-1].exp() * weight).sum()))
                lineage.append((lineage[parent] if parent >= 0 else []) + [added[-1]])
        return added

    frontier = add_children([-1], root_out[:, None])
    for d in range(2, depth + 1):
        # A child scores at most its parent: only parents above the keep-th best score so far can add a node.
        bar = sorted(scores, reverse=True)[keep - 1] if len(scores) >= keep else -1.0
        parents = [i for i in sorted(frontier, key=scores.__getitem__, reverse=True)[:keep - d + 2] if scores[i] > bar]
        if not parents:
            break
        run += parents
        allowed = torch.zeros(len(parents), len(run), dtype=torch.bool, device=root.device)  # [P, run]
        for row, node in enumerate(parents):
            allowed[row, [run.index(a) for a in lineage[node]]] = True
        allowed = torch.cat([real_slots(cached, context)[:, None].expand(-1, len(parents), -1),
                             allowed[None].expand(b, -1, -1)], -1)  # [b, P, ctx + run]
        inputs = torch.stack([outputs[lineage[p][-2]] if len(lineage[p]) > 1 else root_out for p in parents], 1)
        states = draft_forward(draft, cache, torch.stack([tokens[p] for p in parents], 1), inputs,
                               (root_pos[:, None] + d - 2).expand(-1, len(parents)), allowed)  # [b, P, H]
        for i, p in enumerate(parents):
            outputs[p] = states[:, i]
        frontier = add_children(parents, states)
    crop_cache(cache, context)
    chosen = sorted(range(len(paths)), key=lambda i: (-scores[i], len(paths[i])))[:keep]
    tree = make_tree([paths[i] for i in chosen], depth, lookup)
    by_path = {paths[i]: tokens[i] for i in chosen}
    out = root[:, None].expand(b, tree.size).clone()  # [b, N]
    for j, path in enumerate(tree.paths[1:], 1):
        out[:, j] = by_path[path]
    return tree, out


def draft_catch_up(draft: Eagle3Draft, cache, cached: torch.Tensor, features: torch.Tensor, next_tokens: torch.Tensor,
                   positions: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Run the draft over the first ``counts[b]`` of ``features`` [b, w, H] (fused target features),
    each with the token after it (``next_tokens`` [b, w]) at ``positions`` [b, w]; keep their keys
    and values in the cache (right-aligned, ``cached`` [b] grows in place). Returns the draft's
    output at each row's last one [b, H]."""
    return catch_up(lambda allowed: draft_forward(draft, cache, next_tokens, features, positions, allowed),
                    cache, cached, counts, next_tokens.shape[1])


def eagle3_decode(engine: Engine, batch: PromptBatch, max_new_tokens: int, draft: Eagle3Draft,
                  sizes: TreeSizes, dynamic: bool) -> DecodeResult:
    device, b = engine.device, batch.size
    sizes = sizes.to(device)
    depth = max(sizes.largest.max_depth, draft.accuracy.shape[0] + sizes.lookup if dynamic else 0)
    answers = Answers(engine, batch, max_new_tokens, spare=depth + 2)
    cache, draft_cache = new_cache(), new_cache()
    rows = torch.arange(b, device=device)

    padding = batch.attention_mask if batch.has_padding else None
    out = engine.forward(batch.input_ids, cache, batch.position_ids, padding, output_hidden_states=True)
    root = out.logits[:, -1].argmax(-1)  # [b]
    answers.commit(root[:, None], torch.ones_like(root))
    cached = batch.lengths.clone()  # [b] real tokens in the target's cache
    # The draft's first catch-up: every prompt position, each with the token after it (the root last).
    # Left padding becomes right-aligned real slots: a row's real positions are its last lengths[b].
    order = (torch.arange(batch.width, device=device)[None] + batch.width - batch.lengths[:, None]) % batch.width
    features = draft.features(out.hidden_states).gather(1, order[..., None].expand(-1, -1, draft.config.hidden_size))
    following = torch.cat([batch.input_ids[:, 1:], root[:, None]], 1).gather(1, order)  # [b, p]
    draft_cached = torch.zeros_like(cached)
    root_out = draft_catch_up(draft, draft_cache, draft_cached, features, following,
                              batch.position_ids.gather(1, order), batch.lengths)
    contexts = LookupContexts(batch, root) if sizes.lookup else None

    while answers.unfinished.any():
        context = cache.get_seq_length()
        tree, chooser, width, chain = sizes.pick(contexts, answers.unfinished, root)
        n = tree.size
        root_pos = batch.lengths + answers.count - 1  # [b] the root's position
        if dynamic:  # the width's tree gives the node budget; the draft's probabilities shape it
            tree, tokens = grow_dynamic(draft, draft_cache, draft_cached, tree.heads_size, draft.accuracy.shape[0],
                                        root, root_out, root_pos, answers.unfinished, tree.lookup)
            tree = tree.to(device)
        else:
            tokens = propose(draft, draft_cache, draft_cached, tree, root, root_out, root_pos)  # [b, N]
        if tree.lookup:
            tokens[:, tree.heads_size:] = chain
        positions = root_pos[:, None] + tree.depth[None]  # [b, N]
        real = torch.cat([real_slots(cached, context), torch.ones(b, n, dtype=torch.bool, device=device)], 1)
        allowed = Engine.mask_for_new_tokens(real, tree.ancestors)  # [b, N, context + N]
        out = engine.forward(tokens, cache, positions, custom_mask=allowed, offsets=tree.depth,
                             output_hidden_states=True)
        answers.stepped()
        correct = tokens == out.logits[:, tree.parent].argmax(-1)  # [b, N] each node is its parent's greedy token
        correct[:, 0] = True  # the root is committed already
        on_path = ((~correct).float() @ tree.ancestors.T.float()) == 0  # [b, N] every node from the root on right
        best = (on_path * (tree.depth[None] + 1)).argmax(-1)  # [b] deepest such node
        accepted = tree.depth[best]  # [b]
        if chooser is not None:
            chooser.observe(width, float((accepted + 1)[answers.unfinished].float().mean()))
        path = tree.path_nodes[best]  # [b, D + 1]
        bonus = out.logits[rows, best].argmax(-1)  # [b]
        new = torch.cat([tokens.gather(1, path[:, 1:]), bonus[:, None]], 1)  # [b, D + 1]
        new.scatter_(1, accepted[:, None], bonus[:, None])  # the bonus right after the accepted path
        live = answers.unfinished.clone()
        answers.commit(new, accepted + 1)
        counts = torch.where(live, accepted + 1, 0)  # root and accepted nodes stay in the cache
        keep_new_slots([cache], context, path, counts)
        cached += counts
        if contexts is not None:
            contexts.extend(new, counts)
        if not answers.unfinished.any():
            break
        # The accepted positions' target features, each with the token that followed it (the next
        # accepted token, then the bonus), for the draft's cache.
        fused = draft.features(out.hidden_states)  # [b, N, H]
        path_features = fused.gather(1, path[..., None].expand(-1, -1, fused.shape[-1]))  # [b, D + 1, H]
        root_out = draft_catch_up(draft, draft_cache, draft_cached, path_features, new, positions.gather(1, path),
                                  torch.where(answers.unfinished, accepted + 1, 0))
        root = bonus
    return answers.result()


@register_decoder("eagle3", checks=(check_adaptive, check_lookup))
def eagle3(engine: Engine, batch: PromptBatch, max_new_tokens: int, *, tree: Any = "auto", tree_size: int = 16,
           lookup: int = 0, adaptive: bool | None = None) -> DecodeResult:
    """Greedy tree decoding with the model's EAGLE-3 draft (see the module docstring); equals
    ``generate`` token for token. ``lookup=L`` adds a chain of L prompt-lookup tokens to the steps
    where prompt lookup finds a match."""
    draft = eagle3_of(engine.model)
    dynamic = tree == "dynamic"
    if dynamic or tree == "auto":  # the auto tree's nested sizes: node budgets, for a dynamic tree
        if adaptive is not False:
            sizes = tree_sizes(engine, batch, max_new_tokens, ("eagle3", id(draft), tree_size, lookup, dynamic),
                               auto_paths(draft.accuracy, tree_size), draft.accuracy.shape[0], lookup)
        else:
            sizes = fixed_sizes(choose_tree(draft.accuracy, "auto", tree_size, lookup))
    else:
        if adaptive:
            raise DecoderError("adaptive sizes a 'dynamic' or 'auto' tree: set one, or adaptive=false")
        sizes = fixed_sizes(choose_tree(draft.accuracy, tree, tree_size, lookup))
    return eagle3_decode(engine, batch, max_new_tokens, draft, sizes, dynamic)
