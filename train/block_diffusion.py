"""What the block-diffusion recipes share beyond the model itself: loading an adapted model as
configured, reading its block size and mask token before it is loaded, and the (prompt, answer)
samples of the configured data. ar2bd adapts the model; dparallel, cd4lm and learn2pd start
from one.
"""

from __future__ import annotations

from transformers import AutoConfig

from leaplm.config import Config, ConfigError
from leaplm.data.sft import IGNORE_INDEX, load_source, tokenize_dataset
from leaplm.models.block_diffusion import BlockDiffusionError, BlockDiffusionSpec, spec_of
from leaplm.models.noisy_weights import has_noisy_weights
from leaplm.models.zoo import load_model, resolve


def load_block_diffusion_model(cfg: Config, recipe: str, allow_noisy_weights: bool = False):
    """The block-diffusion model to distill or to roll out with, as the engine decodes it
    (sdpa/eager); the losses switch to FlexAttention for their forward when the backend is flex.

    A model with separate noisy weights (ar2bd ``method.noisy_weights: separate``) is refused
    unless the caller routes them (``allow_noisy_weights``: its loss marks the noisy tokens, or it
    only decodes through the engine, which does).
    """
    if cfg.model.attn_implementation not in ("sdpa", "eager"):
        raise ConfigError(f"{recipe} rolls out and evaluates through the engine, which needs model.attn_implementation "
                          f"sdpa or eager (got {cfg.model.attn_implementation!r}); train.attention=flex trains with "
                          "FlexAttention anyway")
    model, tokenizer = load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.attn_implementation,
                                  cfg.model.tokenizer)
    spec_of(model)  # refuses a model that is not block diffusion, naming ar2bd as the fix
    if has_noisy_weights(model) and not allow_noisy_weights:
        raise ConfigError(f"{cfg.model.name_or_path} has separate noisy weights (ar2bd method.noisy_weights=separate), "
                          f"which {recipe}'s losses do not route; distill a model adapted with shared weights")
    return model, tokenizer


def load_model_config(cfg: Config) -> BlockDiffusionSpec:
    """The configured model's block-diffusion spec (block size, mask token id), read from its config
    without loading the weights, for the collator."""
    try:
        return spec_of(AutoConfig.from_pretrained(resolve(cfg.model.name_or_path)))
    except BlockDiffusionError as err:
        raise ConfigError(f"{cfg.model.name_or_path}: {err}") from None


def prompt_response_dataset(cfg: Config, tokenizer) -> list[dict[str, list[int]]]:
    """(prompt, response) id lists of the configured data; the response is what the labels supervise."""
    samples = []
    for sample in tokenize_dataset(load_source(cfg.data), tokenizer, cfg.data).samples:
        start = next(i for i, label in enumerate(sample["labels"]) if label != IGNORE_INDEX)
        samples.append({"prompt": sample["input_ids"][:start], "response": sample["input_ids"][start:]})
    return samples
