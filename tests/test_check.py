"""`leaplm check`: every lossless decoder against generate on a user's model, the pieces the recipes
use and which recipes can train it; a family outside the tiny builders loading, training and
checking exact end to end; a model that cannot work refused with the reason."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from transformers import AutoConfig

from leaplm.bench import check
from leaplm.bench.check import CASES, Case, default_prompts, run_check
from leaplm.cli import main
from leaplm.inference.engine import DECODERS
from leaplm.models.zoo import TINY_FAMILIES, TINY_SIZE, build_from_config, load_model, load_tokenizer
from leaplm.train.recipes import RECIPE_MODULES, load_config
from leaplm.train.trainer import train

from conftest import RECIPE_SMOKE

REPO = Path(__file__).resolve().parents[1]
PHI3 = dict(TINY_SIZE, architecture="phi3", partial_rotary_factor=0.5)


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory) -> Path:
    """A random tiny Phi-3 saved like a user's checkpoint: a family outside the zoo's former list."""
    tokenizer = load_tokenizer("tiny-teacher")
    model = build_from_config(PHI3, tokenizer)
    path = tmp_path_factory.mktemp("phi3")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ----- The command on a model of a new family --------------------------------------------------


def test_check_finds_every_lossless_decoder_exact_and_writes_json(phi3_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Sort 3 1 2"}\n{"id": "long", "text": "Once upon a time there was a cat"}\n')
    main(["check", str(phi3_dir), "--prompts", str(prompts), "--n", "2", "--max-new-tokens", "12",
          "--out", str(tmp_path / "out")])
    text = capsys.readouterr().out
    assert "every lossless decoder is exact" in text and "2 prompts, 12 new tokens" in text
    report = json.loads((tmp_path / "out" / "check.json").read_text())
    assert report["exact"] and report["transformers"]
    assert [r["decoder"] for r in report["decoders"]] == [case.label for case in CASES]
    assert all(r["status"] == "exact" and r["batch_1"] and r["batch_n"] for r in report["decoders"])
    assert {r["decoder"] for r in report["decoders"]} >= {"ar", "jacobi", "jacobi_multiblock", "medusa", "hydra",
                                                          "hydra++", "clover", "eagle3", "speculative",
                                                          "speculative adaptive",
                                                          "block_diffusion verified",
                                                          "block_diffusion verified DualCache"}
    pieces = {r["piece"]: r for r in report["pieces"]}
    assert all(r["has"] for name, r in pieces.items() if name != "block_diffusion_model"), pieces
    # Phi-3 fuses q/k/v and gate/up: LoRA's default targets find only two of its projections
    assert pieces["lora_targets"]["detail"] == ("adapts o_proj, down_proj; not adapted by default: gate_up_proj, "
                                                "qkv_proj")
    recipes = {r["recipe"]: r["can_train"] for r in report["recipes"]}
    assert recipes.keys() == set(RECIPE_MODULES)
    assert recipes == {**{name: "yes" for name in RECIPE_MODULES},
                       **{name: "after ar2bd" for name in ("dparallel", "cd4lm", "learn2pd")}}


def test_default_prompts_are_chat_turns_or_plain_text():
    tokenizer = load_tokenizer("tiny-teacher")
    chat = default_prompts(tokenizer, 2)
    assert [p.id for p in chat] == [1, 2] and len({len(p.tokens) for p in chat}) == 2
    assert tokenizer.decode(chat[0].tokens).startswith("<|user|>\nWhat is 12 + 30?")
    tokenizer = load_tokenizer("tiny-teacher")
    tokenizer.chat_template = None  # a base model's tokenizer
    assert tokenizer.decode(default_prompts(tokenizer, 1)[0].tokens) == "What is 12 + 30?"


def test_a_decoder_that_differs_from_generate_fails_the_check(phi3_dir, monkeypatch, capsys):
    """A decoder that changes every row's third token: not exact, where it left generate named, exit code 1."""

    def wrong(engine, batch, max_new_tokens):
        out = DECODERS["ar"](engine, batch, max_new_tokens)
        out.tokens[:, 2] = (out.tokens[:, 2] + 1) % engine.model.config.vocab_size
        return out

    monkeypatch.setitem(DECODERS, "wrong", wrong)
    monkeypatch.setattr(check, "CASES", (Case("ar", "ar"), Case("wrong", "wrong"), Case("jacobi", "jacobi")))
    with pytest.raises(SystemExit) as exit_:
        main(["check", str(phi3_dir), "--n", "2", "--max-new-tokens", "8"])
    assert exit_.value.code == 1
    text = capsys.readouterr().out
    assert "| ar | exact | yes | yes |" in text and "| wrong | not exact | no | no |" in text
    assert "alone: prompt 1, new token 2: generate " in text and "NOT EXACT: wrong" in text


def test_a_stand_in_the_model_cannot_take_makes_its_decoder_unavailable_not_failed(monkeypatch):
    """GPT-2's config has no intermediate_size to size a Hydra++ prefix layer from, nor nn.Linear layers."""
    tokenizer = load_tokenizer("tiny-teacher")
    model = build_from_config(dict(architecture="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512),
                              tokenizer).eval()
    monkeypatch.setattr(check, "CASES", tuple(case for case in CASES if case.label in ("jacobi", "hydra", "hydra++")))
    report = run_check(model, tokenizer, default_prompts(tokenizer, 2), 8, "gpt2")
    rows = {r["decoder"]: r for r in report["decoders"]}
    assert rows["hydra"]["status"] == "exact" and report["exact"]
    assert rows["hydra++"]["status"] == "unavailable"
    assert "Hydra++ heads cannot be built for this model (AttributeError" in rows["hydra++"]["detail"]
    pieces = {r["piece"]: r for r in report["pieces"]}
    assert not pieces["noisy_weights"]["has"] and "Conv1D" in pieces["noisy_weights"]["detail"]
    assert not pieces["prefix_layer"]["has"]
    assert "set it to some of ['c_attn', 'c_fc', 'c_proj']" in pieces["lora_targets"]["detail"]
    recipes = {r["recipe"]: r for r in report["recipes"]}
    assert recipes["draft_heads"]["settings_unavailable"] == "prefix_layer, lora_targets"


def test_the_two_stream_probe_catches_a_model_that_ignores_4d_masks(tiny, monkeypatch):
    model, tokenizer = tiny("qwen3")
    forward = model.forward

    def causal_only(**kwargs):  # what a model that builds its own causal mask computes
        kwargs.pop("attention_mask", None)
        kwargs.pop("position_ids", None)
        return forward(**kwargs)

    tokens = default_prompts(tokenizer, 1)[0].tokens[:12]
    assert "dense mask exact" in check.probe_two_stream(model, tokens, {})
    monkeypatch.setattr(model, "forward", causal_only)
    with pytest.raises(check.Unavailable, match="a dense 4D mask with position ids is not applied as given"):
        check.probe_two_stream(model, tokens, {})


def test_scaled_logits_leave_only_the_fused_loss_out(tiny):
    model, tokenizer = tiny("granite")
    tokens = default_prompts(tokenizer, 1)[0].tokens[:12]
    with pytest.raises(check.Unavailable, match="set train.fused_loss=false"):
        check.probe_fused_loss(model, tokens, {})
    pieces = [{"piece": name, "has": name not in ("fused_loss", "block_diffusion_model")} for name in check.PIECES]
    recipes = {r["recipe"]: r for r in check.recipe_rows(pieces)}
    assert recipes["pretrain"]["can_train"] == "yes" and recipes["pretrain"]["settings_unavailable"] == "fused_loss"


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_lossless_decoder_is_exact_on_every_tiny_family(family, lively_tiny):
    model, tokenizer = lively_tiny(family)
    # a copy: the check converts the model to block diffusion in place
    report = run_check(copy.deepcopy(model), copy.deepcopy(tokenizer), default_prompts(tokenizer, 3), 24, family)
    assert report["exact"] and {r["status"] for r in report["decoders"]} == {"exact"}, report["decoders"]


# ----- A model that cannot work ---------------------------------------------------------------


@pytest.mark.parametrize("model_type,why", [("t5", "is an encoder-decoder model"),
                                            ("mamba", "keeps a recurrent state")])
def test_check_of_a_model_that_cannot_work_says_why(tmp_path, model_type, why):
    AutoConfig.for_model(model_type).save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match=f"leaplm check: {tmp_path} cannot be decoded by leaplm: .*{why}"):
        main(["check", str(tmp_path)])


# ----- Done when: a new family loads, trains and checks exact ------------------------------


def _smoke(recipe: str, model_dir: Path, out: Path, overrides: list[str]) -> list[float]:
    config = REPO / "configs" / recipe / "tiny_teacher.yaml"
    cfg = load_config(config, [*overrides, f"model.name_or_path={model_dir}", f"output_dir={out}"])
    losses = train(cfg).losses
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), (recipe, losses)
    return losses


def test_a_phi3_directory_trains_with_three_recipes(phi3_dir, tmp_path):
    model, tokenizer = load_model(str(phi3_dir))
    assert type(model).__name__ == "Phi3ForCausalLM" and len(tokenizer) == model.config.vocab_size
    random_answers = ["rollout.drop_wrong=false"]  # a random model's answers fail every checker
    _smoke("pretrain", phi3_dir, tmp_path / "pretrain",
           ["model.init=null", "eval.at_end=false", "export.dir=null", "logging.progress_bar=false",
            "train.warmup_steps=0", "train.save_every=0", "train.max_steps=2", "data.tasks=[copy,sort]",
            "data.train_per_task=8", "train.micro_batch_size=8"])
    _smoke("draft_heads", phi3_dir, tmp_path / "draft_heads", [*RECIPE_SMOKE["draft_heads"], *random_answers])
    _smoke("jacobi_forcing", phi3_dir, tmp_path / "jacobi_forcing", [*RECIPE_SMOKE["jacobi_forcing"], *random_answers])
