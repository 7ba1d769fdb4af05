"""AR -> block-diffusion adaptation: mask rule, two-stream layout, loss, FlexAttention vs dense, recipe."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from leaplm.config import ConfigError
from leaplm.data.sft import tokenize_chat
from leaplm.losses.block_diffusion import (
    AR_TARGET,
    BLOCK_START_TARGET,
    NOISY_TARGET,
    block_diffusion_loss_sum,
    build_batch,
    sample_masks,
)
from leaplm.losses.causal_lm import causal_lm_loss_sum
from leaplm.models.block_diffusion import (
    BlockDiffusionError,
    add_mask_token,
    attention_rule,
    convert,
    spec_of,
    training_attention,
)
from leaplm.models.two_stream import StreamLayout, attention_backend
from leaplm.models.zoo import tiny_model
from leaplm.train.recipes import load_config

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12]]
RESPONSES = [[20, 21, 22, 23, 24, 25], [30, 31, 32]]


def converted(family: str, block_size: int = 4, clean_attention: str = "causal"):
    model, tokenizer = tiny_model(family)
    tokenizer = copy.deepcopy(tokenizer)  # the mask token must not leak into other tests' tokenizer
    spec = convert(model, tokenizer, block_size, clean_attention)
    return model, tokenizer, spec


def layout_for(block_size, masks, ar_weight=0.0, inverse_t=False, mask_id=99):
    rates = [torch.full((len(m),), 0.5) for m in masks]
    return build_batch(PROMPTS, RESPONSES, masks, rates, block_size, mask_id, inverse_t_weight=inverse_t,
                       ar_weight=ar_weight)


# ----- Mask rule against a hand-written case -----------------------------------------------------


@pytest.mark.parametrize("clean_attention", ["causal", "block_causal"])
def test_dense_mask_matches_hand_written_case(clean_attention):
    # Prompt of 1 token (P), response of 4 tokens in 2 blocks of 2: columns are
    # clean [P a0 a1 b0 b1] then noisy [a0' a1' b0' b1'] then one padding column.
    s = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, -1]])
    k = torch.tensor([[-1, 0, 0, 1, 1, 0, 0, 1, 1, 2]])
    p = torch.tensor([[0, 1, 2, 3, 4, 1, 2, 3, 4, 0]])
    got = StreamLayout(torch.zeros_like(s), p, s, k).dense_mask(attention_rule(clean_attention))[0, 0].int()
    causal = [
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        # noisy block 0: the prompt, and its own block both ways
        [1, 0, 0, 0, 0, 1, 1, 0, 0, 0],
        [1, 0, 0, 0, 0, 1, 1, 0, 0, 0],
        # noisy block 1: prompt + clean block 0, and its own block
        [1, 1, 1, 0, 0, 0, 0, 1, 1, 0],
        [1, 1, 1, 0, 0, 0, 0, 1, 1, 0],
        # padding sees itself only
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    ]
    expected = torch.tensor(causal)
    if clean_attention == "block_causal":  # clean tokens also see later tokens of their own block
        expected[1, 2] = expected[3, 4] = 1
    assert torch.equal(got, expected)


def test_layout_streams_positions_and_targets():
    masks = [torch.tensor([False, True, False, True, False, True]), torch.tensor([False, True, True])]
    layout, targets = layout_for(4, masks, ar_weight=0.5)
    # row 0: prompt 3 + response 6 padded to 8, twice -> 19 columns; row 1: 5 + 2 * 4 = 13
    assert layout.input_ids.shape == (2, 19)
    assert layout.input_ids[0, :11].tolist() == [5, 6, 7, 20, 21, 22, 23, 24, 25, 99, 99]
    assert layout.input_ids[0, 11:19].tolist() == [20, 99, 22, 99, 24, 99, 99, 99]  # noisy copy, padded with masks
    assert layout.position_ids[0, 11:19].tolist() == list(range(3, 11))  # same positions as the clean response
    assert layout.block[0, :11].tolist() == [-1, -1, -1, 0, 0, 0, 0, 1, 1, 1, 1]
    assert layout.stream[1, 13:].tolist() == [-1] * 6
    noisy = targets.kinds == NOISY_TARGET
    # token shift: masked slot j (response token) is read from noisy slot j-1
    assert targets.cols[noisy & (targets.rows == 0)].tolist() == [11 + 0, 11 + 2, 11 + 4]
    assert targets.labels[noisy & (targets.rows == 0)].tolist() == [21, 23, 25]
    starts = targets.kinds == BLOCK_START_TARGET
    # block starts (slots 0 and 4) from the clean logit just before them
    assert targets.cols[starts & (targets.rows == 0)].tolist() == [2, 6]
    assert targets.labels[starts & (targets.rows == 0)].tolist() == [20, 24]
    ar = targets.kinds == AR_TARGET
    assert targets.labels[ar].tolist() == RESPONSES[0] + RESPONSES[1]
    assert set(targets.weights[ar].tolist()) == {0.5}


def test_complementary_view_supervises_every_answer_token_once():
    torch.manual_seed(0)
    lengths = [37, 5, 16]
    masks, rates = sample_masks(lengths, 8, 0.2, 0.8, complementary=True)
    assert len(masks) == 6
    for i, n in enumerate(lengths):
        both = masks[i].int() + masks[i + 3].int()
        starts = torch.arange(n) % 8 == 0
        assert both[starts].eq(0).all() and both[~starts].eq(1).all()
        assert ((rates[i] + rates[i + 3] - 1).abs() < 1e-6).all()  # complementary rate 1 - t
        assert rates[i].min() >= 0.2 and rates[i].max() <= 0.8


def test_inverse_t_weight():
    masks = [torch.tensor([False, True, False, False, False, False]), torch.tensor([False, False, True])]
    _, targets = layout_for(4, masks, inverse_t=True)
    assert targets.weights[targets.kinds == NOISY_TARGET].tolist() == [2.0, 2.0]  # 1 / 0.5


# ----- The model under the mask -------------------------------------------------------------------


def noisy_logits(model, layout):
    with torch.no_grad():
        return model(input_ids=layout.input_ids, position_ids=layout.position_ids,
                     attention_mask=training_attention(model, layout, "dense")).logits


@pytest.mark.parametrize("clean_attention", ["causal", "block_causal"])
def test_noisy_stream_cannot_see_its_own_clean_block(clean_attention):
    """Changing the clean copy of block 1 must not move block 1's noisy logits; block 2's must move."""
    model, _, spec = converted("llama", 4, clean_attention)
    masks = [torch.ones(6, dtype=torch.bool) & (torch.arange(6) % 4 != 0), torch.tensor([False, True, True])]
    layout, _ = build_batch(PROMPTS, RESPONSES, masks, [m.float() for m in masks], 4, spec.mask_token_id,
                            inverse_t_weight=False, ar_weight=0.0)
    before = noisy_logits(model, layout)
    changed = copy.deepcopy(layout)
    changed.input_ids[0, 3 + 1] = 40  # clean response slot 1 (block 0)
    after = noisy_logits(model, changed)
    noisy_block0, noisy_block1 = slice(11, 15), slice(15, 19)
    assert torch.allclose(before[0, noisy_block0], after[0, noisy_block0], atol=1e-6)
    assert not torch.allclose(before[0, noisy_block1], after[0, noisy_block1], atol=1e-4)
    assert torch.equal(before[1], after[1])


def test_block_size_one_is_the_ar_loss():
    """With blocks of one token every target is a block start: the loss is the plain AR loss."""
    model, tokenizer, spec = converted("qwen3", 1)
    sample = tokenize_chat(tokenizer, [{"role": "user", "content": "copy: red fox"},
                                       {"role": "assistant", "content": "red fox jumps over the dog"}])
    start = sample["labels"].index(next(x for x in sample["labels"] if x != -100))
    prompt, response = sample["input_ids"][:start], sample["input_ids"][start:]
    masks, rates = sample_masks([len(response)], 1, 0.0, 1.0, complementary=True)
    layout, targets = build_batch([prompt], [response], masks, rates, 1, spec.mask_token_id,
                                  inverse_t_weight=False, ar_weight=0.0)
    ours, _ = block_diffusion_loss_sum(noisy_logits(model, layout), targets)
    ids = torch.tensor([sample["input_ids"]])
    with torch.no_grad():
        reference = causal_lm_loss_sum(model(input_ids=ids).logits, torch.tensor([sample["labels"]]))
    assert torch.allclose(ours, reference, atol=1e-4)


FLEX_FAMILIES = ["llama", "qwen3", "gemma"]


@pytest.mark.parametrize("family", FLEX_FAMILIES)
def test_flex_attention_equals_dense_loss(family, static_flex_compile):
    """FlexAttention block mask and the dense SDPA reference give the same loss (forward; CPU)."""
    model, _, spec = converted(family, 4, "block_causal")
    torch.manual_seed(1)
    masks, rates = sample_masks([len(r) for r in RESPONSES], 4, 0.001, 1.0, complementary=True)
    layout, targets = build_batch(PROMPTS, RESPONSES, masks, rates, 4, spec.mask_token_id,
                                  inverse_t_weight=True, ar_weight=0.0)
    dense, _ = block_diffusion_loss_sum(noisy_logits(model, layout), targets)
    model.set_attn_implementation("flex_attention")
    with torch.no_grad():
        logits = model(input_ids=layout.input_ids, position_ids=layout.position_ids,
                       attention_mask=training_attention(model, layout, "flex")).logits
    flex, _ = block_diffusion_loss_sum(logits, targets)
    assert abs(flex.item() - dense.item()) / len(targets.rows) < 1e-5


def loss_and_gradients(model, layout, targets, backend):
    """The recipes' training forward: the attention implementation switched for the backend only inside it."""
    model.zero_grad()
    with attention_backend(model, backend):
        logits = model(input_ids=layout.input_ids, position_ids=layout.position_ids,
                       attention_mask=training_attention(model, layout, backend)).logits
    loss, _ = block_diffusion_loss_sum(logits, targets)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def assert_flex_gradients_equal_dense(family, device):
    model, _, spec = converted(family, 4, "block_causal")
    model = model.to(device).train()
    torch.manual_seed(2)
    masks, rates = sample_masks([len(r) for r in RESPONSES], 4, 0.001, 1.0, complementary=True)
    layout, targets = build_batch(PROMPTS, RESPONSES, masks, rates, 4, spec.mask_token_id,
                                  inverse_t_weight=False, ar_weight=0.5)
    layout, targets = layout.to(device), targets.to(device)
    model.set_attn_implementation("sdpa")
    dense_loss, dense_grads = loss_and_gradients(model, layout, targets, "dense")
    flex_loss, flex_grads = loss_and_gradients(model, layout, targets, "flex")
    assert model.config._attn_implementation == "sdpa"  # the engine decodes with it again
    assert abs(flex_loss - dense_loss) / len(targets.rows) < 1e-5
    torch.testing.assert_close(flex_grads, dense_grads, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FLEX_FAMILIES)
def test_flex_attention_equals_dense_gradients_on_cpu(family, eager_flex_backward_on_cpu):
    assert_flex_gradients_equal_dense(family, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention backward needs CUDA")
@pytest.mark.parametrize("family", FLEX_FAMILIES)
def test_flex_attention_equals_dense_gradients_on_cuda(family):
    assert_flex_gradients_equal_dense(family, "cuda")


def test_flex_training_on_cpu_is_a_clear_error():
    model, _, spec = converted("llama", 4)
    model.set_attn_implementation("flex_attention")
    layout, _ = layout_for(4, [torch.zeros(6, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)])
    with pytest.raises(BlockDiffusionError, match="train.attention=dense"):
        training_attention(model, layout, "flex")


# ----- Conversion and bad input ------------------------------------------------------------------


def test_convert_adds_a_mask_token_with_a_mean_embedding():
    model, tokenizer = tiny_model("llama")
    tokenizer = copy.deepcopy(tokenizer)
    before = model.get_input_embeddings().weight.detach().clone()
    spec = convert(model, tokenizer, 8)
    assert tokenizer.mask_token == "<|mask|>" and spec.mask_token_id == len(tokenizer) - 1
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == spec.mask_token_id + 1
    assert torch.allclose(weight[spec.mask_token_id], before.mean(0), atol=1e-6)
    assert spec_of(model).block_size == 8
    assert tokenizer.decode([spec.mask_token_id]) == "<|mask|>"


def test_tokenizer_that_cannot_take_the_mask_token():
    model, tokenizer = tiny_model("llama")
    tokenizer = copy.deepcopy(tokenizer)
    ordinary = next(t for t in tokenizer.get_vocab() if t not in tokenizer.all_special_tokens and len(t) > 1)
    with pytest.raises(BlockDiffusionError, match="ordinary token"):
        add_mask_token(model, tokenizer, ordinary)


def test_unconverted_model_is_a_clear_error():
    model, _ = tiny_model("llama")
    with pytest.raises(BlockDiffusionError, match="not a block-diffusion model"):
        spec_of(model)


def test_config_errors(tmp_path):
    with pytest.raises(Exception, match="does not divide the configured length 256"):
        from leaplm.train.ar2bd import build_model

        build_model(load_config(None, ["recipe=ar2bd", "data.max_length=256", "method.block_size=12"]))
    with pytest.raises(ConfigError, match="needs method.clean_attention=causal"):
        load_config(None, ["recipe=ar2bd", "method.clean_attention=block_causal", "method.ar_weight=1.0"])
    with pytest.raises(ConfigError, match="must divide method.block_size"):
        load_config(None, ["recipe=ar2bd", "method.block_size=8", "method.block_size_curriculum=[1,3]",
                           "method.curriculum_steps=10"])


def test_block_size_curriculum():
    cfg = load_config(None, ["recipe=ar2bd", "method.block_size=16", "method.block_size_curriculum=[1,2,4,8]",
                             "method.curriculum_steps=100"])
    sizes = [cfg.method.block_size_at(s) for s in (0, 24, 25, 50, 75, 99, 100, 5000)]
    assert sizes == [1, 1, 2, 4, 8, 8, 16, 16]


# ----- The recipe through the trainer ------------------------------------------------------------

AR2BD_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ar2bd" / "tiny_teacher.yaml"


def ar2bd_run(tmp_path, model_dir, *extra):
    """A few steps of the shipped tiny-teacher config on a tiny model, exported in float32 (the
    config ships float16 weights) so tests can compare trained weights with the base model's."""
    from leaplm.train.trainer import train

    cfg = load_config(AR2BD_CONFIG, [
        f"model.name_or_path={model_dir}", f"output_dir={tmp_path / 'run'}", "data.tasks=[copy,sort]",
        "data.train_per_task=24", "data.max_length=128", "method.block_size=4", "method.block_size_curriculum=[1,2]",
        "method.curriculum_steps=2", "train.max_steps=4", "train.micro_batch_size=4", "train.warmup_steps=0",
        "train.lr=1e-3", "train.save_every=0", "train.log_every=1", "eval.at_end=false",
        f"export.dir={tmp_path / 'model'}", "export.dtype=null", "logging.progress_bar=false", *extra])
    return train(cfg), cfg


@pytest.mark.parametrize("lora", [False, True])
def test_ar2bd_recipe_trains_and_exports_a_block_diffusion_model(tmp_path, tiny_model_dir, lora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = ["model.lora.r=4"] if lora else []
    result, _ = ar2bd_run(tmp_path, tiny_model_dir, *extra)
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["block_size"] for row in logged if "block_size" in row] == [1.0, 2.0, 4.0, 4.0]
    assert all("ce_masked" in row for row in logged[2:4])  # blocks of 4 have masked slots
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    spec = spec_of(model)
    assert spec.block_size == 4 and spec.mask_token_id == tokenizer.mask_token_id
    assert model.get_input_embeddings().weight.shape[0] > spec.mask_token_id
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [not torch.equal(p, base.state_dict()[n]) for n, p in model.state_dict().items()
               if n in base.state_dict() and p.shape == base.state_dict()[n].shape]
    assert any(changed) if lora else all(changed)
    # the mask token's row starts at the mean embedding and is trained, under LoRA too
    initial = base.get_input_embeddings().weight.mean(0)
    assert not torch.allclose(model.get_input_embeddings().weight[spec.mask_token_id], initial, atol=1e-5)


def test_attention_bench_reports_both_backends(tmp_path):
    from leaplm.bench.attention import run

    rows = run([48], steps=1, block_size=8, batch_size=1, out=tmp_path)
    assert {(r["backend"], r["mode"]) for r in rows} == {("dense", "train"), ("dense", "forward"), ("flex", "forward")}
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert (tmp_path / "attention_bench.md").read_text().count("| 48 |") == 3
