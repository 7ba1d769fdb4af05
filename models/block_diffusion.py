"""Turn any zoo causal LM into a block-diffusion LM, and the attention rule it trains and decodes with.

A block-diffusion LM writes its answer in blocks of ``block_size`` tokens: causal across blocks,
bidirectional inside the block being written, masked slots filled in parallel. This module holds
the conventions that the training recipe (``train/ar2bd.py``), its loss
(``losses/block_diffusion.py``) and the ``block_diffusion`` decoder
(``inference/block_diffusion.py``) share, so they cannot drift apart:

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
(-1 for the prompt) and a position; :func:`bd_allowed` says who sees whom:

- noisy -> noisy: same block only (bidirectional inside the block);
- noisy -> clean: strictly earlier blocks, the prompt included;
- clean -> clean: ``causal`` (token-causal; NBDiff's context-causal view, under which a
  finished block's cache equals the AR model's and an auxiliary AR loss on the clean stream is
  leak-free) or ``block_causal`` (BD3-LM / Fast-dLLM v2: bidirectional inside each clean block);
- clean -> noisy: never.

The same rule builds the dense SDPA mask (the reference) and the FlexAttention block mask.

The converted model records its settings in ``config.block_diffusion`` (saved in
``config.json``): ``mask_token_id``, ``block_size`` and ``clean_attention``; the decoder reads its
defaults from there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

MASK_TOKEN = "<|mask|>"
CLEAN_ATTENTION = ("causal", "block_causal")

# Stream ids of a token in the concatenated training sequence.
PAD, CLEAN, NOISY = -1, 0, 1


class BlockDiffusionError(ValueError):
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
    if not isinstance(block_size, int) or block_size < 1:
        raise BlockDiffusionError(f"{what} must be a positive integer, got {block_size!r}")
    if length is not None and length % block_size:
        raise BlockDiffusionError(
            f"{what}={block_size} does not divide the configured length {length}; choose a block size "
            f"that divides it (e.g. {', '.join(str(d) for d in range(1, min(length, 64) + 1) if length % d == 0)})"
        )


def spec_of(model: PreTrainedModel) -> BlockDiffusionSpec:
    """The block-diffusion settings a converted model carries in its config."""
    raw = getattr(model.config, "block_diffusion", None)
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


def bd_allowed(stream_q: Any, block_q: Any, pos_q: Any, idx_q: Any, stream_kv: Any, block_kv: Any, pos_kv: Any,
               idx_kv: Any, block_causal_clean: bool) -> Any:
    """May a query attend to a key? Elementwise on tensors that broadcast against each other.

    Written with tensor operators only, so the same function builds the dense mask (on
    broadcast [b, q, 1] / [b, 1, kv] tensors) and runs inside a FlexAttention ``mask_mod`` (on
    scalars). ``idx`` is the column in the concatenated sequence: a padding query sees its own
    column, so no softmax row is empty.
    """
    real_kv = stream_kv != PAD
    noisy_q, noisy_kv = stream_q == NOISY, stream_kv == NOISY
    clean_q, clean_kv = stream_q == CLEAN, stream_kv == CLEAN
    clean_to_clean = pos_kv <= pos_q
    if block_causal_clean:
        clean_to_clean = clean_to_clean | ((block_kv == block_q) & (block_q >= 0))
    allowed = (noisy_q & noisy_kv & (block_kv == block_q)) | (noisy_q & clean_kv & (block_kv < block_q)) | (
        clean_q & clean_kv & clean_to_clean
    )
    same_pad = (stream_q == PAD) & (idx_q == idx_kv)
    return (allowed & real_kv) | same_pad


@dataclass
class StreamLayout:
    """A batch of (prompt, response) rows laid out as ``[clean | noisy | padding]`` per row.

    ``T`` is the widest row; every tensor is [b, T].
    """

    input_ids: torch.Tensor  # [b, T]
    position_ids: torch.Tensor  # [b, T]
    stream: torch.Tensor  # [b, T] PAD / CLEAN / NOISY
    block: torch.Tensor  # [b, T] block index; -1 on the prompt, the row's last block + 1 on padding

    def to(self, device: torch.device) -> StreamLayout:
        return StreamLayout(*(t.to(device) for t in (self.input_ids, self.position_ids, self.stream, self.block)))

    def dense_mask(self, block_causal_clean: bool) -> torch.Tensor:
        """The attention pattern as a dense bool mask [b, 1, T, T] (True = may attend)."""
        s, k, p = self.stream, self.block, self.position_ids
        i = torch.arange(s.shape[1], device=s.device)[None]  # [1, T]
        allowed = bd_allowed(s[:, :, None], k[:, :, None], p[:, :, None], i[:, :, None],
                             s[:, None, :], k[:, None, :], p[:, None, :], i[:, None, :], block_causal_clean)
        return allowed[:, None]

    def flex_mask(self, block_causal_clean: bool, block_rows: int = 128):
        """The same pattern as a FlexAttention ``BlockMask``; ``block_rows`` is its tile size."""
        from torch.nn.attention.flex_attention import create_block_mask

        s, k, p = self.stream, self.block, self.position_ids

        def mask_mod(b, h, q_idx, kv_idx):
            return bd_allowed(s[b, q_idx], k[b, q_idx], p[b, q_idx], q_idx, s[b, kv_idx], k[b, kv_idx], p[b, kv_idx],
                              kv_idx, block_causal_clean)

        b, t = self.input_ids.shape
        return create_block_mask(mask_mod, b, None, t, t, device=self.input_ids.device, BLOCK_SIZE=block_rows)


ATTENTION_BACKENDS = ("auto", "flex", "dense")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` is FlexAttention on GPUs and the dense mask on CPU, where FlexAttention has no backward."""
    if backend not in ATTENTION_BACKENDS:
        raise BlockDiffusionError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "flex" if device.type == "cuda" else "dense"
    return backend


def flex_backward_available(device: torch.device) -> bool:
    """torch's FlexAttention refuses a backward pass on CPU (it has one on CUDA)."""
    return device.type != "cpu"


def training_attention(model: PreTrainedModel, layout: StreamLayout, backend: str) -> Any:
    """What ``model(attention_mask=...)`` takes for ``layout``: a BlockMask (flex) or a dense mask.

    The dense mask is the reference the FlexAttention path is tested against. Sliding windows
    are not applied to the two-stream layout (its columns are not token distances), so a row
    wider than a model's window is refused rather than silently attended in full.
    """
    config = model.config
    spec = spec_of(model)
    width = layout.input_ids.shape[1]
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) is not False and width > window:
        raise BlockDiffusionError(
            f"a training row of {width} columns (prompt + 2 x response) exceeds the model's sliding window of {window}; "
            f"lower data.max_length so that rows stay within the window"
        )
    block_causal = spec.clean_attention == "block_causal"
    impl = config._attn_implementation
    if backend == "flex":
        if impl != "flex_attention":
            raise BlockDiffusionError(f"the flex backend needs attn_implementation='flex_attention', the model uses {impl!r}")
        if torch.is_grad_enabled() and not flex_backward_available(layout.input_ids.device):
            raise BlockDiffusionError(
                "FlexAttention has no backward pass on CPU in this torch version; train with method.attention=dense "
                "(the same mask as a dense tensor) or on a GPU"
            )
        mask = layout.flex_mask(block_causal)
    else:
        allowed = layout.dense_mask(block_causal)  # [b, 1, T, T]
        if impl == "eager":
            dtype = model.dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
        elif impl == "sdpa":
            mask = allowed
        else:
            raise BlockDiffusionError(f"the dense backend needs attn_implementation 'sdpa' or 'eager', the model uses {impl!r}")
    if getattr(config, "layer_types", None) is not None:  # per-layer-type masks (Gemma 2/3, Qwen3 windows)
        return {kind: mask for kind in set(config.layer_types)}
    return mask
