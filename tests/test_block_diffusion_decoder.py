"""The block_diffusion decoder: AR parity at block size 1, a dense no-cache reference, DualCache,
the commit rules, setting errors and stop handling."""

from __future__ import annotations

import copy

import pytest
import torch

from leaplm.data.tasks import make_split
from leaplm.inference.decoders.block_diffusion import block_diffusion, select_commits, sub_block_forward
from leaplm.inference.engine import DecoderError, Engine, new_cache
from leaplm.inference.evaluate import task_prompts
from leaplm.models.block_diffusion import convert, spec_of
from leaplm.models.zoo import TINY_CONFIGS, TINY_FAMILIES, build_from_config, load_model, tiny_model

MAX_NEW = 20


def lively(model: torch.nn.Module, scale: float = 3.0, seed: int = 0) -> torch.nn.Module:
    """Re-draw the layer weights larger, so a random model's predictions depend on its input and
    its confidences spread out (at the default init they are all about 1/vocab)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale / param.shape[-1] ** 0.5)
    return model


def converted(family: str = "llama", block_size: int = 4, clean_attention: str = "causal", **config):
    """A lively random tiny block-diffusion model and its tokenizer (a private copy: convert adds
    the mask token to it); ``config`` overrides the family's tiny config."""
    model, tokenizer = tiny_model(family)
    tokenizer = copy.deepcopy(tokenizer)
    if config:
        model = build_from_config(dict(TINY_CONFIGS[family], **config), tokenizer).eval()
    convert(lively(model), tokenizer, block_size, clean_attention)
    return model, tokenizer


def prompts_of(tokenizer, n: int = 3) -> list[list[int]]:
    """Chat-formatted task prompts of different lengths, so a batch needs left padding."""
    examples = [make_split(task, "test", 1)[0] for task in ("copy", "word", "sort")[:n]]
    prompts = task_prompts(tokenizer, examples)
    assert len({len(p) for p in prompts}) == len(prompts)
    return prompts


def never_stopping(model, tokenizer) -> Engine:
    """An engine whose only stop token is the mask token, which an argmax never picks (its output
    row is the mean of the others): rows run to max_new_tokens, so step counts are predictable."""
    return Engine(model, tokenizer, stop_token_ids=[spec_of(model).mask_token_id])


def decode(engine: Engine, prompts: list[list[int]], max_new_tokens: int = MAX_NEW, **settings):
    """Call the decoder directly, for the per-row forward counts that ``generate`` sums away."""
    with torch.inference_mode():
        return block_diffusion(engine, engine.prepare(prompts, max_new_tokens), max_new_tokens, **settings)


def count_fed_tokens(model) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """A running count of the tokens fed to ``model`` (``fed[0]``) and the hook's handle."""
    fed = [0]

    def hook(module, args, kwargs):
        fed[0] += kwargs["input_ids"].numel()

    return fed, model.register_forward_pre_hook(hook, with_kwargs=True)


# ----- Block size 1 is AR -------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_block_size_one_equals_ar_and_hf_generate(family):
    model, tokenizer = converted(family, block_size=4)
    prompts = prompts_of(tokenizer)
    engine = Engine(model, tokenizer)
    ours = engine.generate(prompts, "block_diffusion", MAX_NEW, block_size=1)
    ar = engine.generate(prompts, "ar", MAX_NEW)
    assert ours.sequences == ar.sequences
    assert ours.sequences == engine.generate(prompts, "hf_generate", MAX_NEW).sequences
    assert len({tuple(s) for s in ours.sequences}) == len(prompts), "rows should differ; parity would be trivial"
    assert ours.stats.tokens_per_forward == 1.0
    assert ours.stats.forward_passes == ar.stats.forward_passes
    result = decode(engine, prompts, block_size=1)
    assert result.row_forwards.tolist() == result.lengths.tolist()  # one forward per token in every row


def test_block_size_one_equals_ar_with_block_causal_clean_attention():
    model, tokenizer = converted("llama", clean_attention="block_causal")
    prompts = prompts_of(tokenizer)
    engine = Engine(model, tokenizer)
    ours = engine.generate(prompts, "block_diffusion", MAX_NEW, block_size=1)
    assert ours.sequences == engine.generate(prompts, "ar", MAX_NEW).sequences


# ----- The cached decoder against a dense, cache-free reference ------------------------------


def dense_reference(model, prompt: list[int], max_new_tokens: int, stop_ids: list[int], block_size: int,
                    sub_block_size: int, dual_cache: bool = False, **rule) -> tuple[list[int], int]:
    """The decoder's semantics for one row, written the slow way: every model call recomputes
    ``[prompt, finished blocks, current block]`` from scratch under one dense mask.

    ``dual_cache`` adds the one DualCache approximation that survives in a one-layer model: slot
    a, the first of the sub-block, is predicted by slot a-1's logit from the sub-block's first
    step. (With one layer, K/V depend only on token and position, so the kept K/V of the
    block's other slots, which do not change during a sub-block, are exact.)
    Returns the new tokens and the most tokens any one step committed."""
    spec = spec_of(model)

    def logits_of(seq: list[int], noisy_from: int | None) -> torch.Tensor:
        """Logits [n, v] of ``seq``; from ``noisy_from`` on it is the block being denoised."""
        idx = torch.arange(len(seq))
        block = torch.where(idx < len(prompt), -1, (idx - len(prompt)) // block_size)  # [n]
        allowed = idx[None, :] <= idx[:, None]  # [n, n] causal
        if spec.clean_attention == "block_causal":
            allowed |= (block[:, None] == block[None, :]) & (block[:, None] >= 0)
        if noisy_from is not None:
            allowed[noisy_from:, noisy_from:] = True  # bidirectional inside the noisy block
        out = model(input_ids=torch.tensor([seq]), position_ids=idx[None], attention_mask=allowed[None, None])
        return out.logits[0]

    def ended(block: list[int], committed: list[bool]) -> bool:
        prefix = committed.index(False) if False in committed else block_size
        return all(committed) or any(t in stop_ids for t in block[:prefix])

    out: list[int] = []
    widest = 0
    first = int(logits_of(prompt, None)[-1].argmax())
    while True:
        block = [first] + [spec.mask_token_id] * (block_size - 1)
        committed = [True] + [False] * (block_size - 1)
        carried = None  # (sub-block start a, slot a-1's logit at the sub-block's first step)
        while not ended(block, committed):
            lo = committed.index(False) // sub_block_size * sub_block_size
            logits = logits_of(prompt + out + block, len(prompt) + len(out))[-block_size:]  # [B, v]
            if dual_cache and (carried is None or carried[0] != lo):
                carried = (lo, logits[lo - 1].clone())
            elif dual_cache and lo > 0:
                logits[lo - 1] = carried[1]
            probs = logits[:-1].softmax(-1)  # [B - 1, v] predictions for slots 1 .. B-1
            confidence, predicted = probs.max(-1)
            entropy = torch.special.entr(probs).sum(-1)
            open_slots = torch.tensor([not c and lo <= j < lo + sub_block_size
                                       for j, c in enumerate(committed)][1:])
            chosen = select_commits(confidence[None], entropy[None], open_slots[None], **rule)[0]
            widest = max(widest, int(chosen.sum()))
            for j in chosen.nonzero().flatten().tolist():
                block[j + 1], committed[j + 1] = int(predicted[j]), True
        out += block
        stops = [i for i, t in enumerate(out) if t in stop_ids]
        if stops:
            return out[: min(stops[0] + 1, max_new_tokens)], widest
        if len(out) >= max_new_tokens:
            return out[:max_new_tokens], widest
        first = int(logits_of(prompt + out, None)[-1].argmax())


REFERENCE_CASES = [
    # family, block size, sub-block size, clean attention, rows, rule settings
    ("llama", 4, 4, "causal", 1, dict(rule="top_k", top_k=2)),
    ("llama", 4, 4, "causal", 3, dict(rule="threshold", threshold=0.25)),
    ("llama", 4, 4, "block_causal", 1, dict(rule="threshold", threshold=0.25)),
    ("llama", 4, 4, "block_causal", 3, dict(rule="top_k", top_k=2)),
    ("qwen3", 8, 8, "causal", 1, dict(rule="threshold", threshold=0.2)),
    ("qwen3", 8, 8, "causal", 3, dict(rule="top_k", top_k=2)),
    ("llama", 8, 8, "block_causal", 1, dict(rule="top_k", top_k=3)),
    ("llama", 8, 8, "block_causal", 3, dict(rule="threshold", threshold=0.2)),
    ("llama", 8, 4, "causal", 3, dict(rule="factor", factor=2.0)),
    ("qwen3", 8, 2, "block_causal", 3, dict(rule="entropy", entropy_bound=3.0)),
]


@pytest.mark.parametrize("family,block_size,sub_block_size,clean_attention,rows,rule", REFERENCE_CASES)
def test_cached_decoder_equals_dense_reference(family, block_size, sub_block_size, clean_attention, rows, rule):
    model, tokenizer = converted(family, block_size, clean_attention)
    prompts = prompts_of(tokenizer, rows)
    engine = Engine(model, tokenizer)
    out = engine.generate(prompts, "block_diffusion", MAX_NEW, sub_block_size=sub_block_size, **rule)
    with torch.inference_mode():
        expected, widest = zip(*(dense_reference(model, p, MAX_NEW, engine.stop_token_ids, block_size,
                                                 sub_block_size, **rule) for p in prompts))
    assert out.sequences == list(expected)
    assert max(widest) > 1, "no step committed several tokens; the case would not test parallel commits"


def test_a_longer_budget_extends_the_output():
    model, tokenizer = converted("llama", block_size=4)
    engine = never_stopping(model, tokenizer)
    prompts = prompts_of(tokenizer)
    short = engine.generate(prompts, "block_diffusion", 6, rule="top_k", top_k=2)
    long = engine.generate(prompts, "block_diffusion", 13, rule="top_k", top_k=2)
    assert [len(s) for s in short.sequences] == [6] * 3 and [len(s) for s in long.sequences] == [13] * 3
    assert [s[:6] for s in long.sequences] == short.sequences


# ----- DualCache -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_sub_block_forward_reproduces_the_full_block_forward(family):
    """Fed unchanged tokens, a DualCache step must give the full-block logits of its slots (its
    mask and positions are right) and leave the kept block K/V as it was."""
    model, tokenizer = converted(family, block_size=8)
    engine = Engine(model, tokenizer)
    mask_id = spec_of(model).mask_token_id
    with torch.inference_mode():
        batch = engine.prepare(prompts_of(tokenizer), max_new_tokens=8)
        block = torch.tensor([[11, 12, mask_id, 14, mask_id, mask_id, 17, mask_id]] * 3)  # [b, B]
        positions = batch.lengths[:, None] + torch.arange(8)[None]  # [b, B]
        visible = torch.cat([batch.attention_mask.bool(), torch.ones(3, 8 + 4, dtype=torch.bool)], dim=1)
        cache = new_cache()
        engine.forward(batch.input_ids, cache, batch.position_ids, batch.attention_mask)
        context = cache.get_seq_length()
        full = engine.forward(block, cache, positions,
                              custom_mask=engine.mask_for_new_tokens(visible[:, : context + 8],
                                                                     torch.ones(8, 8, dtype=torch.bool))).logits
        kept = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        fed = sub_block_forward(engine, cache, block, positions, visible, context, 4, 8)
        torch.testing.assert_close(fed, full[:, 4:8], rtol=1e-4, atol=1e-4)
        assert cache.get_seq_length() == context + 8
        for layer, (keys, values) in zip(cache.layers, kept):
            assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


@pytest.mark.parametrize("block_size,sub_block_size,rule", [
    (4, 4, dict(rule="threshold", threshold=1.0)),  # one sub-block: every DualCache step refeeds the block
    (8, 8, dict(rule="top_k", top_k=2)),  # the same, with several commits per step
    (8, 2, dict(rule="top_k", top_k=2)),  # each sub-block ends in its first step, a full-block forward
])
def test_dual_cache_equals_plain_where_it_must(block_size, sub_block_size, rule):
    model, tokenizer = converted("llama", block_size)
    engine = never_stopping(model, tokenizer)
    prompts = prompts_of(tokenizer)
    fed, handle = count_fed_tokens(model)
    rule = dict(rule, fuse_commit_pass=False)  # its batch-wide guess rule would change the step counts
    try:
        plain = engine.generate(prompts, "block_diffusion", MAX_NEW, sub_block_size=sub_block_size, **rule)
        plain_fed, fed[0] = fed[0], 0
        dual = engine.generate(prompts, "block_diffusion", MAX_NEW, sub_block_size=sub_block_size,
                               sub_block_cache=True, **rule)
    finally:
        handle.remove()
    assert dual.sequences == plain.sequences
    assert dual.stats.forward_passes == plain.stats.forward_passes
    assert fed[0] == plain_fed  # a sub-block as wide as the block, or a sub-block done in its full-block step


@pytest.mark.parametrize("rule", [dict(rule="top_k", top_k=1), dict(rule="entropy", entropy_bound=2.0)])
def test_dual_cache_equals_its_reference_on_a_one_layer_model(rule):
    model, tokenizer = converted("llama", block_size=8, num_hidden_layers=1)
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)
    settings = dict(sub_block_size=4, **rule)
    dual = engine.generate(prompts, "block_diffusion", 40, sub_block_cache=True, **settings)
    with torch.inference_mode():
        expected = [dense_reference(model, p, 40, engine.stop_token_ids, 8, dual_cache=True, **settings)[0]
                    for p in prompts]
    assert dual.sequences == expected
    plain = engine.generate(prompts, "block_diffusion", 40, **settings)
    assert dual.sequences != plain.sequences, "the carried logit changed nothing; the case tests too little"


def test_dual_cache_with_small_sub_blocks_runs_and_feeds_fewer_tokens():
    model, tokenizer = converted("llama", block_size=8)
    engine = never_stopping(model, tokenizer)
    prompts = prompts_of(tokenizer)
    fed, handle = count_fed_tokens(model)
    rule = dict(rule="top_k", top_k=1, fuse_commit_pass=False)  # so both take the same steps
    try:
        plain = engine.generate(prompts, "block_diffusion", MAX_NEW, sub_block_size=4, **rule)
        plain_fed, fed[0] = fed[0], 0
        dual = engine.generate(prompts, "block_diffusion", MAX_NEW, sub_block_size=4, sub_block_cache=True, **rule)
    finally:
        handle.remove()
    vocab = model.get_input_embeddings().weight.shape[0]
    mask_id = spec_of(model).mask_token_id
    for seq, plain_seq in zip(dual.sequences, plain.sequences):
        assert len(seq) == MAX_NEW and all(0 <= t < vocab and t != mask_id for t in seq)
        assert seq[0] == plain_seq[0]  # slot 0 of block 0 comes from the prefill in both
    # One token per step either way, so the same steps; DualCache feeds a sub-block, not the block.
    assert dual.stats.forward_passes == plain.stats.forward_passes
    assert fed[0] < plain_fed
    # Rows of a padded batch decode as they would alone.
    for prompt, seq in zip(prompts, dual.sequences):
        alone = engine.generate([prompt], "block_diffusion", MAX_NEW, sub_block_size=4, sub_block_cache=True, **rule)
        assert alone.sequences == [seq]


# ----- The fused commit pass ------------------------------------------------------------------


@pytest.mark.parametrize("family,clean_attention,sub_block_size,sub_block_cache,rule", [
    ("llama", "causal", 4, False, dict(rule="threshold", threshold=0.25)),
    ("qwen3", "block_causal", 4, False, dict(rule="top_k", top_k=2)),
    ("gemma2", "causal", 2, False, dict(rule="entropy", entropy_bound=3.0)),
    ("llama", "block_causal", 2, True, dict(rule="top_k", top_k=1)),
    ("gemma2", "causal", 1, True, dict(rule="threshold", threshold=0.25)),
])
def test_fused_commit_pass_changes_no_token(family, clean_attention, sub_block_size, sub_block_cache, rule):
    """The speculative next-block step keeps a row's predictions only where they are what a
    separate step would compute, so outputs match the unfused decoder, alone and in a batch."""
    model, tokenizer = converted(family, block_size=4, clean_attention=clean_attention)
    engine = never_stopping(model, tokenizer)
    prompts = prompts_of(tokenizer)
    settings = dict(sub_block_size=sub_block_size, sub_block_cache=sub_block_cache, **rule)
    fused = decode(engine, prompts, 40, **settings)
    unfused = decode(engine, prompts, 40, fuse_commit_pass=False, **settings)
    assert fused.tokens.tolist() == unfused.tokens.tolist()
    assert (fused.row_forwards <= unfused.row_forwards).all()
    saved = int((unfused.row_forwards - fused.row_forwards).sum())
    for i, prompt in enumerate(prompts):
        alone = decode(engine, [prompt], 40, **settings)
        assert alone.tokens.tolist() == fused.tokens[i:i + 1].tolist()
        saved += int((decode(engine, [prompt], 40, fuse_commit_pass=False, **settings).row_forwards
                      - alone.row_forwards).sum())
    assert saved > 0, "no guess was ever right; the case would not test a kept fused step"


def test_fused_commit_pass_saves_a_forward_per_guessed_block():
    """On the shipped block-diffusion model the last noisy logit guesses the next block's slot 0
    well: copying, nearly every block after the first saves its separate commit pass."""
    model, tokenizer = load_model("tiny-teacher-bd")
    engine = Engine(model, tokenizer)
    prompts = task_prompts(tokenizer, make_split("copy", "test", 4))
    fused = decode(engine, prompts, 64, threshold=0.9)
    unfused = decode(engine, prompts, 64, threshold=0.9, fuse_commit_pass=False)
    assert fused.tokens.tolist() == unfused.tokens.tolist()
    blocks = (fused.lengths + 15) // 16  # [b] blocks each row wrote
    assert (unfused.row_forwards - fused.row_forwards >= blocks - 2).all()
    assert (blocks >= 2).all() and fused.forward_passes < unfused.forward_passes


# ----- Verified decoding ---------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("settings", [dict(rule="threshold", threshold=0.1), dict(rule="top_k", top_k=3, sub_block_size=2)])
def test_verified_decoding_equals_hf_generate(family, settings):
    """With ``verify`` every block is checked against the model's causal predictions, so even a
    careless commit rule on a random model gives exactly greedy AR decoding, alone and in a batch."""
    model, tokenizer = converted(family, block_size=4)
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)
    want = engine.generate(prompts, "hf_generate", MAX_NEW).sequences
    settings = dict(settings, adaptive=False)  # every block denoised: the verification is what is tested
    assert engine.generate(prompts, "block_diffusion", MAX_NEW, verify=True, **settings).sequences == want
    assert engine.generate(prompts[:1], "block_diffusion", MAX_NEW, verify=True, **settings).sequences == want[:1]
    unverified = engine.generate(prompts, "block_diffusion", MAX_NEW, **settings).sequences
    assert unverified != want, "the commit rule made no mistake to correct; the case tests too little"
    ragged = MAX_NEW - 3  # a budget that ends inside a block
    assert engine.generate(prompts, "block_diffusion", ragged, verify=True, **settings).sequences == [
        seq[:ragged] for seq in want]


class ScriptedBlocks:
    """A stand-in for the engine's WidthChooser: blocks in a fixed cycle of denoised (width B) and
    AR-written (width 1), so each kind follows each, and a fused step runs ahead of every block,
    those that then go AR included."""

    def __init__(self, block_size: int):
        self.cycle = [block_size, 1, 1, block_size, block_size, 1]
        self.cost = {1: 1.0, block_size: 2.0}
        self.step, self.seen, self.bailed = 0, [], 0
        self.asked = self.asked_in = 0  # overdue() calls in block step

    def choose(self) -> int:
        self.step += 1
        return self.cycle[(self.step - 1) % len(self.cycle)]

    def leaning_wide(self) -> bool:
        return True  # so a fused step also runs ahead of blocks that then go AR

    def overdue(self, k: int, steps: int = 1, done: float = 1.0) -> bool:
        assert 0.0 <= done <= 1.0
        # Every other denoised block is finished by AR steps after its second denoising step, when
        # it holds committed but unverified tokens.
        self.asked = self.asked + 1 if self.asked_in == self.step else 1
        self.asked_in = self.step
        late = self.step % 2 == 1 and self.asked > 2
        self.bailed += late
        return late

    def observe(self, k: int, tokens: float) -> None:
        self.seen.append((k, tokens))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("settings", [dict(threshold=0.1), dict(rule="top_k", top_k=3, sub_block_size=2,
                                                                 sub_block_cache=True), dict(fuse_commit_pass=False)])
def test_blocks_written_by_ar_steps_never_change_verified_output(family, settings, monkeypatch):
    """Cost-sized verified decoding writes some blocks with 1-token AR forwards instead of
    denoising them; the output stays generate's whichever blocks go which way, in a padded batch,
    alone, and with a budget that ends inside a block."""
    import leaplm.inference.decoders.block_diffusion as module

    model, tokenizer = converted(family, block_size=4)
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)
    want = engine.generate(prompts, "hf_generate", MAX_NEW).sequences
    choosers: list[ScriptedBlocks] = []

    def scripted(engine, key, widths, batch_size, context, burst=2):
        choosers.append(ScriptedBlocks(4))
        return choosers[-1]

    monkeypatch.setattr(module, "width_chooser", scripted)
    for batch, n, expected in ((prompts, MAX_NEW, want), (prompts[:1], MAX_NEW, want[:1]),
                               (prompts, MAX_NEW - 3, [seq[:MAX_NEW - 3] for seq in want])):
        out = engine.generate(batch, "block_diffusion", n, verify=True, **settings)
        assert out.sequences == expected, settings
        assert {k for k, _ in choosers[-1].seen} == {1, 4}, "a kind of block went untried"
        assert all(tokens > 0 for k, tokens in choosers[-1].seen if k == 4)
    assert sum(c.bailed for c in choosers) > 0, "no denoised block was finished by AR steps"


def test_verified_decoding_of_the_shipped_model_stops_where_generate_does():
    """Word problems, where the shipped model's unverified blocks go wrong: verified, the answers
    and their end-of-text stops are generate's, in a padded batch."""
    model, tokenizer = load_model("tiny-teacher-bd")
    engine = Engine(model, tokenizer)
    prompts = task_prompts(tokenizer, make_split("word", "test", 6))
    want = engine.generate(prompts, "hf_generate", 96).sequences
    assert engine.generate(prompts, "block_diffusion", 96, threshold=0.5, verify=True).sequences == want
    assert engine.generate(prompts, "block_diffusion", 96, threshold=0.5).sequences != want
    assert all(len(seq) < 96 and seq[-1] in engine.stop_token_ids for seq in want)


def test_verify_needs_causal_clean_attention():
    model, tokenizer = converted("llama", clean_attention="block_causal")
    with pytest.raises(DecoderError, match="verify=False"):
        Engine(model, tokenizer).generate(prompts_of(tokenizer, 1), "block_diffusion", MAX_NEW, verify=True)


# ----- Commit rules ------------------------------------------------------------------------


def rows(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float)


def test_threshold_rule():
    everything = torch.ones(1, 3, dtype=torch.bool)
    chosen = select_commits(rows([0.95, 0.5, 0.92]), None, everything, "threshold", threshold=0.9)
    assert chosen.tolist() == [[True, False, True]]
    # Nothing passes: the most confident slot is committed anyway.
    chosen = select_commits(rows([0.3, 0.6, 0.5]), None, everything, "threshold", threshold=0.9)
    assert chosen.tolist() == [[False, True, False]]
    # Committed slots and rows with nothing open are left alone; 1.0 means one slot per step.
    confidence = rows([0.95, 0.5, 0.92], [0.99, 0.98, 0.97], [0.9, 0.9, 0.9])
    open_slots = torch.tensor([[False, True, True], [True, True, True], [False, False, False]])
    assert select_commits(confidence, None, open_slots, "threshold", threshold=0.9).tolist() == [
        [False, False, True], [True, True, True], [False, False, False]]
    assert select_commits(confidence, None, open_slots, "threshold", threshold=1.0).tolist() == [
        [False, False, True], [True, False, False], [False, False, False]]


def test_entropy_rule():
    everything = torch.ones(2, 3, dtype=torch.bool)
    entropy = rows([0.2, 1.0, 0.6], [1.0, 0.7, 2.0])
    chosen = select_commits(rows([0, 0, 0], [0, 0, 0]), entropy, everything, "entropy", entropy_bound=0.5)
    assert chosen.tolist() == [[True, False, False], [False, True, False]]  # row 2: only the lowest entropy
    chosen = select_commits(rows([0, 0, 0], [0, 0, 0]), entropy, everything, "entropy", entropy_bound=1.0)
    assert chosen.tolist() == [[True, True, True], [True, True, False]]


def test_factor_rule():
    # Sorted: 0.9, 0.8, 0.7, 0.2 against 1 - 1/(i+1) = 0.5, 0.667, 0.75, 0.8: the first two pass, 0.7 fails.
    everything = torch.ones(1, 4, dtype=torch.bool)
    chosen = select_commits(rows([0.9, 0.7, 0.8, 0.2]), None, everything, "factor", factor=1.0)
    assert chosen.tolist() == [[True, False, True, False]]
    # A larger factor lowers every bar: 1 - 2/(i+1) = 0, 0.333, 0.5, 0.6 lets 0.9, 0.8, 0.7 through.
    chosen = select_commits(rows([0.9, 0.7, 0.8, 0.2]), None, everything, "factor", factor=2.0)
    assert chosen.tolist() == [[True, True, True, False]]
    # The run must be unbroken from the top; nothing passing still commits the best slot.
    chosen = select_commits(rows([0.4, 0.3, 0.35, 0.1]), None, everything, "factor", factor=1.0)
    assert chosen.tolist() == [[True, False, False, False]]
    # Closed slots are neither counted nor committed.
    open_slots = torch.tensor([[False, True, True, True]])
    chosen = select_commits(rows([0.99, 0.7, 0.8, 0.2]), None, open_slots, "factor", factor=1.0)
    assert chosen.tolist() == [[False, True, True, False]]


def test_top_k_rule():
    confidence = rows([0.1, 0.5, 0.3, 0.4], [0.1, 0.5, 0.3, 0.4])
    open_slots = torch.tensor([[True, True, True, True], [True, False, True, False]])
    assert select_commits(confidence, None, open_slots, "top_k", top_k=2).tolist() == [
        [False, True, False, True], [True, False, True, False]]  # row 2: all that remain
    assert select_commits(confidence, None, open_slots, "top_k", top_k=1).tolist() == [
        [False, True, False, False], [False, False, True, False]]


# ----- Errors ------------------------------------------------------------------------------


def test_setting_errors(tiny):
    model, tokenizer = converted("llama", block_size=4)
    engine = Engine(model, tokenizer)
    prompts = [[5, 6, 7]]
    for threshold in (0, 1.5):
        with pytest.raises(DecoderError, match=r"threshold must be in \(0, 1\]"):
            engine.generate(prompts, "block_diffusion", 4, threshold=threshold)
    with pytest.raises(DecoderError, match=r"sub_block_size=3 does not divide block_size=4; choose one of 1, 2, 4"):
        engine.generate(prompts, "block_diffusion", 4, sub_block_size=3)
    with pytest.raises(DecoderError, match=r"unknown rule 'greedy'; choose one of threshold, entropy, factor, top_k"):
        engine.generate(prompts, "block_diffusion", 4, rule="greedy")
    with pytest.raises(DecoderError, match="entropy_bound must be > 0"):
        engine.generate(prompts, "block_diffusion", 4, rule="entropy", entropy_bound=0)
    with pytest.raises(DecoderError, match="factor must be > 0"):
        engine.generate(prompts, "block_diffusion", 4, rule="factor", factor=-1)
    with pytest.raises(DecoderError, match="top_k must be an integer >= 1"):
        engine.generate(prompts, "block_diffusion", 4, rule="top_k", top_k=0)
    with pytest.raises(DecoderError, match="block_size must be a positive integer"):
        engine.generate(prompts, "block_diffusion", 4, block_size=0)
    with pytest.raises(DecoderError, match="adaptive needs verify=true"):
        engine.generate(prompts, "block_diffusion", 4, adaptive=True)
    with pytest.raises(DecoderError, match="no setting 'treshold'"):
        engine.generate(prompts, "block_diffusion", 4, treshold=0.5)
    ar_model, ar_tokenizer = tiny("llama")  # never converted
    with pytest.raises(DecoderError, match="not a block-diffusion model.*leaplm train configs/ar2bd"):
        Engine(ar_model, ar_tokenizer).generate(prompts, "block_diffusion", 4)


# ----- Stops -------------------------------------------------------------------------------


def test_rows_stop_at_their_first_committed_stop_token():
    block_size = 4
    model, tokenizer = converted("llama", block_size)
    prompts = prompts_of(tokenizer)
    settings = dict(rule="top_k", top_k=2)
    free = never_stopping(model, tokenizer).generate(prompts, "block_diffusion", MAX_NEW, **settings).sequences

    # A token of row 0 that, used as the stop token, ends the rows in the most different blocks.
    def end_blocks(token: int) -> set[int]:
        return {(s.index(token) if token in s else MAX_NEW) // block_size for s in free}

    stop = max(free[0][1:12], key=lambda token: len(end_blocks(token)))
    assert len(end_blocks(stop)) > 1, "the random model gives no stop token that ends rows in different blocks"
    engine = Engine(model, tokenizer, stop_token_ids=[stop])
    result = decode(engine, prompts, **settings)
    out = engine.generate(prompts, "block_diffusion", MAX_NEW, **settings)
    # A stop ends the row right there; everything before it is what the unstopped decode wrote.
    assert out.sequences == [s[: s.index(stop) + 1] if stop in s else s for s in free]
    lengths = result.lengths.tolist()
    assert lengths == [len(s) for s in out.sequences] and out.stats.new_tokens == sum(lengths)
    assert len({(n - 1) // block_size for n in lengths}) > 1  # rows end in different blocks
    for seq in out.sequences:
        assert stop not in seq[:-1] and (seq[-1] == stop or len(seq) == MAX_NEW)
    for row, n in zip(result.tokens.tolist(), lengths):
        assert row[n:] == [engine.pad_token_id] * (MAX_NEW - n)  # nothing after the stop
    assert (result.row_forwards <= result.forward_passes).all()
    assert result.row_forwards.max() == result.forward_passes  # the last row to finish waited for every call
    assert result.row_forwards.min() < result.forward_passes  # the first to stop did not


def test_a_stop_in_slot_zero_ends_the_row_without_a_forward():
    model, tokenizer = converted("llama", block_size=4)
    prompt = prompts_of(tokenizer, 1)
    first = Engine(model, tokenizer).generate(prompt, "ar", 1).sequences[0][0]
    result = decode(Engine(model, tokenizer, stop_token_ids=[first]), prompt)
    assert result.lengths.tolist() == [1] and result.forward_passes == 1 and result.row_forwards.tolist() == [1]
