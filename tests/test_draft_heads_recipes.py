"""The draft_heads and acceptance_head recipes: head-loss schedule, the Medusa, Hydra++ and Clover-2
losses against dense per-position references, the weighted soft BCE by hand, each variant through the trainer with its
export loading back, and the section errors."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from leaplm.config import ConfigError
from leaplm.data.sft import IGNORE_INDEX
from leaplm.data.tasks import make_split
from leaplm.inference.engine import Engine
from leaplm.inference.evaluate import task_prompts
from leaplm.models.zoo import load_model
from leaplm.train import acceptance_head, draft_heads
from leaplm.train.recipes import load_config
from leaplm.train.rollouts import answer_samples, choose_prompts, collect_greedy_answers, load_rollouts
from leaplm.train.trainer import train

from conftest import SMALL_ROLLOUT_RUN

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "draft_heads"
SMALL = [*SMALL_ROLLOUT_RUN, "rollout.max_prompts=6", "method.rollout_block_size=8", "train.micro_batch_size=4"]


def test_schedule_weights():
    assert draft_heads.schedule_weight("constant", 3, 10) == 1.0
    assert draft_heads.schedule_weight("linear", 3, 10) == pytest.approx(0.3)
    assert draft_heads.schedule_weight("sine", 5, 10) == pytest.approx(math.sin(math.pi / 4))
    assert draft_heads.schedule_weight("sine_0.5", 1, 10) == pytest.approx(math.sin(0.2 * math.pi / 2))
    assert draft_heads.schedule_weight("sine_0.5", 7, 10) == 1.0
    with pytest.raises(ConfigError, match="sine_<r>"):
        draft_heads.schedule_weight("sine_2", 1, 10)


def test_medusa1_loss_matches_a_per_head_reference(tmp_path):
    cfg = load_config(CONFIGS / "tiny_teacher.yaml", [*SMALL, f"output_dir={tmp_path}", "method.num_heads=2"])
    model, tokenizer = draft_heads.build_model(cfg)
    heads = model.draft_heads
    with torch.no_grad():  # heads that differ from the base's own LM head
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    samples = [{"input_ids": [5, 6, 7, 8, 9, 10], "labels": [IGNORE_INDEX] * 2 + [7, 8, 9, 10]},
               {"input_ids": [11, 12, 13, 14], "labels": [IGNORE_INDEX, 12, 13, 14]}]
    batch = {**draft_heads.RECIPE.build_collator(cfg, tokenizer)(samples), "step": 0}
    total, metrics = draft_heads.loss(model, batch, cfg)
    expected = 0.0
    for s in samples:
        ids = torch.tensor([s["input_ids"]])
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states[-1][0]  # [T, H]
        for k in range(2):
            for t in range(len(s["input_ids"]) - k - 2):
                if s["labels"][t + k + 2] != IGNORE_INDEX:
                    logits = heads.head(k, hidden[t])
                    target = torch.tensor([s["input_ids"][t + k + 2]])
                    # the Medusa fork counts heads from 1: its head 1 drafts t+2 (our head 0), weight decay^1
                    expected += 0.2 * 0.8 ** (k + 1) * F.cross_entropy(logits[None], target)
    assert total.detach().item() == pytest.approx(float(expected), rel=1e-4)
    assert set(metrics) == {"head0_top1", "head1_top1"}


@pytest.mark.parametrize("config", ["tiny_teacher_hydra_pp", "tiny_teacher_clover2"])
def test_distilled_heads_loss_matches_a_per_position_reference(config, tmp_path):
    """Hydra++'s and Clover-2's soft CE to the base's distribution, position by position: head k at
    t reads the prefix layer's state at t (Clover-2's with token t+1 mixed in first) and the
    embeddings of tokens t+1 .. t+k+1, and its teacher is the base's distribution at t+k+1 (the
    batched loss computes that distribution once for all heads); Clover-2 adds 10 x SmoothL1 of the
    head's output to the base's final hidden state at t+k+1, averaged over the hidden size."""
    cfg = load_config(CONFIGS / f"{config}.yaml", [*SMALL, f"output_dir={tmp_path}", "method.num_heads=3"])
    model, tokenizer = draft_heads.build_model(cfg)
    heads = model.draft_heads
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    samples = [{"input_ids": [5, 6, 7, 8, 9, 10, 11], "labels": [IGNORE_INDEX] * 2 + [7, 8, 9, 10, 11]},
               {"input_ids": [11, 12, 13, 14], "labels": [IGNORE_INDEX, 12, 13, 14]}]
    batch = {**draft_heads.RECIPE.build_collator(cfg, tokenizer)(samples), "step": 0}
    total, _ = draft_heads.loss(model, batch, cfg)
    embed = model.get_input_embeddings()
    expected = 0.0
    for s in samples:
        ids = torch.tensor([s["input_ids"]])
        T = ids.shape[1]
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
            base_logits, base = out.logits[0], out.hidden_states[-1]  # [T, V], [1, T, H]
            following = embed(torch.cat([ids[:, 1:], ids[:, -1:]], 1))  # [1, T, H]
            hidden = heads.run_prefix(base, following, torch.arange(T)[None],
                                      torch.ones(T, T, dtype=torch.bool).tril()[None])[0]  # [T, H]
            for k in range(3):
                for t in range(T - k - 2):
                    if s["labels"][t + k + 2] != IGNORE_INDEX:
                        features = heads.features(k, hidden[t][None], embed(ids[0, t + 1:t + k + 2])[None])[0]  # [H]
                        logits = heads.head_logits(k, features)  # [V]
                        teacher = base_logits[t + k + 1].softmax(-1)
                        expected += -(teacher * logits.log_softmax(-1)).sum()
                        if config == "tiny_teacher_clover2":
                            expected += 10 * F.smooth_l1_loss(features, base[0, t + k + 1])
    assert total.detach().item() == pytest.approx(float(expected), rel=1e-4)


def test_weighted_soft_bce_by_hand(tmp_path):
    cfg = load_config(REPO / "configs" / "acceptance_head" / "tiny_teacher.yaml",
                      [f"output_dir={tmp_path}", "model.name_or_path=tiny-teacher", "method.num_layers=0"])
    model, tokenizer = acceptance_head.build_model(cfg)
    with torch.no_grad():
        head = model.draft_heads.blocks[0][-1]
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, math.log(3.0)]))  # q_accept = 3/4 everywhere
    samples = [{"input_ids": [5, 6, 7, 8], "accept": [IGNORE_INDEX, 1.0, 0.5, 0.0]}]
    batch = acceptance_head.build_collator(cfg, tokenizer)(samples)
    total, _ = acceptance_head.loss(model, batch, cfg)
    w, la, lr = 6.0, -math.log(0.75), -math.log(0.25)
    assert total.item() == pytest.approx(la + (w * 0.5 * lr + 0.5 * la) + w * lr, rel=1e-5)
    assert batch["n_targets"].item() == pytest.approx(w * 1.5 + 1.5)


@pytest.mark.parametrize("config", [pytest.param("tiny_teacher", marks=pytest.mark.slow),
                                    pytest.param("tiny_teacher_medusa2", marks=pytest.mark.slow),
                                    "tiny_teacher_hydra_pp", "tiny_teacher_clover2"])
def test_variants_train_export_and_decode_losslessly(config, tmp_path):
    out = tmp_path / "model"
    result = train(load_config(CONFIGS / f"{config}.yaml", [*SMALL, f"output_dir={tmp_path}", "train.max_steps=3",
                                                            f"export.dir={out}"]))
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    model, tokenizer = load_model(str(out))
    kind = model.draft_heads.kind
    expected_kind = "hydra" if "hydra" in config else "clover" if "clover" in config else "medusa"
    assert kind == expected_kind and model.draft_heads.accuracy.any()
    engine = Engine(model, tokenizer)
    prompts = task_prompts(tokenizer, make_split("copy", "test", 2) + make_split("sort", "test", 1))
    assert engine.generate(prompts, kind, 24).sequences == engine.generate(prompts, "hf_generate", 24).sequences


@pytest.mark.slow
def test_acceptance_head_trains_on_draft_labels(tmp_path):
    draft_dir = tmp_path / "draft"
    teacher, tokenizer = load_model("tiny-teacher")
    teacher.save_pretrained(draft_dir)  # the teacher as its own draft: every greedy proposal is accepted
    tokenizer.save_pretrained(draft_dir)
    cfg = load_config(REPO / "configs" / "acceptance_head" / "tiny_teacher.yaml",
                      [*SMALL, f"output_dir={tmp_path}", f"model.name_or_path={draft_dir}", "train.max_steps=2",
                       f"export.dir={tmp_path / 'model'}"])
    train(cfg)
    samples = acceptance_head.build_dataset(cfg, tokenizer)
    labels = [a for s in samples for a in s["accept"] if a != IGNORE_INDEX]
    assert labels and all(a == 1.0 for a in labels)
    loaded, _ = load_model(str(tmp_path / "model"))
    assert loaded.draft_heads.kind == "acceptance"


def test_greedy_answers_are_the_same_whichever_decoder_collects_them(tmp_path, caplog):
    """ar, jacobi and the faster of the two (timed on the first 32 of 48 tokens, then decoding all 48)
    write the same rollouts, under one key; the pick is logged."""
    model, tokenizer = load_model("tiny-teacher")
    cfg = load_config(CONFIGS / "tiny_teacher.yaml", [*SMALL, f"output_dir={tmp_path}"])
    prompts = choose_prompts(cfg.data, tokenizer, 6, 48, 0)
    found = {}
    with caplog.at_level(logging.INFO, logger="leaplm.train.rollouts"):
        for name, decoder, pick_faster in [("ar", "ar", False), ("jacobi", "jacobi", False), ("auto", "ar", True)]:
            found[name] = collect_greedy_answers(model, tokenizer, prompts, tmp_path / name,
                                                 model_id={"name": "tiny-teacher"}, decoder=decoder,
                                                 pick_faster=pick_faster, jacobi_block_size=8, max_new_tokens=48,
                                                 batch_size=4, progress=False)
    answers = {name: answer_samples(load_rollouts(path)) for name, path in found.items()}
    assert answers["ar"] == answers["jacobi"] == answers["auto"] and all(a["answer_ids"] for a in answers["ar"])
    assert len({path.name for path in found.values()}) == 1  # keyed alike: a rerun reuses them whichever decodes
    assert re.search(r"first 32 tokens of 4 prompts, decoded both ways: ar 1\.00 tokens/forward, \d+ tokens/s; jacobi [\d.]+ tokens/forward, "
                     r"\d+ tokens/s; collecting with (ar|jacobi)", caplog.text)


@pytest.mark.parametrize("override,message", [
    ("rollout.decoder=block_diffusion", "draft_heads collects ar or jacobi rollouts: set rollout.decoder=ar"),
    ("method.variant=medusa3", "method.variant"),
    ("method.schedule=cosine", "sine_<r>"),
    ("model.lora.r=8", "keeps the base frozen"),
])
def test_errors(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        cfg = load_config(CONFIGS / "tiny_teacher.yaml", [override])
        draft_heads.check_sections(cfg)


def test_medusa2_needs_lora():
    with pytest.raises(ConfigError, match="model.lora.r > 0"):
        draft_heads.check_sections(load_config(CONFIGS / "tiny_teacher_medusa2.yaml", ["model.lora.r=0"]))
