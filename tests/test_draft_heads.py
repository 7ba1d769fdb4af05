"""Draft heads and their decoders: greedy ``medusa``/``hydra``/``clover`` (with and without the prompt-lookup
chain) and ``speculative`` equal generate on every tiny family, hand-built trees and cache
bookkeeping, speculative sampling against the exact distribution, heads saved and loaded back."""

from __future__ import annotations

import pytest
import torch

from leaplm.data.tasks import make_split
from leaplm.inference.decoders import speculative as speculative_module
from leaplm.inference.decoders import tree as tree_module
from leaplm.inference.decoders.speculative import draft_efficiency
from leaplm.inference.decoders.tree import grow_tree, keep_new_slots, make_tree
from leaplm.inference.engine import DecoderError, Engine, check_decoder_settings, new_cache
from leaplm.inference.evaluate import task_prompts
from leaplm.models.heads import DraftHeads, HeadsConfig, attach_heads, save_heads
from leaplm.models.zoo import TINY_FAMILIES, load_model

MAX_NEW = 24


def prompts_of(tokenizer) -> list[list[int]]:
    """Chat-formatted prompts of different lengths, so a batch needs left padding."""
    return task_prompts(tokenizer, [make_split(task, "test", 1)[0] for task in ("copy", "word", "sort")])


def with_heads(model, kind: str, prefix: bool = False, num_heads: int = 3) -> DraftHeads:
    config = HeadsConfig(kind=kind, num_heads=num_heads, hidden_size=model.config.hidden_size,
                         vocab_size=model.config.vocab_size, prefix_layer=prefix, shared_lm_head=kind == "clover")
    return attach_heads(model, DraftHeads(config, model))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_greedy_tree_and_speculative_equal_generate(family, lively_tiny):
    model, tokenizer = lively_tiny(family)
    draft, _ = lively_tiny("llama", scale=2.0)
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)
    reference = engine.generate(prompts, "hf_generate", MAX_NEW).sequences
    assert len({tuple(s) for s in reference}) > 1
    gained = 0.0
    try:
        # lookup=4 hangs a prompt-lookup chain deeper than the 3 heads from the root
        for kind, prefix, settings in (("medusa", False, {}), ("medusa", False, dict(tree=[[0, 0, 0], [1], [0, 1]])),
                                       ("medusa", False, dict(lookup=4)), ("hydra", False, {}),
                                       ("hydra", True, dict(tree_size=8)), ("hydra", True, dict(tree_size=8, lookup=4)),
                                       ("clover", True, dict(tree_size=8)), ("clover", True, dict(adaptive=False))):
            with_heads(model, kind, prefix)
            out = engine.generate(prompts, kind, MAX_NEW, **settings)
            assert out.sequences == reference, (kind, prefix, settings)
            assert engine.generate(prompts[1:2], kind, MAX_NEW, **settings).sequences == reference[1:2]
            gained = max(gained, out.stats.tokens_per_forward)
    finally:
        del model.draft_heads
    for settings in (dict(draft_tokens=4), dict(draft_tokens=1), dict(draft_tokens=4, adaptive=False)):
        assert engine.generate(prompts, "speculative", MAX_NEW, draft=draft, **settings).sequences == reference
    itself = engine.generate(prompts, "speculative", MAX_NEW, draft=model, draft_tokens=3, adaptive=False)
    assert itself.sequences == reference and itself.stats.tokens_per_forward > 3.0  # every draft accepted
    assert gained > 1.0, "no tree node was ever accepted; parity would be the AR case only"


class CycledWidths:
    """A stand-in for the engine's WidthChooser that cycles through every width it is offered, in
    a scrambled order, so each step size (the root alone too) meets each stage of a decode."""

    def __init__(self, widths):
        self.widths = sorted(set(widths) | {1})
        self.widths = self.widths[1::2] + self.widths[::2]
        self.step, self.seen = 0, []

    def choose(self) -> int:
        self.step += 1
        return self.widths[(self.step - 1) % len(self.widths)]

    def observe(self, k: int, tokens: float) -> None:
        self.seen.append((k, tokens))


def test_tree_sizes_never_change_greedy_output(lively_tiny, monkeypatch):
    """Adaptive trees: each step feeds the best-scoring first s nodes (s = 1 is an AR step), with
    the lookup chain only when lookup matched; greedy output stays generate's whatever the sizes."""
    model, tokenizer = lively_tiny("qwen2")
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)
    reference = engine.generate(prompts, "hf_generate", MAX_NEW).sequences
    choosers: list[CycledWidths] = []

    def cycled(engine, key, widths, batch_size, context):
        choosers.append(CycledWidths(widths))
        return choosers[-1]

    monkeypatch.setattr(tree_module, "width_chooser", cycled)
    try:
        for kind, prefix, settings in (("medusa", False, dict(tree_size=8)), ("hydra", True, dict(tree_size=8)),
                                       ("hydra", True, dict(tree_size=6, lookup=4)),
                                       ("clover", True, dict(tree_size=8))):
            with_heads(model, kind, prefix)
            choosers.clear()
            out = engine.generate(prompts, kind, MAX_NEW, adaptive=True, **settings)
            assert out.sequences == reference, (kind, settings)
            plain = choosers[0]
            assert plain.widths and {k for k, _ in plain.seen} == set(plain.widths), "a size went untried"
            assert all(tokens == 1.0 for k, tokens in plain.seen if k == 1)  # the root alone: an AR step
            if settings.get("lookup"):
                assert sorted(choosers[1].widths) == [1, 1 + 4, 2 + 4, 3 + 4, 4 + 4, 6 + 4] and choosers[1].seen
    finally:
        del model.draft_heads


def test_lookup_chain_is_accepted_where_the_answer_repeats_its_context(tiny):
    """The default-init tiny Qwen2 answers the word prompt with a 7-token cycle; with its own answer
    appended, the prompt repeats the pattern the model goes on with, so the lookup chain copies the
    continuation and is accepted. The untrained heads hardly ever are: the gain is the chain's."""
    model, tokenizer = tiny("qwen2")
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)[:2]
    prompts = [p + a for p, a in zip(prompts, engine.generate(prompts, "ar", 32).sequences)]
    reference = engine.generate(prompts, "hf_generate", 32).sequences
    try:
        for kind, prefix in (("medusa", False), ("hydra", True)):
            with_heads(model, kind, prefix)
            plain = engine.generate(prompts, kind, 32, adaptive=False)  # every node fed: the chain's gain alone
            chained = engine.generate(prompts, kind, 32, lookup=4, adaptive=False)
            assert plain.sequences == chained.sequences == reference, kind
            assert engine.generate(prompts[1:], kind, 32, lookup=4).sequences == reference[1:], kind
            assert chained.stats.tokens_per_forward > 1.5 * plain.stats.tokens_per_forward, kind
    finally:
        del model.draft_heads


def test_adaptive_speculative_equals_generate(lively_tiny):
    model, tokenizer = lively_tiny("qwen3")
    draft, _ = lively_tiny("llama", scale=2.0)
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)
    reference = engine.generate(prompts, "hf_generate", MAX_NEW).sequences
    config = HeadsConfig(kind="acceptance", num_heads=1, num_layers=1, hidden_size=draft.config.hidden_size)
    attach_heads(draft, DraftHeads(config))
    try:
        for threshold in (0.1, 0.9):
            out = engine.generate(prompts, "speculative", MAX_NEW, draft=draft, stop_threshold=threshold,
                                  min_draft=1, max_draft=6)
            assert out.sequences == reference
    finally:
        del draft.draft_heads


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "phi3"])
def test_draft_lengths_never_change_speculative_output(family, lively_tiny, monkeypatch):
    """Cost-sized speculative rounds: each round drafts width - 1 tokens (0: a plain target step,
    after which the draft has more committed tokens to catch up on); greedy output stays
    generate's whatever the lengths, in a padded batch and alone, with and without a head."""
    model, tokenizer = lively_tiny(family)
    draft, _ = lively_tiny("llama", scale=2.0)
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)
    reference = engine.generate(prompts, "hf_generate", MAX_NEW).sequences
    choosers: list[CycledWidths] = []

    def cycled(engine, key, widths, batch_size, context, draft=None):
        choosers.append(CycledWidths(widths))
        return choosers[-1]

    monkeypatch.setattr(speculative_module, "width_chooser", cycled)
    config = HeadsConfig(kind="acceptance", num_heads=1, num_layers=1, hidden_size=draft.config.hidden_size)
    for settings in (dict(draft_tokens=4), dict(draft_tokens=5, stop_threshold=0.5, min_draft=1, max_draft=5)):
        if "stop_threshold" in settings:
            attach_heads(draft, DraftHeads(config))
        try:
            for batch, expected in ((prompts, reference), (prompts[1:2], reference[1:2])):
                choosers.clear()
                out = engine.generate(batch, "speculative", MAX_NEW, draft=draft, adaptive=True, **settings)
                assert out.sequences == expected, settings
                seen = {k for k, _ in choosers[0].seen}
                assert seen == set(range(1, 7)) - ({6} if "stop_threshold" not in settings else set()), seen
                assert all(tokens == 1.0 for k, tokens in choosers[0].seen if k == 1)
        finally:
            if "stop_threshold" in settings:
                del draft.draft_heads


def test_speculative_sampling_matches_the_target_distribution(lively_tiny):
    """Two new tokens of one prompt, drawn 3000 times in one batch: the second token comes through
    the acceptance rule (draft_tokens=1), and its frequencies match sum_t1 p(t1) p(t2 | t1)."""
    model, tokenizer = lively_tiny("llama")
    draft, _ = lively_tiny("qwen2")
    engine = Engine(model, tokenizer)
    prompt = prompts_of(tokenizer)[0]
    sampling = dict(temperature=1.0, top_k=3)
    out = engine.generate([prompt] * 3000, "speculative", 2, draft=draft, draft_tokens=1, seed=1, **sampling)
    seconds = torch.tensor([s[1] for s in out.sequences if len(s) == 2])
    with torch.no_grad():
        def probs(ids):
            logits = model(torch.tensor([ids])).logits[0, -1]
            top = logits.topk(3)
            return dict(zip(top.indices.tolist(), top.values.softmax(-1).tolist()))

        exact: dict[int, float] = {}
        for t1, p1 in probs(prompt).items():
            for t2, p2 in probs(prompt + [t1]).items():
                exact[t2] = exact.get(t2, 0.0) + p1 * p2
    assert len(seconds) == 3000 and set(seconds.tolist()) <= set(exact)
    for token, p in exact.items():
        assert abs(float((seconds == token).float().mean()) - p) < 0.03, (token, p)


def test_tree_from_paths_hand_checked():
    tree = make_tree([[1], [0, 0], [0, 1, 0]], num_heads=3)  # (0,) and (0,1) are added
    assert tree.paths == [(), (0,), (1,), (0, 0), (0, 1), (0, 1, 0)]
    assert tree.parent.tolist() == [0, 0, 0, 1, 1, 4]
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.rank.tolist() == [0, 0, 1, 0, 1, 0]
    assert tree.path_nodes[5].tolist() == [0, 1, 4, 5] and tree.path_nodes[2].tolist() == [0, 2, 2, 2]
    assert tree.ancestors[5].nonzero().squeeze(1).tolist() == [0, 1, 4, 5]
    assert tree.ancestors[3].nonzero().squeeze(1).tolist() == [0, 1, 3]
    with pytest.raises(DecoderError, match="1 to 3 ranks"):
        make_tree([[0, 0, 0, 0]], num_heads=3)


def test_tree_with_a_lookup_chain_hand_checked():
    tree = make_tree([[1], [0, 0]], num_heads=3, lookup=4)  # chain nodes 4-7 under the root, deeper than the heads
    assert tree.paths == [(), (0,), (1,), (0, 0)] and tree.heads_size == 4 and tree.size == 8
    assert tree.parent.tolist() == [0, 0, 0, 1, 0, 4, 5, 6]
    assert tree.depth.tolist() == [0, 1, 1, 2, 1, 2, 3, 4] and tree.max_depth == 4
    assert tree.path_nodes[7].tolist() == [0, 4, 5, 6, 7] and tree.path_nodes[3].tolist() == [0, 1, 3, 3, 3]
    assert tree.ancestors[6].nonzero().squeeze(1).tolist() == [0, 4, 5, 6]
    assert tree.ancestors[3].nonzero().squeeze(1).tolist() == [0, 1, 3]  # the heads' nodes never see the chain
    assert [level[0].tolist() for level in tree.levels] == [[1, 2], [3]]  # Hydra's head calls skip the chain


def test_grow_tree_takes_best_products():
    accuracy = torch.tensor([[0.6, 0.2], [0.5, 0.1]])
    # scores: (0)=.6 (1)=.2 (0,0)=.3 (0,1)=.06 (1,0)=.1 (1,1)=.02
    assert grow_tree(accuracy, 5) == [(0,), (0, 0), (1,), (1, 0)]


def cache_of_two_rows():
    """Two rows of 3 cached + 4 new slots, each slot's key and value its own number (row 1: 7-13)."""
    cache = new_cache()
    keys = torch.arange(2 * 7, dtype=torch.float).view(2, 1, 7, 1)
    cache.update(keys, keys.clone(), 0)
    return cache


def test_keep_new_slots_keeps_the_accepted_path_right_aligned():
    cache = cache_of_two_rows()
    keep_new_slots([cache], 3, torch.tensor([[0, 2, 3, 3], [0, 1, 1, 1]]), torch.tensor([3, 1]))
    row0, row1 = cache.layers[0].keys[0, 0, :, 0].tolist(), cache.layers[0].keys[1, 0, :, 0].tolist()
    assert row0 == [0, 1, 2, 3, 5, 6]  # cached 0-2, then new slots 0, 2, 3
    assert row1[-4:] == [7 + 0, 7 + 1, 7 + 2, 7 + 3]  # shifted right by 2, then its new slot 0


def test_keep_new_slots_with_equal_counts_moves_only_the_new_slots():
    cache = cache_of_two_rows()
    keep_new_slots([cache], 3, torch.tensor([[0, 3, 1, 1], [0, 1, 2, 2]]), torch.tensor([2, 2]))
    assert cache.get_seq_length() == 5
    assert cache.layers[0].keys[:, 0, :, 0].tolist() == [[0, 1, 2, 3, 6], [7, 8, 9, 10, 11]]
    assert cache.layers[0].values[:, 0, :, 0].tolist() == [[0, 1, 2, 3, 6], [7, 8, 9, 10, 11]]


def test_heads_save_and_load_back(tmp_path, tiny):
    model, tokenizer = tiny("llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    heads = with_heads(model, "hydra", prefix=True)
    try:
        with torch.no_grad():
            heads.accuracy[0, 0] = 0.5
        save_heads(heads, tmp_path)
        model.save_pretrained(tmp_path / "base")  # the heads stay out of the base's own files
        from safetensors.torch import load_file
        assert not any(k.startswith("draft_heads") for k in load_file(tmp_path / "base" / "model.safetensors"))
    finally:
        del model.draft_heads
    loaded, _ = load_model(str(tmp_path))
    assert loaded.draft_heads.kind == "hydra" and loaded.draft_heads.prefix is not None
    for (name, a), b in zip(heads.state_dict().items(), loaded.draft_heads.state_dict().values()):
        assert torch.equal(a, b), name


def test_decoder_errors(tiny):
    model, tokenizer = tiny("llama")
    engine = Engine(model, tokenizer)
    prompt = prompts_of(tokenizer)[:1]
    with pytest.raises(ValueError, match="needs medusa heads"):
        engine.generate(prompt, "medusa", 4)
    with pytest.raises(DecoderError, match="needs a draft model"):
        engine.generate(prompt, "speculative", 4)
    with_heads(model, "medusa")
    try:
        with pytest.raises(DecoderError, match="typical acceptance samples"):
            engine.generate(prompt, "medusa", 4, acceptance="typical")
        with pytest.raises(DecoderError, match="list of rank paths"):
            engine.generate(prompt, "medusa", 4, tree="wide")
        with pytest.raises(DecoderError, match="lookup must be an integer >= 0"):
            engine.generate(prompt, "medusa", 4, lookup=-1)
        sampled = engine.generate(prompt, "medusa", 8, acceptance="typical", temperature=0.7)
        assert 0 < len(sampled.sequences[0]) <= 8
    finally:
        del model.draft_heads


def test_lookup_setting_is_checked_before_any_model_loads():
    for bad in (-1, 2.5, True):
        with pytest.raises(DecoderError, match="lookup must be an integer >= 0"):
            check_decoder_settings("hydra", {"lookup": bad})
    check_decoder_settings("medusa", {"lookup": 4})


def test_draft_efficiency_counts_rejections(lively_tiny):
    model, tokenizer = lively_tiny("llama")
    draft, _ = lively_tiny("qwen2")
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)
    itself = draft_efficiency(engine, prompts, MAX_NEW, batch_size=2, draft=model, draft_tokens=3, adaptive=False)
    assert itself["rejected_per_token"] == 0 and itself["tokens_per_forward"] > 3
    other = draft_efficiency(engine, prompts, MAX_NEW, draft=draft, draft_tokens=3, adaptive=False)
    assert other["rejected_per_token"] > 0
    assert other["drafted_per_token"] == pytest.approx(3 / other["tokens_per_forward"], rel=0.2)


def test_draft_length_bench_compares_fixed_lengths_with_the_acceptance_head(lively_tiny, tmp_path):
    from leaplm.bench.draft_length import run_draft_length_bench

    model, tokenizer = lively_tiny("qwen3")
    draft, _ = lively_tiny("llama", scale=2.0)
    config = HeadsConfig(kind="acceptance", num_heads=1, num_layers=1, hidden_size=draft.config.hidden_size)
    attach_heads(draft, DraftHeads(config))
    try:
        rows = run_draft_length_bench(model, tokenizer, draft, [1, 3], [0.5], n=3, max_new_tokens=12,
                                      out_dir=tmp_path, command="leaplm bench-draft-length test")
    finally:
        del draft.draft_heads
    assert [r["sizing"] for r in rows] == ["fixed", "fixed", "head", "cost"]
    assert max(r["speed_vs_best_fixed"] for r in rows[:2]) == 1.0
    # one draft token per round: drafted per token is 1 / tokens per forward
    assert rows[0]["drafted_per_token"] == pytest.approx(1 / rows[0]["tokens_per_forward"], rel=0.2)
    assert all(0 <= r["rejected_per_token"] <= r["drafted_per_token"] for r in rows)
    assert "stop_threshold=0.5" in (tmp_path / "draft_length_bench.md").read_text()
