"""Recipe: adapt an AR causal LM into a block-diffusion LM (Fast-dLLM v2, NBDiff).

Model: any zoo causal LM plus a mask token (``models/block_diffusion.py``), trained on the
two-stream ``[clean | noisy]`` layout under the BD3-style mask, with FlexAttention on GPUs and
the dense mask (its reference) on CPU.
Data: chat samples (synthetic suite or any prompt/response dataset); the response is noised.
Loss: masked-token CE with token shift, per-block noise level, optional 1/t weight and
complementary view, block-start CE, optional auxiliary AR loss (``losses/block_diffusion.py``);
the block size can grow over training (NBDiff's curriculum, AR = block size 1). With
``method.noisy_weights: separate`` only noisy tokens' copies of the linear layers train and the
clean stream stays the original model (``models/noisy_weights.py``).
Decoder for eval and bench: ``block_diffusion`` (``inference/decoders/block_diffusion.py``).

    leaplm train configs/ar2bd/tiny_teacher.yaml
    accelerate launch --config_file launch/accelerate/zero2.yaml -m leaplm.train configs/ar2bd/qwen2.5-1.5b.yaml
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from leaplm.config import Config, ConfigError
from leaplm.losses.block_diffusion import block_diffusion_loss_sum, build_batch, sample_masks
from leaplm.models.block_diffusion import (
    CLEAN_ATTENTION,
    MASK_TOKEN,
    BlockDiffusionError,
    check_block_size,
    convert,
    spec_of,
    training_attention,
)
from leaplm.models.noisy_weights import split_noisy_weights
from leaplm.models.two_stream import two_stream_forward
from leaplm.models.zoo import load_model
from leaplm.train.block_diffusion import prompt_response_dataset
from leaplm.train.recipes import NOISE_SEED, Recipe, sample_generators

NOISY_WEIGHTS = ("shared", "separate")


@dataclass
class AR2BDConfig:
    block_size: int = 16  # the block size the model decodes with (after the curriculum)
    # Block sizes to train with first, spread evenly over `curriculum_steps` (NBDiff starts at
    # 1, i.e. plain AR). Each must divide block_size. Empty = block_size from the start.
    block_size_curriculum: list[int] = field(default_factory=list)
    curriculum_steps: int = 0
    clean_attention: str = "causal"  # causal (NBDiff, AR-exact cache) | block_causal (BD3-LM, Fast-dLLM v2)
    t_min: float = 0.001  # per-block noise level t ~ U(t_min, t_max)
    t_max: float = 1.0
    complementary: bool = True  # second view masks exactly the complement (Fast-dLLM v2)
    inverse_t_weight: bool = False  # MDLM/BD3-LM 1/t weight; Fast-dLLM v2 uses none
    ar_weight: float = 0.0  # auxiliary AR loss on the clean stream (NBDiff); needs clean_attention=causal
    mask_token: str = MASK_TOKEN
    # shared: one set of weights for both streams (the papers). separate: noisy tokens get their own
    # trained copy of every linear layer and the clean stream stays the original model, so verified
    # decoding emits exactly its greedy output (models/noisy_weights.py); twice the linear weights.
    noisy_weights: str = "shared"

    def __post_init__(self):
        check_block_size(self.block_size, what="method.block_size")
        for size in self.block_size_curriculum:
            check_block_size(size, what="method.block_size_curriculum entries")
            if self.block_size % size:
                raise ConfigError(f"method.block_size_curriculum entry {size} must divide method.block_size={self.block_size}")
        if self.block_size_curriculum and self.curriculum_steps < len(self.block_size_curriculum):
            raise ConfigError("method.curriculum_steps must be at least the number of curriculum stages")
        if self.clean_attention not in CLEAN_ATTENTION:
            raise ConfigError(f"method.clean_attention must be one of {', '.join(CLEAN_ATTENTION)}")
        if not 0 <= self.t_min < self.t_max <= 1:
            raise ConfigError(f"need 0 <= method.t_min < method.t_max <= 1, got {self.t_min}, {self.t_max}")
        if self.ar_weight < 0:
            raise ConfigError("method.ar_weight must be >= 0")
        if self.ar_weight > 0 and self.clean_attention != "causal":
            raise ConfigError(
                "method.ar_weight > 0 needs method.clean_attention=causal: under block_causal a clean token sees the "
                "rest of its block, so next-token prediction on it would read the answer"
            )
        if self.noisy_weights not in NOISY_WEIGHTS:
            raise ConfigError(f"method.noisy_weights must be one of {', '.join(NOISY_WEIGHTS)}, got {self.noisy_weights!r}")
        if self.noisy_weights == "separate" and self.ar_weight > 0:
            raise ConfigError(
                "method.noisy_weights=separate keeps the clean stream the original, frozen model: set method.ar_weight=0 "
                "(an AR loss on it would train nothing)"
            )

    def block_size_at(self, step: int) -> int:
        if step >= self.curriculum_steps or not self.block_size_curriculum:
            return self.block_size
        return self.block_size_curriculum[step * len(self.block_size_curriculum) // self.curriculum_steps]


def build_model(cfg: Config):
    m: AR2BDConfig = cfg.method
    check_block_size(m.block_size, cfg.data.max_length, "method.block_size")
    if m.noisy_weights == "separate" and cfg.train.fused_loss:
        raise ConfigError("method.noisy_weights=separate needs train.fused_loss=false: the fused loss reads the clean "
                          "stream's LM head, which stays the original, frozen model")
    # Loaded as configured (sdpa/eager), as the block_diffusion decoder runs it for eval and export;
    # the loss switches to FlexAttention for its forward when the backend is flex.
    model, tokenizer = load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.attn_implementation,
                                  cfg.model.tokenizer)
    if getattr(model.config, "block_diffusion", None):
        raise BlockDiffusionError(f"{cfg.model.name_or_path} is already a block-diffusion model; start from an AR model")
    convert(model, tokenizer, m.block_size, m.clean_attention, m.mask_token)
    if m.noisy_weights == "separate":  # LoRA and gradient checkpointing are refused by the trainer
        split_noisy_weights(model)
    return model, tokenizer


def collate(samples):
    n_answer = sum(len(s["response"]) for s in samples)
    return {
        "prompts": [s["prompt"] for s in samples],
        "responses": [s["response"] for s in samples],
        # masks are drawn in the loss, which knows the step's block size (curriculum)
        "noise_seeds": [s[NOISE_SEED] for s in samples],
        "n_targets": torch.tensor(n_answer),
        "n_tokens": torch.tensor(sum(len(s["prompt"]) for s in samples) + n_answer),
    }


def build_collator(cfg: Config, tokenizer):
    return collate


def loss(model, batch, cfg: Config):
    m: AR2BDConfig = cfg.method
    spec = spec_of(model)
    block_size = m.block_size_at(batch["step"])
    masks, rates = sample_masks([len(r) for r in batch["responses"]], block_size, m.t_min, m.t_max, m.complementary,
                                generator=sample_generators(batch["noise_seeds"]))
    layout, targets = build_batch(batch["prompts"], batch["responses"], masks, rates, block_size, spec.mask_token_id,
                                  inverse_t_weight=m.inverse_t_weight, ar_weight=m.ar_weight)
    device = next(model.parameters()).device
    layout, targets = layout.to(device), targets.to(device)
    if cfg.train.fused_loss:
        hidden, head = two_stream_forward(model, layout, cfg.train.attention, training_attention,
                                          hidden_states=True)  # [v*b, T, h], [V, h]
        loss_sum, metrics = block_diffusion_loss_sum(hidden, targets, head=head)
    else:
        logits = two_stream_forward(model, layout, cfg.train.attention, training_attention)  # [v*b, T, V]
        loss_sum, metrics = block_diffusion_loss_sum(logits, targets)
    return loss_sum, {**metrics, "block_size": float(block_size)}


RECIPE = Recipe(
    name="ar2bd",
    description="AR to block-diffusion adaptation (two-stream BD3 mask, token shift, complementary view)",
    method_config=AR2BDConfig,
    build_model=build_model,
    build_dataset=prompt_response_dataset,
    build_collator=build_collator,
    loss=loss,
    decoder=lambda cfg: ("block_diffusion", {"block_size": cfg.method.block_size}),
    new_token_ids=lambda model: [spec_of(model).mask_token_id],
)
