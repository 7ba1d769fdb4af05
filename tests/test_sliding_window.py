"""Parallel decoders on sliding-window models: greedy ``medusa`` and ``hydra`` (auto and wide trees,
Hydra++ with a prompt-lookup chain), ``speculative`` and verified ``block_diffusion`` (with and
without DualCache) equal generate token for token on sequences several windows long, in
left-padded batches and alone. A tree node at depth d, or a re-fed DualCache slot, sits in a later
cache slot than its position, so a window counted in slots would hide keys that generate shows
it; the engine's ``offsets`` count it in positions."""

from __future__ import annotations

import pytest
import torch
from test_block_diffusion_decoder import converted, decode, never_stopping
from test_draft_heads import prompts_of, with_heads

from leaplm.inference.decoders import block_diffusion as block_diffusion_decoding
from leaplm.inference.decoders import tree as tree_decoding
from leaplm.inference.engine import Engine, new_cache

WINDOW = 16
MAX_NEW = 64  # with the 21- to 43-token prompts, 5 to 7 windows
BLOCK_DIFFUSION_NEW = 48  # with the same prompts, 4 to 6 windows
WIDE = [[0], [1], [2], [3], [0, 0], [1, 0], [0, 1], [0, 0, 0]]  # four branches under the root


def branch_nodes_kept(monkeypatch) -> list[int]:
    """A one-element list counting the accepted nodes whose slot in the tree is not their depth:
    were none ever accepted, a window counted in slots would do no harm."""
    count = [0]
    keep = tree_decoding.keep_new_slots

    def recording(caches, context, kept, counts):
        depth = torch.arange(1, kept.shape[1], device=kept.device)  # [D] the depth of path column d
        count[0] += int(((kept[:, 1:] != depth) & (depth < counts[:, None])).sum())  # root and accepted only
        keep(caches, context, kept, counts)

    monkeypatch.setattr(tree_decoding, "keep_new_slots", recording)
    return count


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])  # gemma2/3 mix sliding and full layers
def test_tree_decoders_equal_generate_past_the_window(family, lively_tiny, monkeypatch):
    model, tokenizer = lively_tiny(family, scale=2.0, sliding_window=WINDOW)  # scale 2: varied answers
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)
    reference = engine.generate(prompts, "hf_generate", MAX_NEW).sequences
    assert min(len(p) + len(s) for p, s in zip(prompts, reference)) >= 4 * WINDOW
    assert all(len(set(s)) >= 10 for s in reference)
    branches = branch_nodes_kept(monkeypatch)
    try:
        for kind, prefix, settings in (("medusa", False, {}), ("medusa", False, dict(tree=WIDE)), ("hydra", False, {}),
                                       ("hydra", True, dict(tree=WIDE, lookup=4)), ("clover", True, dict(tree=WIDE))):
            with_heads(model, kind, prefix)
            assert engine.generate(prompts, kind, MAX_NEW, **settings).sequences == reference  # sized by cost
            branches[0] = 0
            out = engine.generate(prompts, kind, MAX_NEW, adaptive=False, **settings)  # the whole tree every step
            assert out.sequences == reference, (kind, prefix, settings)
            assert out.stats.tokens_per_forward > 1.0 and branches[0] > 0, (kind, prefix, settings)
            assert engine.generate(prompts[1:2], kind, MAX_NEW, **settings).sequences == reference[1:2]
    finally:
        del model.draft_heads
    # a chain verified in position order, the rows kept right-aligned: drafting for itself, every draft is accepted
    itself = engine.generate(prompts, "speculative", MAX_NEW, draft=model, draft_tokens=3, adaptive=False)
    assert itself.sequences == reference and itself.stats.tokens_per_forward > 3.0


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_a_window_counts_positions_whatever_order_tokens_are_fed_in(family, lively_tiny):
    """New tokens fed out of position order, with ``offsets`` saying where each belongs, get the
    logits of the same tokens fed in order; without them the window's edge moves."""
    model, tokenizer = lively_tiny(family, sliding_window=8)
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)[:2]  # longer than the window, of different lengths
    new = torch.tensor([[21, 22, 23, 24, 25], [31, 32, 33, 34, 35]])  # [b, s] in position order
    order = torch.tensor([3, 0, 4, 1, 2])  # fed token j is new token order[j]
    with torch.inference_mode():
        batch = engine.prepare(prompts, max_new_tokens=5)
        positions = batch.lengths[:, None] + torch.arange(5)[None]  # [b, s]
        real = torch.cat([batch.attention_mask, torch.ones(2, 5, dtype=torch.long)], dim=1)  # [b, p + s]
        causal = torch.ones(5, 5, dtype=torch.bool).tril()

        def run(tokens, at, pattern, **offsets):
            cache = new_cache()
            engine.forward(batch.input_ids, cache, batch.position_ids, batch.attention_mask)
            mask = engine.mask_for_new_tokens(real, pattern)  # [b, s, p + s]
            return engine.forward(tokens, cache, at, custom_mask=mask, **offsets).logits  # [b, s, V]

        in_order = run(new, positions, causal)
        fed = (new[:, order], positions[:, order], causal[order][:, order])
        back = order.argsort()  # fed column of each new token
        torch.testing.assert_close(run(*fed, offsets=order)[:, back], in_order, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(run(*fed)[:, back], in_order, atol=1e-4)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
def test_block_diffusion_dual_cache_equals_plain_past_the_window(family, monkeypatch):
    """A DualCache step re-feeds its sub-block after the cached block, ``block_size - start`` slots
    past the slots' positions. With the sub-block as wide as the block it computes exactly what the
    plain decoder's full-block step does, so the two must commit the same tokens in the same forwards
    (and, verified, equal generate) however far the sequence outgrows the window; counted in slots,
    it would lose the oldest keys of every window."""
    model, tokenizer = converted(family, block_size=4, sliding_window=WINDOW)
    engine = never_stopping(model, tokenizer)  # every row runs to the budget: 69 to 91 tokens
    prompts = prompts_of(tokenizer)
    want = engine.generate(prompts, "hf_generate", BLOCK_DIFFUSION_NEW).sequences
    refed = [0]
    refeed = block_diffusion_decoding.sub_block_forward

    def counting(*args, **kwargs):
        refed[0] += 1
        return refeed(*args, **kwargs)

    monkeypatch.setattr(block_diffusion_decoding, "sub_block_forward", counting)
    settings = dict(rule="top_k", top_k=2, fuse_commit_pass=False)  # two tokens per step; the same steps for both
    for verify in (False, True):
        settings["adaptive"] = False if verify else None  # every block denoised, so both take the same steps
        plain = decode(engine, prompts, BLOCK_DIFFUSION_NEW, verify=verify, **settings)
        refed[0] = 0
        dual = decode(engine, prompts, BLOCK_DIFFUSION_NEW, verify=verify, sub_block_cache=True, **settings)
        assert refed[0] > 0 and dual.tokens.tolist() == plain.tokens.tolist(), verify
        assert dual.forward_passes == plain.forward_passes, verify
        if verify:
            assert plain.tokens.tolist() == want
        else:
            assert plain.tokens.tolist() != want, "no step erred, so verification would check nothing"
    # small sub-blocks, fused commit passes: slot lo - 1's logit is carried, the fed slots sit 2 or 4 slots late
    small = dict(sub_block_size=2, sub_block_cache=True, verify=True, adaptive=False)  # every block denoised
    assert engine.generate(prompts, "block_diffusion", BLOCK_DIFFUSION_NEW, **small).sequences == want
    assert engine.generate(prompts[1:2], "block_diffusion", BLOCK_DIFFUSION_NEW, **small).sequences == want[1:2]
