"""EAGLE-3: the decoder equals generate on several families (padded batches, alone, fixed and
cost-sized trees), drafting reproduces the unrolled training steps exactly, the unrolled mask and
the loss by hand, the draft vocabulary, and the recipe through the trainer with its export
loading back."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from leaplm.config import ConfigError
from leaplm.data.sft import IGNORE_INDEX
from leaplm.data.tasks import make_split
from leaplm.inference.decoders.eagle3 import draft_catch_up, draft_forward, grow_dynamic
from leaplm.inference.engine import Engine, new_cache
from leaplm.inference.evaluate import task_prompts
from leaplm.models.eagle3 import Eagle3Config, Eagle3Draft, attach_eagle3, default_aux_layers
from leaplm.models.zoo import load_model
from leaplm.train import eagle3 as recipe
from leaplm.train.recipes import load_config
from leaplm.train.trainer import train

from conftest import SMALL_ROLLOUT_RUN

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "eagle3" / "tiny_teacher.yaml"
SMALL = [*SMALL_ROLLOUT_RUN, "rollout.max_prompts=6", "method.rollout_block_size=8", "train.micro_batch_size=4"]
MAX_NEW = 24


def random_draft(model, steps: int = 3, draft_vocab: int = 0, seed: int = 0) -> Eagle3Draft:
    """A draft with random weights on ``model``, its vocabulary (when reduced) a random subset."""
    text = model.config.get_text_config()
    config = Eagle3Config(hidden_size=text.hidden_size, vocab_size=text.vocab_size, draft_vocab_size=draft_vocab,
                          aux_layers=default_aux_layers(text.num_hidden_layers), ttt_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    draft = Eagle3Draft(config, model)
    with torch.no_grad():
        for p in draft.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
    if draft_vocab:
        draft.set_vocabulary(torch.randperm(text.vocab_size, generator=generator)[:draft_vocab])
    return attach_eagle3(model, draft)


def prompts_of(tokenizer) -> list[list[int]]:
    return task_prompts(tokenizer, [make_split(task, "test", 1)[0] for task in ("copy", "word", "sort")])


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "mistral"])
def test_greedy_eagle3_equals_generate(family, lively_tiny):
    model, tokenizer = lively_tiny(family)
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)
    reference = engine.generate(prompts, "hf_generate", MAX_NEW).sequences
    assert len({tuple(s) for s in reference}) > 1
    try:
        random_draft(model, draft_vocab=300)
        for settings in ({}, dict(adaptive=False), dict(tree=[[0, 0, 0], [1], [0, 1]], adaptive=False),
                         dict(tree_size=4, adaptive=False), dict(lookup=3), dict(lookup=2, tree_size=4, adaptive=False),
                         dict(tree="dynamic"), dict(tree="dynamic", tree_size=6, adaptive=False),
                         dict(tree="dynamic", lookup=2)):
            assert engine.generate(prompts, "eagle3", MAX_NEW, **settings).sequences == reference, settings
            assert engine.generate(prompts[1:2], "eagle3", MAX_NEW, **settings).sequences == reference[1:2]
    finally:
        del model.eagle3


def test_drafted_tokens_that_are_right_are_accepted(lively_tiny):
    """Lossless alone proves little when nothing is accepted: with a one-token draft vocabulary, every
    node drafts the answer's most frequent token, so each of its occurrences after the first
    answer token is accepted (fewer forwards than tokens), and the output stays generate's."""
    model, tokenizer = lively_tiny("llama")
    engine = Engine(model, tokenizer)
    prompts = prompts_of(tokenizer)[:1]
    reference = engine.generate(prompts, "hf_generate", MAX_NEW).sequences
    common = max(set(reference[0][1:]), key=reference[0][1:].count)
    try:
        random_draft(model, draft_vocab=1).set_vocabulary(torch.tensor([common]))
        out = engine.generate(prompts, "eagle3", MAX_NEW, tree=[[0], [0, 0]], adaptive=False)
        assert out.sequences == reference and out.stats.tokens_per_forward > 1.0
    finally:
        del model.eagle3


@pytest.mark.parametrize("second, want", [(0.9, [(0,), (0, 0)]), (0.4, [(0,), (1,)])])
def test_dynamic_tree_takes_the_nodes_most_likely_accepted(second, want, lively_tiny, monkeypatch):
    """EAGLE-2's rule with a budget of 2 drafted nodes: the draft's first token has probability 0.6,
    its second 0.3. A chain's second node scores 0.6 x p(its top child): with p = 0.9 (0.54 > 0.3)
    the tree is a chain, with p = 0.4 (0.24 < 0.3) two siblings. A row that finished is not counted."""
    model, _ = lively_tiny("llama")
    try:
        draft = random_draft(model)
        vocab = draft.config.vocab_size
        calls = []

        def logits(states):  # [b, P, H] -> [b, P, V]: depth 1's distribution, then depth 2's
            probs = torch.full((*states.shape[:-1], vocab), 0.01 / (vocab - 2))
            probs[..., 0], probs[..., 1] = (0.6, 0.39) if not calls else (second, 0.99 - second)
            calls.append(states.shape)
            return probs.log()

        monkeypatch.setattr(draft, "logits", logits)
        cache, b = new_cache(), 2
        hidden = torch.zeros(b, 4, draft.config.hidden_size)
        allowed = torch.ones(4, 4, dtype=torch.bool).tril()[None].expand(b, -1, -1)
        draft_forward(draft, cache, torch.zeros(b, 4, dtype=torch.long), hidden, torch.arange(4)[None].expand(b, -1),
                      allowed)
        root = torch.tensor([5, 6])
        tree, tokens = grow_dynamic(draft, cache, torch.tensor([4, 4]), 3, 3, root, torch.zeros(b, hidden.shape[-1]),
                                    torch.tensor([4, 4]), torch.tensor([True, False]))
        assert tree.paths[1:] == want and tokens[:, 0].tolist() == [5, 6]
        assert tokens[:, 1:].tolist() == [[0, 0 if want[1] == (0, 0) else 1]] * 2  # the ranked tokens, per path
        assert cache.get_seq_length() == 4 and calls[1][1] == 1  # one parent expanded; the cache as it was
    finally:
        del model.eagle3


def test_drafting_reproduces_the_unrolled_training_steps(lively_tiny):
    """The decoder's catch-up and chain drafting compute, at index t, exactly the states the
    training unroll computes at t for steps 0..3 (same keys, masks and positions)."""
    model, _ = lively_tiny("llama")
    try:
        draft = random_draft(model, steps=4)
        ids = torch.randint(model.config.vocab_size, (1, 14), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            hidden_states = model(ids, output_hidden_states=True).hidden_states
            features = draft.features(hidden_states)  # [1, T, H]
            unrolled = [h for _, h in recipe.unrolled_steps(draft, features, ids, torch.ones_like(ids), 4)]
            for t in (0, 5, 8):
                cache, cached = new_cache(), torch.zeros(1, dtype=torch.long)
                out = draft_catch_up(draft, cache, cached, features[:, :t + 1], ids[:, 1:t + 2],
                               torch.arange(t + 1)[None], torch.tensor([t + 1]))  # [1, H] index t
                torch.testing.assert_close(out, unrolled[0][:, t], rtol=1e-4, atol=1e-5)
                for k in range(1, 4):  # a chain: each step one position on, attending to all before it
                    allowed = torch.ones(1, 1, cache.get_seq_length() + 1, dtype=torch.bool)
                    out = draft_forward(draft, cache, ids[:, t + 1 + k:t + 2 + k], out[:, None],
                                        torch.tensor([[t + k]]), allowed)[:, 0]
                    torch.testing.assert_close(out, unrolled[k][:, t], rtol=1e-4, atol=1e-5)
    finally:
        del model.eagle3


def test_unrolled_mask_by_hand():
    mask = recipe.unrolled_mask(3, 2, torch.tensor([[1, 1, 0]]))[0].int()
    assert mask.tolist() == [[1, 0, 0, 1, 0, 0],
                             [1, 1, 0, 0, 1, 0],
                             [1, 1, 1, 0, 0, 1]]  # the padded third key is seen by its own query only


def test_loss_matches_a_per_position_reference(tmp_path):
    cfg = load_config(CONFIG, [*SMALL, f"output_dir={tmp_path}", "method.ttt_steps=2", "method.draft_vocab_size=256"])
    model, tokenizer = recipe.build_model(cfg)
    draft = model.eagle3
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    draft.set_vocabulary(torch.arange(0, 512, 2))  # even ids: odd targets are not counted
    samples = [{"input_ids": [5, 6, 8, 10, 12, 14, 9], "labels": [IGNORE_INDEX] * 2 + [8, 10, 12, 14, 9]},
               {"input_ids": [11, 12, 14, 16], "labels": [IGNORE_INDEX, 12, 14, 16]}]
    batch = {**recipe.RECIPE.build_collator(cfg, tokenizer)(samples), "step": 0}
    total, metrics = recipe.loss(model, batch, cfg)
    expected = 0.0
    for s in samples:
        ids = torch.tensor([s["input_ids"]])
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
            steps = [h[0] for _, h in recipe.unrolled_steps(draft, draft.features(out.hidden_states), ids,
                                                             torch.ones_like(ids), 2)]
        T = ids.shape[1]
        for k in range(2):
            for t in range(T - 2 - k):
                token = s["input_ids"][t + 2 + k]
                if s["labels"][t + 2 + k] != IGNORE_INDEX and token % 2 == 0:
                    p = F.softmax(out.logits[0, t + 1 + k, ::2], -1)
                    expected += 0.8 ** k * -(p * F.log_softmax(draft.logits(steps[k][t]), -1)).sum()
    assert total.detach().item() == pytest.approx(float(expected.detach()), rel=1e-4)
    assert set(metrics) == {"step0_top1", "step1_top1"}


def test_draft_vocabulary_takes_the_most_frequent_answer_tokens():
    samples = [{"input_ids": [1, 2, 3, 3], "labels": [IGNORE_INDEX, 2, 3, 3]},
               {"input_ids": [1, 4, 2], "labels": [IGNORE_INDEX, 4, 2]}]
    assert recipe.frequent_tokens(samples, 10, 2).tolist() == [2, 3]  # 3 and 2 twice; 4 once; 1 is prompt only
    assert recipe.frequent_tokens(samples, 10, 5).tolist() == [0, 1, 2, 3, 4]  # filled with the lowest unseen


def test_recipe_trains_exports_and_decodes_losslessly(tmp_path):
    out = tmp_path / "model"
    result = train(load_config(CONFIG, [*SMALL, f"output_dir={tmp_path}", "train.max_steps=3", f"export.dir={out}",
                                        "method.draft_vocab_size=100", "method.ttt_steps=3"]))
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    model, tokenizer = load_model(str(out))
    draft = model.eagle3
    assert draft.config.draft_vocab_size == 100 and int(draft.t2d.sum()) == 100 and draft.accuracy.any()
    assert torch.equal(draft.t2d.nonzero().squeeze(1), draft.draft_ids())
    engine = Engine(model, tokenizer)
    prompts = task_prompts(tokenizer, make_split("copy", "test", 2) + make_split("sort", "test", 1))
    assert engine.generate(prompts, "eagle3", 24).sequences == engine.generate(prompts, "hf_generate", 24).sequences


@pytest.mark.parametrize("override,message", [
    ("method.ttt_steps=0", "ttt_steps"), ("method.aux_layers=[1,2]", "3 target layers"),
    ("method.aux_layers=[1,2,9]", "target layers 0..5"), ("method.draft_vocab_size=9999", "exceeds"),
    ("model.lora.r=8", "frozen"),
])
def test_errors(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        cfg = load_config(CONFIG, [f"output_dir={tmp_path}", override])
        recipe.build_model(cfg)


def test_speculators_export_holds_the_draft_under_the_formats_names(tmp_path, tiny):
    from safetensors.torch import load_file

    from leaplm.models.eagle3 import save_attached_eagle3
    from leaplm.ship.export import ExportError
    from leaplm.ship.speculators import export_speculators

    model, tokenizer = tiny("qwen2")
    source = tmp_path / "model"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    try:
        draft = random_draft(model, steps=3, draft_vocab=100)
        save_attached_eagle3(model, source)
    finally:
        del model.eagle3
    out = export_speculators(source, tmp_path / "spec", verifier="Qwen/Qwen2-tiny")
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and config["draft_vocab_size"] == 100
    assert config["eagle_aux_hidden_state_layer_ids"] == draft.config.aux_layers
    assert config["norm_before_residual"] is False  # our residual is the un-normed state, as EAGLE-3's
    assert config["transformer_layer_config"]["vocab_size"] == model.config.vocab_size
    assert config["speculators_config"]["verifier"] == {"name_or_path": "Qwen/Qwen2-tiny",
                                                        "architectures": ["Qwen2ForCausalLM"]}
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    weights = load_file(str(out / "model.safetensors"))
    state = draft.state_dict()
    assert set(weights) == set(state) - {"accuracy"}
    assert {"fc.weight", "layers.0.hidden_norm.weight", "layers.0.self_attn.q_proj.weight", "norm.weight",
            "lm_head.weight", "d2t", "t2d"} <= set(weights)
    assert all(torch.equal(weights[k], state[k]) for k in weights)
    assert weights["d2t"].dtype == torch.long and weights["t2d"].dtype == torch.bool
    assert weights["fc.weight"].shape == (model.config.hidden_size, 3 * model.config.hidden_size)
    export_speculators(source, out)  # an earlier speculators export is replaced
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a speculators export"):
        export_speculators(source, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_offline_training_is_the_online_run(tmp_path):
    """With the target's states cached once, training reads them instead of running the target, and
    follows the same loss curve."""
    common = [*SMALL, "train.max_steps=3", "export.dir=null", "method.ttt_steps=2", "method.draft_vocab_size=128"]
    online = train(load_config(CONFIG, [*common, f"output_dir={tmp_path / 'online'}"]))
    offline = train(load_config(CONFIG, [*common, f"output_dir={tmp_path / 'offline'}", "method.offline=true"]))
    assert list((tmp_path / "offline" / "features").glob("*/shard-00000.safetensors"))
    assert offline.losses == pytest.approx(online.losses, rel=1e-5)
