"""Turn any zoo causal LM into a block-diffusion LM, and the attention rule it trains and decodes with.

A block-diffusion LM writes its answer in blocks of ``block_size`` tokens: causal across blocks,
bidirectional inside the block being written, masked slots filled in parallel. This module holds
the conventions that the training recipe (``train/ar2bd.py``), its loss
(``losses/block_diffusion.py``) and the ``block_diffusion`` decoder
(``inference/decoders/block_diffusion.py``) share, so they cannot drift apart:

**Blocks are aligned to the start of the response.** Response token r lies in block
``r // block_size``; the prompt is clean context, never noised. (Fast-dLLM v2 counts blocks from
the start of the packed chunk instead. Aligning on the response keeps every row of a
left-padded batch on the same block boundaries, so one forward serves the batch, and the prompt
is always plain causal context as in the AR model we start from.) Responses are padded with the
mask token to a whole number of blocks; padding carries no loss.

**The first slot of every block comes from the clean stream.** With the token shift of AR
adaptation the logit at position i-1 predicts token i, so a block's first token is predicted
by the last token of the previous block (or of the prompt), which is already clean when that
block starts. The decoder takes it from that logit (exactly the AR prediction); training
supervises it from the clean stream and never masks it in the noisy stream. Slot j >= 1 is
predicted by the noisy stream's logit at slot j-1 of the same block. (Fast-dLLM v2 trains
the first slot from the previous block's *noisy* copy but decodes it from the clean one; we
train it the way it is decoded. With block size 1 every token is a block start and the model
is trained, and decodes, exactly as an AR model.)

**Attention.** Training runs on the concatenation ``[clean stream, noisy stream]`` with the same
position ids in both. Each token carries a stream (clean, noisy, or padding), a block index
(-1 for the prompt) and a position; :func:`attention_rule` says who sees whom:

- noisy -> noisy: same block only (bidirectional inside the block);
- noisy -> clean: strictly earlier blocks, the prompt included;
- clean -> clean: ``causal`` (token-causal; NBDiff's context-causal view, under which a
  finished block's cache equals the AR model's and an auxiliary AR loss on the clean stream is
  leak-free) or ``block_causal`` (BD3-LM / Fast-dLLM v2: bidirectional inside each clean block);
- clean -> noisy: never.

The same rule builds the dense SDPA mask (the reference) and the FlexAttention block mask; the
machinery (layout tags, rule predicate, mask building) is ``models/two_stream.py``, shared with
Jacobi Forcing.

The converted model records its settings in ``config.block_diffusion`` (saved in
``config.json``): ``mask_token_id``, ``block_size`` and ``clean_attention``. That entry is the only
place they are stored, :func:`spec_of` the only way they are read (from a model, or from its
config before the weights load) and :func:`check_block_size` the only check of a block size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

# The layout and mask machinery is shared with Jacobi Forcing (models/two_stream.py).
from leaplm.models.two_stream import CLEAN_SEES_CLEAN, StreamLayout, StreamMaskError, StreamRule, layout_attention

MASK_TOKEN = "<|mask|>"
CLEAN_ATTENTION = CLEAN_SEES_CLEAN


class BlockDiffusionError(StreamMaskError):
    """A model, tokenizer or setting that block diffusion cannot use; the message names the fix."""


@dataclass(frozen=True)
class BlockDiffusionSpec:
    mask_token_id: int
    block_size: int
    clean_attention: str = "causal"

    def __post_init__(self):
        check_block_size(self.block_size)
        if self.clean_attention not in CLEAN_ATTENTION:
            raise BlockDiffusionError(
                f"clean_attention must be one of {', '.join(CLEAN_ATTENTION)}, got {self.clean_attention!r}"
            )


def check_block_size(block_size: int, length: int | None = None, what: str = "block_size") -> None:
    """Refuse a block size that is not a positive integer, or that does not divide ``length``."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise BlockDiffusionError(f"{what} must be a positive integer, got {block_size!r}")
    if length is not None and length % block_size:
        raise BlockDiffusionError(
            f"{what}={block_size} does not divide the configured length {length}; choose a block size "
            f"that divides it (e.g. {', '.join(str(d) for d in range(1, min(length, 64) + 1) if length % d == 0)})"
        )


def spec_of(model: PreTrainedModel | PretrainedConfig) -> BlockDiffusionSpec:
    """The block-diffusion settings a converted model carries in its config (``model`` may be the
    config itself, read before the weights are loaded)."""
    config = model if isinstance(model, PretrainedConfig) else model.config
    raw = getattr(config, "block_diffusion", None)
    if not raw:
        raise BlockDiffusionError(
            f"{type(model).__name__} is not a block-diffusion model (its config has no 'block_diffusion' entry); "
            "adapt it first, e.g. `leaplm train configs/ar2bd/tiny_teacher.yaml`"
        )
    return BlockDiffusionSpec(**raw)


def add_mask_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, mask_token: str = MASK_TOKEN) -> int:
    """Give ``tokenizer`` a mask token and ``model`` an embedding row for it; return its id.

    A tokenizer that already declares a mask token keeps it. A new row is initialised to the
    mean of the existing input embeddings (and output rows, when untied), so the mask token
    starts as an "average" input that carries no particular token's meaning, and its logit is
    unremarkable instead of random.
    """
    if tokenizer.mask_token is not None and tokenizer.mask_token_id is not None:
        mask_id = tokenizer.mask_token_id
    else:
        vocab = tokenizer.get_vocab()
        if mask_token in vocab and mask_token not in tokenizer.all_special_tokens:
            raise BlockDiffusionError(
                f"the tokenizer already has {mask_token!r} as an ordinary token, so it cannot serve as the mask "
                "token; set method.mask_token to a string the tokenizer does not contain"
            )
        try:
            tokenizer.add_special_tokens({"mask_token": mask_token})
        except (AttributeError, TypeError, ValueError, NotImplementedError) as err:
            raise BlockDiffusionError(
                f"{type(tokenizer).__name__} cannot take a mask token ({err}); use a fast (tokenizers) tokenizer "
                "or one that already declares tokenizer.mask_token"
            ) from err
        mask_id = tokenizer.mask_token_id
    embeddings = model.get_input_embeddings()
    if embeddings is None:
        raise BlockDiffusionError(f"{type(model).__name__} exposes no input embeddings to add a mask token to")
    old_rows = embeddings.weight.shape[0]
    if mask_id >= old_rows:
        model.resize_token_embeddings(mask_id + 1, mean_resizing=False)
        with torch.no_grad():
            new_in = model.get_input_embeddings().weight
            new_in[old_rows:] = new_in[:old_rows].mean(0, keepdim=True)
            output = model.get_output_embeddings()
            if output is not None and output.weight.data_ptr() != new_in.data_ptr():
                output.weight[old_rows:] = output.weight[:old_rows].mean(0, keepdim=True)
    return mask_id


def convert(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, block_size: int,
            clean_attention: str = "causal", mask_token: str = MASK_TOKEN) -> BlockDiffusionSpec:
    """Make ``model`` a block-diffusion model in place: mask token plus ``config.block_diffusion``."""
    spec = BlockDiffusionSpec(add_mask_token(model, tokenizer, mask_token), block_size, clean_attention)
    set_spec(model, spec)
    return spec


def set_spec(model: PreTrainedModel, spec: BlockDiffusionSpec) -> None:
    model.config.block_diffusion = asdict(spec)


# ----- The attention rule -------------------------------------------------------------------


def attention_rule(clean_attention: str) -> StreamRule:
    """The block-diffusion rule of the module docstring, for ``clean_attention`` ``causal`` or ``block_causal``."""
    return StreamRule(noisy_sees_noisy="same_block", noisy_sees_clean="earlier_blocks",
                      clean_sees_clean=clean_attention)


def training_attention(model: PreTrainedModel, layout: StreamLayout, backend: str) -> Any:
    """What ``model(attention_mask=...)`` takes for ``layout``: a BlockMask (flex) or a dense mask.

    The rule's ``clean_attention`` is the converted model's (``config.block_diffusion``); the
    checks (sliding window, positions, attention implementation) are
    :func:`~leaplm.models.two_stream.layout_attention`'s.
    """
    return layout_attention(model, layout, backend, attention_rule(spec_of(model).clean_attention),
                            error=BlockDiffusionError)
