"""Export: every landed recipe's model decodes the same tokens after `leaplm export` and
`leaplm.ship.load` as before; plain transformers loads the weights; the card has real
numbers; a push without a token or while offline fails clearly and keeps the export, and the command
it prints pushes it; an export replaces its directory whole, and only an earlier export."""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import leaplm.ship
from leaplm.cli import main
from leaplm.data.tasks import make_split
from leaplm.inference.engine import Engine
from leaplm.inference.evaluate import task_prompts
from leaplm.models.block_diffusion import spec_of
from leaplm.models.eagle3 import EAGLE3_ATTR
from leaplm.models.heads import HEADS_ATTR
from leaplm.models.kangaroo import KANGAROO_ATTR
from leaplm.models.noisy_weights import NOISY_WEIGHTS_FILE
from leaplm.models.unmask_filter import UnmaskFilter
from leaplm.models.zoo import load_model
from leaplm.ship import export
from leaplm.ship.checkpoint import CheckpointError
from leaplm.ship.export import ADAPTER_DIR, LEAPLM_KEY, ExportError, push
from leaplm.train.recipes import load_config
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
    out = Engine(model, tokenizer).generate(prompts(tokenizer), cfg.eval.decoder, 24, **cfg.eval.decoder_settings)
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
    assert section["decoder_settings"] == cfg.eval.decoder_settings
    # the recipe's export hook
    if recipe in ("cllm", "jacobi_forcing"):
        assert section["jacobi_block_size"] == cfg.method.jacobi_block_size
    elif recipe in ("ar2bd", "dparallel", "cd4lm"):  # the block size lives in the model's own config only
        assert "block_size" not in section
        assert spec_of(AutoConfig.from_pretrained(out)).block_size == spec_of(model).block_size
    elif recipe == "draft_heads":
        assert section["draft_heads"]["num_heads"] == cfg.method.num_heads
    if recipe in ("draft_heads", "acceptance_head"):
        assert {"draft_heads.safetensors", "draft_heads.json"} <= set(section["files"])
    if recipe == "eagle3":
        assert {"eagle3.safetensors", "eagle3.json"} <= set(section["files"])
    if recipe == "kangaroo":
        assert {"kangaroo.safetensors", "kangaroo.json"} <= set(section["files"])
        assert section["kangaroo"]["exit_layer"] == cfg.method.exit_layer
    fast = leaplm.ship.load(out)
    assert fast.decoder == cfg.eval.decoder and fast.decoder_settings == cfg.eval.decoder_settings
    assert fast.generate(prompts(tokenizer), max_new_tokens=24).sequences == before
    assert fast.generate(prompts(tokenizer), max_new_tokens=24).sequences == before
    # A user with only transformers gets the same weights.
    plain = AutoModelForCausalLM.from_pretrained(out)
    # A LoRA run (dparallel's default) exports its adapter merged into the weights.
    weights = copy.deepcopy(model).merge_and_unload() if hasattr(model, "merge_and_unload") else model
    for name, tensor in weights.state_dict().items():
        # add-ons ride in their own files, attached by leaplm's loader
        if name.startswith((f"{HEADS_ATTR}.", f"{EAGLE3_ATTR}.", f"{KANGAROO_ATTR}.")):
            continue
        torch.testing.assert_close(plain.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    # Text prompts are chat formatted, as the task prompts above.
    text = make_split("copy", "test", 1, 0)[0].prompt
    assert fast.generate([text], max_new_tokens=24).sequences == before[:1]
    assert f"recipe `{recipe}`" in (out / "README.md").read_text()


def test_a_draft_heads_export_without_eval_decodes_with_its_heads_and_says_what_it_trained(tmp_path):
    """eval.decoder unset and no eval: the export stores the recipe's decoder, which loads with the heads; the
    card names it, the trained parts and the data, and says nothing was measured."""
    trainer = trained(tmp_path, "draft_heads", "eval.decoder=null")
    out = tmp_path / "export"
    main(["export", str(tmp_path / "run"), "--out", str(out)])
    assert json.loads((out / "config.json").read_text())[LEAPLM_KEY]["decoder"] == "medusa"
    fast = leaplm.ship.load(out)
    assert fast.decoder == "medusa" and fast.model.draft_heads.kind == "medusa"
    reference = Engine(fast.model, fast.tokenizer).generate(prompts(fast.tokenizer), "hf_generate", 24).sequences
    assert fast.generate(prompts(fast.tokenizer), max_new_tokens=24).sequences == reference
    card = (out / "README.md").read_text()
    assert "decodes fastest with\nthe `medusa` decoder" in card
    assert f"- data: `synth` (tasks: copy, sort), {len(trainer.samples)} training samples" in card
    assert "- trained: 2 Medusa heads (" in card and "), base frozen" in card
    assert "Not measured" in card and "leaplm bench export --prompts FILE" in card
    assert json.dumps(make_split("copy", "test", 1, 0)[0].prompt) in card  # a prompt of what it was trained on


def test_the_cards_example_prompt_comes_from_the_runs_own_data(tmp_path):
    from leaplm.config import DataConfig

    rows = [{"prompt": "x" * 400, "response": "long"}, {"prompt": "What is 2 + 2?", "response": "4"}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert export.card_prompt(DataConfig(source=str(data))) == "What is 2 + 2?"  # the first that reads well
    data.write_text(json.dumps({"prompt": "y" * 400, "response": "z"}) + "\n")
    assert export.card_prompt(DataConfig(source=str(data))) == export.NEUTRAL_PROMPT


def test_learn2pd_export_is_the_filter_and_decodes_the_same_tokens(tmp_path):
    """Learn2PD trains a filter, not the LM: its export is the filter, read by the LM's decoder."""
    trainer = trained(tmp_path, "learn2pd")
    cfg = trainer.cfg
    main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    section = json.loads((tmp_path / "export" / "config.json").read_text())[LEAPLM_KEY]
    assert section["filter_for"] == cfg.model.name_or_path == "tiny-teacher-bd"
    assert (section["decoder"], section["decoder_settings"]) == ("block_diffusion", {"rule": "filter", "eos_fill": True})
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
    stages = "method.stages=[{jacobi_block_size: 4, max_steps: 1}, {jacobi_block_size: 8, max_steps: 1}]"
    cfg = load_config(REPO / "configs" / "jacobi_forcing" / "tiny_teacher.yaml",
                      [*RECIPE_SMOKE["jacobi_forcing"], stages, f"output_dir={tmp_path / 'run'}"])
    train(cfg)
    main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    section = json.loads((tmp_path / "export" / "config.json").read_text())[LEAPLM_KEY]
    assert section["jacobi_block_size"] == 8 and "stage_2" in (tmp_path / "export" / "README.md").read_text()


def test_lora_export_keeps_the_adapter_or_merges_it(tmp_path):
    trainer = trained(tmp_path, "pretrain", "model.lora.r=4", "model.lora.alpha=64", "train.lr=5e-2")
    model, tokenizer = trainer.unwrapped_model().eval(), trainer.tokenizer
    before = decode(model, tokenizer, trainer.cfg)

    main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "adapter"), "--no-merge-lora"])
    assert (tmp_path / "adapter" / "adapter" / "adapter_config.json").is_file()
    assert "adapter/" in (tmp_path / "adapter" / "README.md").read_text()
    assert leaplm.ship.load(tmp_path / "adapter").generate(prompts(tokenizer), 24).sequences == before

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
    assert (f"| jacobi (jacobi_block_size=8) | copy | 2 | {100 * jacobi['accuracy']:.1f}% | "
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


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory) -> Path:
    """A two-step pretrain run; tests that could change it copy it first."""
    path = tmp_path_factory.mktemp("pretrain")
    trained(path, "pretrain")
    return path / "run"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A two-step LoRA run whose adapter changes the tokens decoded (a stale one shows)."""
    path = tmp_path_factory.mktemp("lora")
    trained(path, "pretrain", "model.lora.r=4", "model.lora.alpha=64", "train.lr=5e-2")
    return path / "run"


def snapshot(directory: Path) -> dict[str, bytes]:
    return {f.relative_to(directory).as_posix(): f.read_bytes() for f in sorted(directory.rglob("*")) if f.is_file()}


def test_export_into_an_earlier_export_leaves_none_of_its_files(tmp_path, lora_run):
    out, fresh = tmp_path / "export", tmp_path / "fresh"
    main(["export", str(lora_run), "--out", str(out), "--no-merge-lora"])
    assert (out / ADAPTER_DIR).is_dir()
    main(["export", str(lora_run), "--out", str(out)])  # merged, over the export with the adapter
    main(["export", str(lora_run), "--out", str(fresh)])
    assert snapshot(out).keys() == snapshot(fresh).keys()
    reference = leaplm.ship.load(fresh)
    ids = prompts(reference.tokenizer)
    assert leaplm.ship.load(out).generate(ids, 24).sequences == reference.generate(ids, 24).sequences
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "fresh"]  # no temporary directory left


def test_a_failed_export_leaves_the_earlier_export_as_it_was(tmp_path, monkeypatch, lora_run):
    out = tmp_path / "export"
    main(["export", str(lora_run), "--out", str(out)])
    before = snapshot(out)

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(export, "render_card", full_disk)  # the card is written last, after the weights
    with pytest.raises(OSError, match="No space left"):
        main(["export", str(lora_run), "--out", str(out), "--no-merge-lora"])
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


@pytest.mark.parametrize("written", [None, b"not safetensors"], ids=["missing", "unreadable"])
def test_an_export_that_does_not_verify_replaces_nothing(tmp_path, monkeypatch, pretrain_run, written):
    out = tmp_path / "export"
    main(["export", str(pretrain_run), "--out", str(out)])
    before = snapshot(out)

    def save_addons(model, directory, dtype=None):  # a side file lost or cut short by the disk
        if written is not None:
            (Path(directory) / NOISY_WEIGHTS_FILE).write_bytes(written)
        return [NOISY_WEIGHTS_FILE]

    monkeypatch.setattr(export, "save_addons", save_addons)
    with pytest.raises(ExportError, match=f"not whole: .*{NOISY_WEIGHTS_FILE}.*Nothing was replaced"):
        main(["export", str(pretrain_run), "--out", str(out)])
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


@pytest.mark.parametrize("where, message", [
    ("mine", "not empty and not a leaplm export"),
    ("notes.txt", "is a file"),
    ("run", "is or holds"),
    ("run/checkpoints", "is or holds"),
    (".", "is or holds"),
])
def test_export_replaces_nothing_but_an_earlier_export(tmp_path, pretrain_run, where, message):
    shutil.copytree(pretrain_run, tmp_path / "run")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    (tmp_path / "notes.txt").write_text("notes")
    before = snapshot(tmp_path)
    with pytest.raises(ExportError, match=message):
        main(["export", str(tmp_path / "run"), "--out", str(tmp_path / where)])
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt", "run"]


def test_training_does_not_export_over_its_own_run(tmp_path):
    with pytest.raises(ExportError, match="is or holds"):
        trained(tmp_path, "pretrain", f"export.dir={tmp_path / 'run'}")
    assert (tmp_path / "run" / "checkpoints").is_dir() and not (tmp_path / "run" / "config.json").exists()


def test_the_command_a_failed_push_prints_pushes_the_export(tmp_path, monkeypatch, capsys, pretrain_run):
    uploads = []

    class Hub:  # the first upload fails as a dropped connection does, later ones succeed
        def __init__(self, token):
            assert token == "hf_x"

        def create_repo(self, repo_id, exist_ok):
            assert exist_ok

        def upload_folder(self, folder_path, repo_id, commit_message):
            uploads.append((folder_path, repo_id))
            if len(uploads) == 1:
                raise ConnectionError("connection reset by peer")
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/1")

    monkeypatch.setattr(huggingface_hub, "HfApi", Hub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    out = tmp_path / "my export"  # a space: the printed command quotes it
    with pytest.raises(ExportError, match="connection reset by peer") as err:
        main(["export", str(pretrain_run), "--out", str(out), "--push", "someone/tiny"])
    retry = shlex.split(re.search(r"push it later with `([^`]+)`", str(err.value)).group(1))
    assert retry[:2] == ["leaplm", "export"]
    before = snapshot(out)
    main(retry[1:])
    assert uploads[1:] == [(str(out), "someone/tiny")]
    assert "pushed: https://huggingface.co/someone/tiny/commit/1" in capsys.readouterr().out
    main(["export", str(out), "--out", str(out), "--push", "someone/tiny"])  # --out naming the export itself
    assert len(uploads) == 3 and snapshot(out) == before  # pushed as it was, not exported again
    with pytest.raises(ExportError, match="already an export; add --push"):
        main(["export", str(out)])


def test_export_refuses_a_checkpoint_changed_since_it_was_written(tmp_path, pretrain_run):
    shutil.copytree(pretrain_run, tmp_path / "run")
    weights = next((tmp_path / "run").glob("checkpoints/step-*/model/model.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(255 - b for b in data[-64:])  # flipped bits in the tensors: same size, header intact
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model/model\.safetensors"):
        main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    assert not (tmp_path / "export").exists()


def test_the_card_states_the_steps_of_the_checkpoint_exported(tmp_path):
    trained(tmp_path, "pretrain", "train.save_every=1", "train.keep_last=5")
    first = tmp_path / "run" / "checkpoints" / "step-000001"
    main(["export", str(first), "--out", str(tmp_path / "early")])
    main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "final")])
    assert "- steps: 1," in (tmp_path / "early" / "README.md").read_text()
    assert "- steps: 2," in (tmp_path / "final" / "README.md").read_text()
