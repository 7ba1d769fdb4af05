"""Tree decoders on draft heads: ``medusa``, ``hydra`` and ``clover`` (heads from ``models/heads.py``).

**One step** (one base forward). The *root* is the token the base predicted last (committed, not
cached yet). The heads, read at the hidden state that predicted the root, propose a sparse tree
of continuations: a node is a path of ranks, ``(0, 1)`` = "head 0's top-1 token, then head 1's
top-2 token". Medusa heads rank their tokens once per depth; a Hydra or Clover-2 head is called
per parent node, on the embeddings of the path before it, so siblings differ by what precedes them. The
root and every node are fed in one forward with the tree attention mask (each node sees the
cache and its ancestors) at position root + depth. A node is *accepted* when its token is what the
base predicts at its parent (greedy) or clears the typical-acceptance bar; the deepest node whose
whole path is accepted wins. Its path's tokens are committed, then the base's prediction at it
(the *bonus* token) becomes the next root. The KV cache keeps only the root and the accepted path.

Greedy decoding is lossless: every committed token is the base's greedy token given the tokens
before it, so the output equals ``ar`` and ``model.generate`` token for token (tests check this
on every tiny family). ``typical`` acceptance (Medusa's, with temperature) accepts a node when
p(x) > min(epsilon, delta * exp(-H(p))) of its parent's distribution; it is not lossless.

**Trees.** ``tree`` is a list of rank paths (Medusa's ``medusa_choices``; missing prefixes are
added), or ``"auto"`` (the default): grown greedily to ``tree_size`` nodes by the product of the
heads' measured rank accuracies along the path (Medusa's ``gen_results`` rule), from the
accuracies the training run stored with the heads.

**Prompt lookup** (``lookup=L``, leaplm's addition, not part of Medusa or Hydra): each step the
tree also holds a chain of L nodes under the root (depths 1..L), drafted by prompt lookup
(:func:`~leaplm.inference.decoders.jacobi.lookup_continuation`: the tokens that followed the latest
earlier occurrence of the newest n-gram of the row's prompt and answer) instead of by the heads.
It is verified in the same forward and competes with the heads' nodes for the deepest accepted
path, so greedy decoding stays lossless; a row without a match fills the chain with its root
token, which verification rejects unless it is right.

**Tree size by cost** (``adaptive``, on with greedy acceptance). A step that feeds N nodes costs
more than a 1-token step (barely on a GPU at batch 1, several times on a CPU or at large
batches), so each step uses the best-scoring part of the tree that pays: the nodes of an
``"auto"`` tree are grown in order of their score, so its first s nodes are themselves a tree, and
the engine's :class:`~leaplm.inference.cost.WidthChooser` picks s (1 to ``tree_size``; 1 is a
plain AR step) from the measured cost of an s-token forward and the tokens such steps have been
committing. With ``lookup``, the chain joins a step only when prompt lookup found a match for some
row, and such steps are sized by a chooser of their own. Greedy output is unchanged whatever the
size. An explicit ``tree`` list is always used whole.

**Hydra++ and Clover-2** heads carry a prefix decoder layer over the base's hidden states, with
its own cache. After each verification it runs over the accepted path only (the root and the
accepted nodes, each with the token that followed it: Clover-2 mixes that token in first), as
:func:`catch_up` appends positions to a draft's cache; its output at the newest drives the next
step's heads.

**Batches.** Rows advance independently; every row's cached tokens stay right-aligned against
the cache end (as left padding aligns prompts) by :func:`~leaplm.inference.engine.gather_cache_slots`,
which at the same time drops the rejected nodes. The kept root and path hold consecutive
positions, so every cached slot stays its position up to a per-row shift.

**Sliding windows** are measured in positions, as ``generate`` measures them: a node at depth d
sits in cache slot (cache end + its index in the tree), but the engine is told its depth
(``offsets``), so it sees the cached tokens within the window of position root + d, and its
ancestors. Greedy decoding stays lossless past the window, on the windowed layers of models that
mix windowed and full layers (Gemma 2/3) too. The Hydra++ prefix layer attends without a window,
in training as here.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch

from leaplm.inference.cost import candidate_widths, width_chooser
from leaplm.inference.decoders.jacobi import lookup_continuation
from leaplm.inference.engine import (
    DecoderError,
    DecodeResult,
    Engine,
    PromptBatch,
    TokenPicker,
    check_sampling,
    gather_cache_slots,
    keep_cache_tail,
    new_cache,
    register_decoder,
)
from leaplm.models.heads import DraftHeads, heads_of

# Medusa's typical-acceptance defaults (posterior_threshold, posterior_alpha).
TYPICAL_EPSILON, TYPICAL_DELTA = 0.09, 0.3


# ----- Answers and cache bookkeeping shared with the speculative decoder ----------------------


class Answers:
    """New tokens per row, appended as a decoder commits them; a row ends at a stop token or the budget."""

    def __init__(self, engine: Engine, batch: PromptBatch, max_new_tokens: int, spare: int):
        b, device = batch.size, engine.device
        self.engine, self.max_new_tokens = engine, max_new_tokens
        self.tokens = torch.full((b, max_new_tokens + spare), engine.pad_token_id, dtype=torch.long, device=device)
        self.count = torch.zeros(b, dtype=torch.long, device=device)  # [b] tokens written
        self.lengths = torch.zeros(b, dtype=torch.long, device=device)  # [b] final lengths
        self.unfinished = torch.ones(b, dtype=torch.bool, device=device)  # [b]
        self.row_forwards = torch.ones(b, dtype=torch.long, device=device)  # [b] the prefill
        self.forwards = 1

    def commit(self, new: torch.Tensor, n: torch.Tensor) -> None:
        """Append the first ``n[b]`` tokens of ``new`` [b, w] to each unfinished row."""
        w = new.shape[1]
        n = torch.where(self.unfinished, n, 0)  # [b]
        valid = torch.arange(w, device=new.device)[None] < n[:, None]  # [b, w]
        columns = (self.count[:, None] + torch.arange(w, device=new.device)).clamp(max=self.tokens.shape[1] - 1)
        self.tokens.scatter_(1, columns, torch.where(valid, new, self.tokens.gather(1, columns)))
        stops = self.engine.is_stop(new) & valid  # [b, w]
        stopped = stops.any(-1)  # [b]
        end = torch.where(stopped, self.count + stops.long().argmax(-1) + 1, self.count + n)  # [b]
        self.count += n
        done = self.unfinished & (stopped | (self.count >= self.max_new_tokens))
        self.lengths = torch.where(done, end.clamp(max=self.max_new_tokens), self.lengths)
        self.unfinished &= ~done

    def stepped(self) -> None:
        """Count one more forward, for every row that is still unfinished."""
        self.forwards += 1
        self.row_forwards += self.unfinished

    def result(self) -> DecodeResult:
        return DecodeResult(self.tokens[:, :self.max_new_tokens], self.lengths, self.forwards, self.row_forwards)


def real_slots(cached: torch.Tensor, length: int) -> torch.Tensor:
    """[b, length] True on the slots holding a row's real tokens (right-aligned against the end)."""
    return torch.arange(length, device=cached.device)[None] >= length - cached[:, None]


def keep_new_slots(caches: list, context: int, kept: torch.Tensor, counts: torch.Tensor) -> None:
    """After a forward of new tokens on top of ``context`` slots, keep in each row the new slots
    ``kept[b, :counts[b]]`` (indices among the new ones, in order) right after its cached tokens,
    and right-align every row again. Rows with ``counts = 0`` keep nothing new."""
    grown = int(counts.max())
    if bool((counts == grown).all()):  # nothing to re-align: move the kept slots, leave the rest
        for cache in caches:
            keep_cache_tail(cache, context, context + kept[:, :grown])
        return
    length = context + grown
    j = torch.arange(length, device=kept.device)[None]  # [1, length]
    start = length - counts[:, None]  # [b, 1] where the row's kept new tokens begin
    shifted = j - (grown - counts[:, None])  # old slot that moves to j
    pick = kept.gather(1, (j - start).clamp(0, kept.shape[1] - 1))  # [b, length]
    source = torch.where(j >= start, context + pick, shifted)
    for cache in caches:
        gather_cache_slots(cache, source)


def catch_up(run, cache, cached: torch.Tensor, counts: torch.Tensor, width: int) -> torch.Tensor:
    """Append the first ``counts[b]`` of ``width`` new positions to a draft's ``cache`` (whose rows
    hold ``cached[b]`` real tokens, right-aligned; grown in place), causally after them.
    ``run(allowed)`` runs the draft's forward of the new positions with the mask ``allowed``
    [b, width, cache + width] (True = may attend; a padded position sees itself only) and returns its
    outputs [b, width, H], whose keys and values join ``cache``. Returns each row's output at its
    newest real position [b, H] (a row with ``counts = 0``: unused)."""
    b, device = counts.shape[0], counts.device
    context = cache.get_seq_length()
    new = torch.arange(width, device=device)[None] < counts[:, None]  # [b, w] real new slots
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    allowed = torch.cat([real_slots(cached, context)[:, None].expand(-1, width, -1),
                         causal[None] & new[:, None, :]], -1)  # [b, w, ctx + w]
    allowed[:, :, context:] |= torch.eye(width, dtype=torch.bool, device=device)[None]
    out = run(allowed)  # [b, w, H]
    keep_new_slots([cache], context, torch.arange(width, device=device)[None].expand(b, -1), counts)
    cached += counts
    return out[torch.arange(b, device=device), (counts - 1).clamp(min=0)]


# ----- Trees --------------------------------------------------------------------------------


@dataclass
class Tree:
    """A sparse candidate tree; node 0 is the root, the heads' nodes sorted by depth, then the
    ``lookup`` chain's nodes (depths 1..lookup, each the child of the one before)."""

    paths: list[tuple[int, ...]]  # rank path of each heads' node; () for the root
    parent: torch.Tensor  # [N] parent node (0 for the root)
    depth: torch.Tensor  # [N]
    rank: torch.Tensor  # [N] rank of the node's token among its head's predictions (0 on the chain)
    ancestors: torch.Tensor  # [N, N] bool: column j is node i itself or one of its ancestors
    path_nodes: torch.Tensor  # [N, D + 1] the nodes from the root to node i, padded with node i
    # per head depth d = 1..len(levels): (its nodes [c], their distinct parents [P], each node's parent among them [c])
    levels: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    lookup: int = 0  # prompt-lookup chain nodes, after the heads' nodes

    @property
    def heads_size(self) -> int:
        """Nodes the heads draft, root included: the chain starts here."""
        return len(self.paths)

    @property
    def size(self) -> int:
        return len(self.paths) + self.lookup

    @property
    def max_depth(self) -> int:
        return max(max(len(p) for p in self.paths), self.lookup)

    def to(self, device) -> Tree:
        return Tree(self.paths, *(t.to(device) for t in (self.parent, self.depth, self.rank, self.ancestors,
                                                          self.path_nodes)),
                    [tuple(t.to(device) for t in level) for level in self.levels], self.lookup)


def make_tree(paths: list[list[int]] | list[tuple[int, ...]], num_heads: int, lookup: int = 0) -> Tree:
    """The tree of ``paths`` (rank lists), with every missing prefix added, plus a chain of
    ``lookup`` nodes under the root for prompt-lookup tokens."""
    nodes = {()}
    for path in paths:
        path = tuple(int(r) for r in path)
        if not path or len(path) > num_heads or min(path) < 0:
            raise DecoderError(f"tree path {list(path)} must hold 1 to {num_heads} ranks (one per head), each >= 0")
        nodes.update(path[:d] for d in range(1, len(path) + 1))
    ordered = sorted(nodes, key=lambda p: (len(p), p))
    index = {p: i for i, p in enumerate(ordered)}
    h = len(ordered)
    # Each node's chain of nodes from the root: the heads' by rank prefix, the lookup chain's in a line.
    chains = [[index[p[:d]] for d in range(len(p) + 1)] for p in ordered]
    chains += [[0] + list(range(h, h + d)) for d in range(1, lookup + 1)]
    n, depth = len(chains), max(len(c) for c in chains) - 1
    parent = torch.tensor([c[-2] if len(c) > 1 else 0 for c in chains])
    ancestors = torch.zeros(n, n, dtype=torch.bool)
    path_nodes = torch.zeros(n, depth + 1, dtype=torch.long)
    for i, chain in enumerate(chains):
        ancestors[i, chain] = True
        path_nodes[i] = torch.tensor(chain + [i] * (depth + 1 - len(chain)))
    depths = torch.tensor([len(c) - 1 for c in chains])
    levels = []  # the heads' nodes only: Hydra calls its heads per level, the chain needs no head
    for d in range(1, max(len(p) for p in ordered) + 1):
        nodes = (depths[:h] == d).nonzero().squeeze(1)
        parents, slot = torch.unique(parent[nodes], return_inverse=True)
        levels.append((nodes, parents, slot))
    rank = torch.tensor([p[-1] if p else 0 for p in ordered] + [0] * lookup)
    return Tree(ordered, parent, depths, rank, ancestors, path_nodes, levels, lookup)


def grow_tree(accuracy: torch.Tensor, size: int) -> list[tuple[int, ...]]:
    """The ``size - 1`` non-root paths with the highest product of rank accuracies, grown greedily.

    ``accuracy`` [heads, ranks]: the chance that head k's rank-r token is right. A path's score
    is the product along it, so a child never outscores its parent and the best paths form a tree.
    """
    heads, ranks = accuracy.shape
    acc = accuracy.clamp(min=1e-6).tolist()
    frontier = [(-acc[0][r], (r,)) for r in range(ranks)]
    heapq.heapify(frontier)
    chosen: list[tuple[int, ...]] = []
    while frontier and len(chosen) < size - 1:
        score, path = heapq.heappop(frontier)
        chosen.append(path)
        if len(path) < heads:
            for r in range(ranks):
                heapq.heappush(frontier, (score * acc[len(path)][r], path + (r,)))
    return chosen


def default_accuracy(num_heads: int, ranks: int) -> torch.Tensor:
    """Rank accuracies for heads that have none recorded: Medusa's Vicuna-7B top-1 (0.56, 0.32,
    0.20, 0.15, 0.12 for heads 0-4), halving with each rank."""
    top1 = torch.tensor([0.56, 0.32, 0.20, 0.15, 0.12] + [0.1] * max(0, num_heads - 5))[:num_heads]
    return top1[:, None] * 0.5 ** torch.arange(ranks)[None]


def auto_paths(accuracy: torch.Tensor, tree_size: int) -> list[tuple[int, ...]]:
    """The ``"auto"`` tree's non-root paths, best first (so every prefix of them is a tree), from a
    drafter's measured rank ``accuracy`` [depths, ranks] (all zeros: none recorded)."""
    if not isinstance(tree_size, int) or tree_size < 2:
        raise DecoderError(f"tree_size must be an integer >= 2 (root plus drafted nodes), got {tree_size!r}")
    accuracy = accuracy.float().cpu()
    if not bool(accuracy.any()):
        accuracy = default_accuracy(*accuracy.shape)
    return grow_tree(accuracy, tree_size)


def choose_tree(accuracy: torch.Tensor, tree: Any, tree_size: int, lookup: int = 0) -> Tree:
    """The tree a step uses: ``"auto"`` grown from ``accuracy`` [depths, ranks], or a list of rank paths."""
    k = accuracy.shape[0]
    if tree == "auto":
        return make_tree(auto_paths(accuracy, tree_size), k, lookup)
    if not isinstance(tree, (list, tuple)) or not tree or not all(isinstance(p, (list, tuple)) for p in tree):
        raise DecoderError(f"tree must be 'auto' or a list of rank paths such as [[0], [0, 0], [1]], got {tree!r}")
    return make_tree(tree, k, lookup)


# ----- Candidates ---------------------------------------------------------------------------


def propose(heads: DraftHeads, embed, tree: Tree, hidden: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """Tokens [b, N] of the tree's nodes (column 0 the root) from hidden states ``hidden`` [b, H];
    the lookup chain's columns are left holding the root, for :meth:`LookupContexts.chain` to fill."""
    b, n, h = root.shape[0], tree.size, tree.heads_size
    tokens = root[:, None].expand(b, n).clone()  # [b, N]
    if h == 1:  # no heads' node: the root (and the lookup chain)
        return tokens
    max_rank = int(tree.rank[:h].max()) + 1
    if heads.kind == "medusa":
        top = torch.stack([heads.head(k, hidden).topk(max_rank, dim=-1).indices
                           for k in range(len(tree.levels))], dim=1)  # [b, D_heads, R]
        tokens[:, 1:h] = top[:, tree.depth[1:h] - 1, tree.rank[1:h]]
        return tokens
    for d, (nodes, parents, slot) in enumerate(tree.levels, 1):  # Hydra, Clover-2: one call per parent, on its path
        path = tokens[:, tree.path_nodes[parents, :d]]  # [b, P, d] root .. parent
        logits = heads.head(d - 1, hidden[:, None].expand(-1, len(parents), -1), embed(path))  # [b, P, V]
        top = logits.topk(max_rank, dim=-1).indices  # [b, P, R]
        tokens[:, nodes] = top[:, slot, tree.rank[nodes]]
    return tokens


class LookupContexts:
    """Per row, the prompt and the tokens committed so far (the root last), kept in Python for
    prompt lookup, which drafts a step's chain from them (``lookup=L``)."""

    def __init__(self, batch: PromptBatch, root: torch.Tensor):
        self.rows = [row[batch.width - int(n):].tolist() + [int(r)]
                     for row, n, r in zip(batch.input_ids, batch.lengths, root)]

    def chain(self, live: torch.Tensor, root: torch.Tensor, count: int) -> tuple[torch.Tensor, bool]:
        """Prompt-lookup tokens [b, count] for the chain: per live row, what followed the latest
        earlier occurrence of its context's newest n-gram; and whether any row found one. Slots
        without a match keep the row's root token; verification rejects them unless they happen to
        be right, so what fills them never matters."""
        chain = [[token] * count for token in root.tolist()]
        found_any = False
        for row in live.nonzero().squeeze(1).tolist():  # finished rows' chains are never committed
            found = lookup_continuation(self.rows[row], count)
            chain[row][:len(found)] = found
            found_any = found_any or bool(found)
        return torch.tensor(chain, dtype=torch.long, device=root.device), found_any

    def extend(self, new: torch.Tensor, counts: torch.Tensor) -> None:
        """Append each row's first ``counts[b]`` of ``new`` [b, D + 1]: the accepted path's tokens,
        then the bonus (the next root)."""
        for row, (row_new, count) in enumerate(zip(new.tolist(), counts.tolist())):
            self.rows[row] += row_new[:count]


@dataclass
class TreeSizes:
    """The trees a step may use, by forward width, and the engine's choosers between them: ``plain``
    for steps without the lookup chain, ``looked_up`` for steps where lookup found candidates."""

    plain: dict[int, Tree]
    looked_up: dict[int, Tree]
    plain_chooser: Any = None  # WidthChooser
    lookup_chooser: Any = None

    @property
    def largest(self) -> Tree:
        return max([*self.plain.values(), *self.looked_up.values()], key=lambda t: t.max_depth)

    @property
    def lookup(self) -> int:
        """Prompt-lookup chain nodes per step (0: none)."""
        return max((t.lookup for t in self.looked_up.values()), default=0)

    def to(self, device) -> TreeSizes:
        return TreeSizes({w: t.to(device) for w, t in self.plain.items()},
                         {w: t.to(device) for w, t in self.looked_up.items()}, self.plain_chooser, self.lookup_chooser)

    def pick(self, contexts: LookupContexts | None, live: torch.Tensor, root: torch.Tensor
             ) -> tuple[Tree, Any, int, torch.Tensor | None]:
        """This step's tree, the chooser that sized it (None: fixed), its width, and the lookup chain
        [b, L] when the step has one (``contexts`` given): the lookup trees and their chooser when
        prompt lookup found a match for some row, the plain ones otherwise."""
        trees, chooser, chain = self.plain, self.plain_chooser, None
        if contexts is not None:
            chain, found = contexts.chain(live, root, self.lookup)  # [b, L]
            if found or self.plain_chooser is None:  # fixed sizes: the whole tree, chain included
                trees, chooser = self.looked_up, self.lookup_chooser
        width = chooser.choose() if chooser is not None else next(iter(trees))
        return trees[width], chooser, width, chain


def fixed_sizes(tree: Tree) -> TreeSizes:
    """Always the whole tree (``adaptive`` off, or an explicit tree)."""
    return TreeSizes({tree.size: tree}, {tree.size: tree})


def tree_sizes(engine: Engine, batch: PromptBatch, max_new_tokens: int, key: tuple, paths: list[tuple[int, ...]],
               num_heads: int, lookup: int) -> TreeSizes:
    """Nested trees of an auto tree's first s nodes, s = 1 (the root alone: an AR step), 2, 4, ...,
    up to all of them; with ``lookup``, the same trees plus the chain, and the root alone."""
    by_size = {s: make_tree(paths[:s - 1], num_heads) if s > 1 else make_tree([], num_heads)
               for s in candidate_widths(len(paths) + 1)}
    plain = {t.size: t for t in by_size.values()}
    context = batch.width + max_new_tokens // 2
    sizes = TreeSizes(plain, {}, width_chooser(engine, key + ("plain",), list(plain), batch.size, context))
    if lookup:
        with_chain = [make_tree(t.paths[1:], num_heads, lookup) for t in by_size.values()]
        sizes.looked_up = {1: by_size[1], **{t.size: t for t in with_chain}}
        sizes.lookup_chooser = width_chooser(engine, key + ("lookup",), list(sizes.looked_up), batch.size, context)
    return sizes


# ----- The decoding loop -------------------------------------------------------------------


def tree_decode(engine: Engine, batch: PromptBatch, max_new_tokens: int, heads: DraftHeads, sizes: TreeSizes,
                pick: TokenPicker, typical: bool) -> DecodeResult:
    device, b = engine.device, batch.size
    sizes = sizes.to(device)
    embed = engine.model.get_input_embeddings()
    answers = Answers(engine, batch, max_new_tokens, spare=sizes.largest.max_depth + 2)
    cache = new_cache()
    prefix_cache = new_cache() if heads.prefix is not None else None

    out = engine.forward(batch.input_ids, cache, batch.position_ids, batch.attention_mask if batch.has_padding else None,
                         output_hidden_states=True)
    root = pick(out.logits[:, -1])  # [b]
    hidden = out.hidden_states[-1]  # [b, p, H]
    if prefix_cache is not None:
        p = batch.width
        allowed = (torch.ones(p, p, dtype=torch.bool, device=device).tril()[None]
                   & batch.attention_mask.bool()[:, None, :]) | torch.eye(p, dtype=torch.bool, device=device)
        following = torch.cat([batch.input_ids[:, 1:], root[:, None]], 1)  # [b, p] the token after each position
        hidden = heads.run_prefix(hidden, embed(following), batch.position_ids, allowed, prefix_cache)
        prefix_cached = batch.lengths.clone()  # [b] real tokens in the prefix layer's cache
    hidden = hidden[:, -1]  # [b, H] the state that predicted the root
    answers.commit(root[:, None], torch.ones_like(root))
    cached = batch.lengths.clone()  # [b] real tokens in the cache
    contexts = LookupContexts(batch, root) if sizes.lookup else None

    while answers.unfinished.any():
        context = cache.get_seq_length()
        tree, chooser, width, chain = sizes.pick(contexts, answers.unfinished, root)
        n, pattern = tree.size, tree.ancestors  # pattern [N, N]
        tokens = propose(heads, embed, tree, hidden, root)  # [b, N]
        if tree.lookup:
            tokens[:, tree.heads_size:] = chain
        positions = batch.lengths[:, None] + answers.count[:, None] - 1 + tree.depth[None]  # [b, N]
        real = torch.cat([real_slots(cached, context), torch.ones(b, n, dtype=torch.bool, device=device)], 1)
        allowed = Engine.mask_for_new_tokens(real, pattern)  # [b, N, context + N]
        # offsets: a node's window is measured from its position (root + depth), not from its slot
        out = engine.forward(tokens, cache, positions, custom_mask=allowed, offsets=tree.depth,
                             output_hidden_states=True)
        answers.stepped()
        logits, node_hidden = out.logits, out.hidden_states[-1]  # [b, N, V], [b, N, H]

        parent_logits = logits[:, tree.parent]  # [b, N, V] the distribution each node's token is checked against
        if typical:
            probs = pick.filtered_logits(parent_logits.flatten(0, 1)).softmax(-1).view_as(parent_logits)
            entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1)  # [b, N]
            p_token = probs.gather(-1, tokens[..., None]).squeeze(-1)  # [b, N]
            correct = p_token > torch.minimum(torch.full_like(entropy, TYPICAL_EPSILON),
                                              TYPICAL_DELTA * torch.exp(-entropy))
        else:
            correct = tokens == parent_logits.argmax(-1)
        correct[:, 0] = True  # the root is committed already
        on_path = ((~correct).float() @ pattern.T.float()) == 0  # [b, N] every node from the root on accepted
        best = (on_path * (tree.depth[None] + 1)).argmax(-1)  # [b] deepest such node (first in order on ties)
        accepted = tree.depth[best]  # [b] drafted tokens accepted
        if chooser is not None:
            chooser.observe(width, float((accepted + 1)[answers.unfinished].float().mean()))
        path = tree.path_nodes[best]  # [b, D + 1]
        rows = torch.arange(b, device=device)
        bonus = pick(logits[rows, best])  # [b]

        new = torch.cat([tokens.gather(1, path[:, 1:]), bonus[:, None]], 1)  # [b, D + 1]
        new.scatter_(1, accepted[:, None], bonus[:, None])  # the bonus right after the accepted path
        live = answers.unfinished.clone()
        answers.commit(new, accepted + 1)
        counts = torch.where(live, accepted + 1, 0)  # root and accepted nodes stay in the cache
        keep_new_slots([cache], context, path, counts)
        cached += counts
        if contexts is not None:
            contexts.extend(new, counts)
        if prefix_cache is not None:  # the root and accepted nodes, each with the token after it (`new`)
            path_hidden = node_hidden.gather(1, path[..., None].expand(-1, -1, node_hidden.shape[-1]))  # [b, D+1, H]
            path_positions = positions.gather(1, path)  # [b, D + 1]
            hidden = catch_up(lambda allowed: heads.run_prefix(path_hidden, embed(new), path_positions, allowed,
                                                               prefix_cache),
                              prefix_cache, prefix_cached, counts, path.shape[1])
        else:
            hidden = node_hidden[rows, best]
        root = bonus
    return answers.result()


def check_acceptance(acceptance: str = "greedy", temperature: float = 0.0) -> None:
    """Refuse an acceptance rule that does not fit the sampling temperature, naming the fix."""
    if acceptance not in ("greedy", "typical"):
        raise DecoderError(f"acceptance must be 'greedy' (lossless) or 'typical', got {acceptance!r}")
    if acceptance == "greedy" and temperature != 0:
        raise DecoderError("greedy acceptance is lossless for greedy decoding only; set temperature=0, "
                           "or acceptance='typical' to sample")
    if acceptance == "typical" and temperature == 0:
        raise DecoderError("typical acceptance samples: set temperature > 0 (Medusa uses 0.7)")


def check_lookup(lookup: int = 0) -> None:
    if isinstance(lookup, bool) or not isinstance(lookup, Integral) or lookup < 0:
        raise DecoderError(f"lookup must be an integer >= 0 (prompt-lookup tokens verified per step; 0 = off), "
                           f"got {lookup!r}")


def check_adaptive(adaptive: bool | None = None) -> None:
    if adaptive is not None and not isinstance(adaptive, bool):
        raise DecoderError(f"adaptive must be true or false (size each step's tree by its measured cost; unset: on "
                           f"with greedy acceptance), got {adaptive!r}")


def tree_decoder(kind: str, description: str):
    """The registered decoder for heads of ``kind``: ``medusa``, ``hydra`` and ``clover`` differ only
    in the heads they read (``models/heads.py``); tree, acceptance and sampling are shared."""

    def decode(engine: Engine, batch: PromptBatch, max_new_tokens: int, *, tree: Any = "auto", tree_size: int = 16,
               acceptance: str = "greedy", temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               seed: int = 0, lookup: int = 0, adaptive: bool | None = None) -> DecodeResult:
        heads = heads_of(engine.model, (kind,))
        check_acceptance(acceptance, temperature)
        check_lookup(lookup)
        check_adaptive(adaptive)
        pick = TokenPicker(engine.device, temperature, top_k, top_p, seed)
        if tree == "auto" and (acceptance == "greedy" if adaptive is None else adaptive):
            key = (kind, id(heads), tree_size, acceptance, temperature, top_k, top_p, lookup)
            sizes = tree_sizes(engine, batch, max_new_tokens, key, auto_paths(heads.accuracy, tree_size),
                               heads.config.num_heads, lookup)
        else:
            sizes = fixed_sizes(choose_tree(heads.accuracy, tree, tree_size, lookup))
        return tree_decode(engine, batch, max_new_tokens, heads, sizes, pick, typical=acceptance == "typical")

    decode.__name__ = decode.__qualname__ = kind
    decode.__doc__ = (f"{description} tree decoding with the model's {kind} heads (see the module docstring);\n"
                      "``lookup=L`` adds a chain of L prompt-lookup tokens to every step's tree.\n\n"
                      "Greedy (the default) equals ``ar`` and ``model.generate`` token for token.")
    return register_decoder(kind, checks=(check_sampling, check_acceptance, check_lookup, check_adaptive))(decode)


medusa = tree_decoder("medusa", "Medusa")
hydra = tree_decoder("hydra", "Hydra (and Hydra++)")
clover = tree_decoder("clover", "Clover-2")
