"""Recipe: AR pretraining / supervised fine-tuning of a causal LM.

Data: chat samples (synthetic suite or any prompt/response dataset), response-only loss.
Loss: next-token cross-entropy (losses/causal_lm.py; with `train.fused_loss`, chunked from the hidden
states by losses/linear_cross_entropy.py). Decoder for eval: `ar`.
With `model.init` set, a random model of that architecture is built and a byte-level BPE
tokenizer is trained on the configured data's training texts: this is how the embedded tiny teacher is made.

    leaplm train configs/pretrain/tiny_teacher.yaml
    accelerate launch --config_file launch/accelerate/multi_gpu.yaml -m leaplm.train CONFIG
"""

from __future__ import annotations

from dataclasses import dataclass

from leaplm.config import Config
from leaplm.data.sft import PadCollator, load_source, model_inputs, pack, to_messages, tokenize_dataset
from leaplm.data.tokenizer import train_tokenizer
from leaplm.losses.causal_lm import causal_lm_loss_sum
from leaplm.losses.linear_cross_entropy import linear_cross_entropy_sum
from leaplm.models.zoo import build_from_config, final_hidden_states, load_model, load_tokenizer
from leaplm.train.recipes import Recipe


@dataclass
class PretrainConfig:
    """No settings of its own: the shared sections hold them all (``train.fused_loss`` for the chunked loss)."""


def build_model(cfg: Config):
    if cfg.model.init is None:
        return load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.attn_implementation, cfg.model.tokenizer)
    if cfg.model.tokenizer:
        tokenizer = load_tokenizer(cfg.model.tokenizer)
    else:
        # The configured data's own training texts, so a tokenizer for code is trained on code.
        corpus = load_source(cfg.data, "train")
        tokenizer = train_tokenizer(("\n".join(m["content"] for m in to_messages(row, cfg.data)) for row in corpus),
                                    cfg.model.tokenizer_vocab_size)
    return build_from_config(cfg.model.init, tokenizer, seed=cfg.seed, attn_implementation=cfg.model.attn_implementation), tokenizer


def build_dataset(cfg: Config, tokenizer):
    samples = tokenize_dataset(load_source(cfg.data), tokenizer, cfg.data).samples
    return pack(samples, cfg.data.max_length) if cfg.data.packing else samples


def build_collator(cfg: Config, tokenizer):
    return PadCollator(tokenizer.pad_token_id)


def loss(model, batch, cfg: Config):
    if cfg.train.fused_loss:
        hidden, head = final_hidden_states(model, **model_inputs(batch), use_cache=False)  # [b, s, h], [v, h]
        return linear_cross_entropy_sum(hidden[:, :-1], head, batch["labels"][:, 1:]), {}
    logits = model(**model_inputs(batch), use_cache=False).logits  # [b, s, v]
    return causal_lm_loss_sum(logits, batch["labels"]), {}


RECIPE = Recipe(
    name="pretrain",
    description="AR pretraining / SFT with response-only next-token loss",
    method_config=PretrainConfig,
    build_model=build_model,
    build_dataset=build_dataset,
    build_collator=build_collator,
    loss=loss,
    decoder=lambda cfg: ("ar", {}),
)
