"""The model zoo: tiny models per family, architecture checks, loading, the embedded teacher."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM, PreTrainedTokenizerFast

from leaplm.data.sft import tokenize_chat
from leaplm.models import zoo
from leaplm.models.zoo import (
    EMBEDDED_TEACHER_DIR,
    TINY_CONFIGS,
    TINY_FAMILIES,
    UnsupportedModelError,
    build_from_config,
    causal_lm_class,
    final_hidden_states,
    load_model,
    load_tokenizer,
    prepare_tokenizer,
)

TEACHER_WEIGHTS = EMBEDDED_TEACHER_DIR / "model.safetensors"
needs_teacher_weights = pytest.mark.skipif(
    not TEACHER_WEIGHTS.is_file(),
    reason=f"{TEACHER_WEIGHTS} is not trained yet (leaplm train configs/pretrain/tiny_teacher.yaml)",
)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_of_each_family_runs_a_forward(tiny, family):
    model, tokenizer = tiny(family)
    assert model.config.model_type == TINY_CONFIGS[family]["architecture"]
    assert model.config.vocab_size == len(tokenizer)
    ids = torch.tensor([tokenize_chat(tokenizer, [{"role": "user", "content": "What is 12 + 30?"},
                                                  {"role": "assistant", "content": "#### 42"}])["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # [1, s, v]
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_families_without_sdpa_get_eager_attention(tiny):
    class NoSdpa:  # as Gemma 2 in recent transformers releases
        _supports_sdpa = False

    assert zoo.attention_for(NoSdpa, "sdpa") == "eager"
    assert zoo.attention_for(NoSdpa, "flex_attention") == "flex_attention"
    assert zoo.attention_for(LlamaForCausalLM, "sdpa") == "sdpa"
    model, _ = tiny("gemma2")
    assert model.config._attn_implementation == ("sdpa" if type(model)._supports_sdpa else "eager")


def test_unknown_tiny_family_lists_the_available_ones():
    with pytest.raises(KeyError, match="available: llama, qwen2"):
        zoo.tiny_model("gpt2")


# A model the engine cannot decode, refused from its config alone, and the piece the message names.
REFUSED = {
    "t5": ({}, "'t5' is an encoder-decoder model"),
    "distilbert": ({}, "'distilbert' is not a causal LM: transformers has no AutoModelForCausalLM class"),
    "mamba": ({}, "MambaForCausalLM keeps a recurrent state"),
    "openai-gpt": ({}, "OpenAIGPTLMHeadModel has no KV cache support"),
    "bloom": ({}, "BloomForCausalLM's forward takes no position ids"),
    "llama4_text": ({"num_hidden_layers": 2}, "Llama4ForCausalLM has layers of type 'chunked_attention'"),
}


@pytest.mark.parametrize("model_type", list(REFUSED))
def test_a_model_the_engine_cannot_decode_is_refused_before_its_weights_load(tmp_path, model_type):
    settings, message = REFUSED[model_type]
    AutoConfig.for_model(model_type, **settings).save_pretrained(tmp_path)  # a config and no weights
    with pytest.raises(UnsupportedModelError, match=message):
        load_model(str(tmp_path))


def test_any_decoder_only_causal_lm_is_accepted_without_a_list():
    for model_type in ("gpt2", "opt", "phi", "gpt_neox", "falcon", "olmoe", "mixtral", "deepseek_v3"):
        assert causal_lm_class(AutoConfig.for_model(model_type)).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def test_an_encoder_behind_a_causal_lm_head_is_refused_unless_it_is_a_decoder():
    tokenizer = load_tokenizer("tiny-teacher")
    bert = dict(architecture="bert", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(UnsupportedModelError, match=r"attention is not causal \(BertSelfAttention with "
                       r"is_causal=False\); if the family has a decoder mode, set is_decoder=true"):
        build_from_config(bert, tokenizer)
    assert build_from_config(dict(bert, is_decoder=True), tokenizer).config.is_decoder


@pytest.mark.parametrize("family", ["granite", "cohere"])
def test_the_fused_loss_refuses_logits_scaled_after_the_head(tiny, family):
    """Granite divides its logits by logits_scaling, Cohere multiplies them by logit_scale: hidden @ head.T
    is not their logits, so the chunked loss would train on the wrong distribution."""
    model, _ = tiny(family)
    with pytest.raises(ValueError, match="not its last hidden state times its head weight .* train.fused_loss=false"):
        final_hidden_states(model, input_ids=torch.tensor([[3, 4, 5]]))
    hidden, weight = final_hidden_states(tiny("llama")[0], input_ids=torch.tensor([[3, 4, 5]]))
    assert hidden.shape == (1, 3, 64) and weight.shape[1] == 64


def test_build_from_config_checks_the_architecture():
    tokenizer = load_tokenizer("tiny-teacher")
    with pytest.raises(UnsupportedModelError, match="'distilbert' is not a causal LM"):
        build_from_config({"architecture": "distilbert", "n_layers": 1}, tokenizer)
    with pytest.raises(ValueError, match="model.init needs an 'architecture' key"):
        build_from_config({"hidden_size": 64}, tokenizer)


def test_load_model_round_trips_a_saved_checkpoint(tiny, tiny_model_dir):
    original, tokenizer = tiny("llama")
    model, loaded_tokenizer = load_model(str(tiny_model_dir))
    expected = original.state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(t, expected[k]) for k, t in model.state_dict().items())
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    half, _ = load_model(str(tiny_model_dir), dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_tokenizer_without_eos_is_rejected_with_the_fix():
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    with pytest.raises(ValueError, match=r"has no eos_token; set one \(tokenizer.eos_token = ...\)"):
        prepare_tokenizer(tokenizer)


def test_missing_pad_token_falls_back_to_eos():
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), eos_token="</s>")
    assert prepare_tokenizer(tokenizer).pad_token == "</s>"


def test_embedded_teacher_tokenizer_is_byte_level_bpe_with_a_chat_template():
    tokenizer = load_tokenizer("tiny-teacher")
    vocab = tokenizer.get_vocab()
    # Byte-level: all 256 byte symbols are in the vocabulary, so any text round-trips...
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= vocab.keys()
    text = "naïve 東京 🙂, 12 + 30 = 42"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    # ...and BPE, not per-character: merges beyond the bytes and the special tokens, so that
    # common words of the task corpus are single tokens.
    assert len(tokenizer) > 256 + len(tokenizer.all_special_tokens)
    for word in (" the", " has", " time", " upon", " named", " found", " apple"):
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
    assert tokenizer.eos_token == "<|end|>" and tokenizer.pad_token_id is not None
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == "<|user|>\nhi<|end|><|assistant|>\n"


@needs_teacher_weights
def test_teacher_loads_with_plain_transformers_and_is_small():
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_TEACHER_DIR)
    assert model.config.model_type == "llama"
    size = sum(f.stat().st_size for f in EMBEDDED_TEACHER_DIR.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, f"{EMBEDDED_TEACHER_DIR} is {size / 2**20:.1f} MiB; the wheel ships it"


@needs_teacher_weights
def test_teacher_loads_through_the_zoo_with_a_matching_tokenizer():
    model, tokenizer = load_model("tiny-teacher")
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id


def test_export_in_half_precision_casts_a_copy(tmp_path, tiny):
    """export.dtype=float16 halves the files and leaves the live model as it was."""
    from safetensors import safe_open

    from leaplm.ship.export import export_model
    from leaplm.train.recipes import load_config

    model, tokenizer = tiny("llama")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    cfg = load_config()
    cfg.export.dtype = "float16"
    export_model(model, tokenizer, cfg, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.float16}
    assert AutoModelForCausalLM.from_pretrained(tmp_path).dtype == torch.float16  # config.json says so
    assert model.dtype == torch.float32
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    reloaded, _ = load_model(str(tmp_path))  # leaplm loads float32 by default: upcast, exact
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, before[name].half().float(), rtol=0, atol=0)


def test_missing_embedded_model_names_the_rebuild_command(monkeypatch, tmp_path):
    monkeypatch.setattr(zoo, "EMBEDDED_BLOCK_DIFFUSION_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="leaplm train configs/ar2bd/tiny_teacher.yaml"):
        zoo.resolve(zoo.EMBEDDED_BLOCK_DIFFUSION)
