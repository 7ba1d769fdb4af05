"""Export: every landed recipe's model decodes the same tokens after `leaplm export` and
`leaplm.inference.load` as before; plain transformers loads the weights; the card has real
numbers; a push without a token or while offline fails clearly and keeps the export."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import leaplm.inference
from leaplm.cli import main
from leaplm.config import load_config
from leaplm.data.tasks import make_split
from leaplm.inference.engine import Engine
from leaplm.inference.evaluate import task_prompts
from leaplm.models.block_diffusion import spec_of
from leaplm.models.draft_heads import HEADS_ATTR
from leaplm.models.export import LEAPLM_KEY, ExportError, push
from leaplm.models.unmask_filter import UnmaskFilter
from leaplm.models.zoo import load_model
from leaplm.train.trainer import Trainer, train

from conftest import RECIPE_SMOKE

REPO = Path(__file__).resolve().parents[1]
def prompts(tokenizer) -> list[list[int]]:
    examples = make_split("copy", "test", 2, 0) + make_split("sort", "test", 2, 0)
    return task_prompts(tokenizer, examples)


def trained(tmp_path: Path, recipe: str, *extra: str) -> Trainer:
    cfg = load_config(REPO / "configs" / recipe / "tiny_teacher.yaml",
                      [*RECIPE_SMOKE[recipe], f"output_dir={tmp_path / 'run'}", *extra])
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer


def decode(model, tokenizer, cfg) -> list[list[int]]:
    out = Engine(model, tokenizer).generate(prompts(tokenizer), cfg.eval.decoder, 24, **cfg.eval.decoder_args)
    return out.sequences


@pytest.mark.parametrize("recipe", [r for r in RECIPE_SMOKE if r != "learn2pd"])  # learn2pd: the test below
def test_export_round_trip_decodes_the_same_tokens(tmp_path, recipe):
    trainer = trained(tmp_path, recipe)
    cfg, model, tokenizer = trainer.cfg, trainer.unwrapped_model().eval(), trainer.tokenizer
    before = decode(model, tokenizer, cfg)
    out = tmp_path / "export"
    main(["export", str(tmp_path / "run"), "--out", str(out)])

    section = json.loads((out / "config.json").read_text())[LEAPLM_KEY]
    assert section["recipe"] == recipe and section["decoder"] == cfg.eval.decoder
    assert section["decoder_settings"] == cfg.eval.decoder_args
    # the recipe's export hook
    if recipe in ("cllm", "jacobi_forcing"):
        assert section["block_size"] == cfg.method.block_size
    elif recipe in ("ar2bd", "dparallel", "cd4lm"):
        assert section["block_size"] == spec_of(model).block_size
    elif recipe == "draft_heads":
        assert section["draft_heads"]["num_heads"] == cfg.method.num_heads
    if recipe in ("draft_heads", "acceptance_head"):
        assert {"draft_heads.safetensors", "draft_heads.json"} <= set(section["files"])
    fast = leaplm.inference.load(out)
    assert fast.decoder == cfg.eval.decoder and fast.settings == cfg.eval.decoder_args
    assert fast.generate(prompts(tokenizer), max_new_tokens=24).sequences == before
    assert fast.generate(prompts(tokenizer), max_new_tokens=24).sequences == before
    # A user with only transformers gets the same weights.
    plain = AutoModelForCausalLM.from_pretrained(out)
    # A LoRA run (dparallel's default) exports its adapter merged into the weights.
    weights = copy.deepcopy(model).merge_and_unload() if hasattr(model, "merge_and_unload") else model
    for name, tensor in weights.state_dict().items():
        if name.startswith(f"{HEADS_ATTR}."):  # draft heads ride in their own files, attached by leaplm's loader
            continue
        torch.testing.assert_close(plain.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    # Text prompts are chat formatted, as the task prompts above.
    text = make_split("copy", "test", 1, 0)[0].prompt
    assert fast.generate([text], max_new_tokens=24).sequences == before[:1]
    assert f"recipe `{recipe}`" in (out / "README.md").read_text()


def test_learn2pd_export_is_the_filter_and_decodes_the_same_tokens(tmp_path):
    """Learn2PD trains a filter, not the LM: its export is the filter, read by the LM's decoder."""
    trainer = trained(tmp_path, "learn2pd")
    cfg = trainer.cfg
    main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    section = json.loads((tmp_path / "export" / "config.json").read_text())[LEAPLM_KEY]
    assert section["filter_for"] == cfg.model.name_or_path == "tiny-teacher-bd"
    assert (section["decoder"], section["decoder_settings"]) == ("block_diffusion", {"rule": "filter"})
    trained_filter = trainer.unwrapped_model()
    exported = UnmaskFilter.from_pretrained(tmp_path / "export")
    for name, tensor in trained_filter.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    trained_filter.save_pretrained(tmp_path / "trained")  # the filter as trained, in memory
    lm, tokenizer = load_model("tiny-teacher-bd")
    engine = Engine(lm.eval(), tokenizer)

    def decode(filter_dir: Path) -> list[list[int]]:
        return engine.generate(prompts(tokenizer), "block_diffusion", 24, rule="filter",
                               unmask_filter=str(filter_dir)).sequences

    assert decode(tmp_path / "export") == decode(tmp_path / "trained")


def test_a_run_in_stages_exports_its_last_stage(tmp_path):
    stages = "method.stages=[{block_size: 4, max_steps: 1}, {block_size: 8, max_steps: 1}]"
    cfg = load_config(REPO / "configs" / "jacobi_forcing" / "tiny_teacher.yaml",
                      [*RECIPE_SMOKE["jacobi_forcing"], stages, f"output_dir={tmp_path / 'run'}"])
    train(cfg)
    main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    section = json.loads((tmp_path / "export" / "config.json").read_text())[LEAPLM_KEY]
    assert section["block_size"] == 8 and "stage_2" in (tmp_path / "export" / "README.md").read_text()


def test_lora_export_keeps_the_adapter_or_merges_it(tmp_path):
    trainer = trained(tmp_path, "pretrain", "model.lora.r=4", "model.lora.alpha=64", "train.lr=5e-2")
    model, tokenizer = trainer.unwrapped_model().eval(), trainer.tokenizer
    before = decode(model, tokenizer, trainer.cfg)

    main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "adapter"), "--no-merge-lora"])
    assert (tmp_path / "adapter" / "adapter" / "adapter_config.json").is_file()
    assert "adapter/" in (tmp_path / "adapter" / "README.md").read_text()
    assert leaplm.inference.load(tmp_path / "adapter").generate(prompts(tokenizer), 24).sequences == before

    main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "merged")])  # export.merge_lora: true
    assert not (tmp_path / "merged" / "adapter").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # standalone: no peft needed
    ids = torch.tensor([prompts(tokenizer)[0]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_model_card_renders_the_bench_with_real_numbers(tmp_path):
    trained(tmp_path, "cllm")
    out = tmp_path / "export"
    main(["export", str(tmp_path / "run"), "--out", str(out), "--bench-n", "2"])
    card = (out / "README.md").read_text()
    bench = json.loads((out / "bench.json").read_text())
    assert {r["decoder"] for r in bench} == {"hf_generate", "ar", "jacobi"}
    jacobi = next(r for r in bench if r["decoder"] == "jacobi" and r["task"] == "copy")
    assert (f"| jacobi (block_size=8) | copy | 2 | {100 * jacobi['accuracy']:.1f}% | "
            f"{jacobi['tokens_per_forward']:.2f} | {jacobi['speedup_vs_generate']:.2f}x |") in card
    assert "![accuracy against speedup](bench.png)" in card and (out / "bench.png").stat().st_size > 1000
    assert "tags:\n- leaplm\n- cllm\n- jacobi" in card
    assert f"- torch {torch.__version__}" in card
    assert "reproduce: `leaplm train " in card


@pytest.mark.parametrize("env, message", [({"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_x"}, "HF_HUB_OFFLINE is set"),
                                          ({}, "no Hub token")])
def test_push_without_a_token_or_offline_is_a_clear_error_and_keeps_the_export(tmp_path, monkeypatch, env, message):
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    trained(tmp_path, "pretrain")
    out = tmp_path / "export"
    with pytest.raises(ExportError, match=message) as err:
        main(["export", str(tmp_path / "run"), "--out", str(out), "--push", "someone/tiny"])
    assert f"The export in {out} is kept" in str(err.value)
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()


def test_training_exports_and_pushes_at_the_end_by_config(tmp_path, monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "model"
    with pytest.raises(ExportError, match="no Hub token"):
        trained(tmp_path, "pretrain", f"export.dir={out}", "export.push_to=someone/tiny")
    assert json.loads((out / "config.json").read_text())[LEAPLM_KEY]["recipe"] == "pretrain"
    assert "someone/tiny" in (out / "README.md").read_text()  # the card loads the model by its repo id


def test_export_of_a_directory_without_checkpoints_says_what_to_pass(tmp_path):
    with pytest.raises(ExportError, match="neither a checkpoint"):
        main(["export", str(tmp_path), "--out", str(tmp_path / "x")])
    with pytest.raises(ExportError, match="no config.json"):
        push(tmp_path, "someone/tiny")
