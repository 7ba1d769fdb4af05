"""Training on a clean and a noisy copy of an answer in one forward: the layout, the attention
rule, and how it reaches a Hugging Face model.

Block diffusion (``models/block_diffusion.py``) and Jacobi Forcing (``models/jacobi_forcing.py``)
both train a parallel decoder on rows that hold the prompt, the answer (the *clean* stream) and a
corrupted copy of the answer (the *noisy* stream), with each noisy token at the position id of
the answer token it stands for. They differ only in the order of the columns and in who may see
whom. So a row is described per column by three tags, independent of the column order:

- ``stream``: ``CLEAN`` (the prompt and the answer), ``NOISY`` or ``PAD`` (unused columns);
- ``block``: the answer block the token belongs to, -1 on the prompt;
- ``position``: its position id.

A :class:`StreamRule` says who sees whom in terms of these tags, and :func:`stream_allowed`
evaluates it; the same function builds the dense mask (the reference) and runs inside the
FlexAttention ``mask_mod``, so the two cannot disagree. Every rule here keeps three things:
the clean stream never sees the noisy one, padding is never seen, and a padding query sees only
its own column (so no softmax row is empty).

:func:`layout_attention` turns a layout and a rule into what ``model(attention_mask=...)`` takes:
a FlexAttention ``BlockMask`` (``flex``, for GPUs) or a dense bool/additive mask (``dense``, the
reference, and the CPU path, where torch's FlexAttention has no backward).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import PreTrainedModel

from leaplm.config import ATTENTION_BACKENDS
from leaplm.models.noisy_weights import noisy_tokens
from leaplm.models.zoo import final_hidden_states

# Stream ids of a column.
PAD, CLEAN, NOISY = -1, 0, 1

# noisy -> noisy: its own block both ways (block diffusion), its own block up to itself, or every
# noisy token at an earlier or equal position (earlier noisy blocks and its own causal prefix)
NOISY_SEES_NOISY = ("same_block", "same_block_causal", "causal")
# noisy -> clean: the prompt and the clean blocks before its own, or the prompt only
NOISY_SEES_CLEAN = ("earlier_blocks", "prompt")
# clean -> clean: token-causal, or also the rest of its own block
CLEAN_SEES_CLEAN = ("causal", "block_causal")


class StreamMaskError(ValueError):
    """A layout, rule or model that two-stream training cannot use; the message names the fix."""


@dataclass(frozen=True)
class StreamRule:
    """Who sees whom; see the option tuples above. The prompt is always plain causal."""

    noisy_sees_noisy: str
    noisy_sees_clean: str
    clean_sees_clean: str = "causal"

    def __post_init__(self):
        for name, options in (("noisy_sees_noisy", NOISY_SEES_NOISY), ("noisy_sees_clean", NOISY_SEES_CLEAN),
                              ("clean_sees_clean", CLEAN_SEES_CLEAN)):
            if getattr(self, name) not in options:
                raise StreamMaskError(f"{name} must be one of {', '.join(options)}, got {getattr(self, name)!r}")


def stream_allowed(stream_q: Any, block_q: Any, pos_q: Any, idx_q: Any, stream_kv: Any, block_kv: Any, pos_kv: Any,
                   idx_kv: Any, rule: StreamRule) -> Any:
    """May a query attend to a key? Elementwise on tensors that broadcast against each other.

    Written with tensor operators only, so the same function builds the dense mask (on
    broadcast [b, q, 1] / [b, 1, kv] tensors) and runs inside a FlexAttention ``mask_mod`` (on
    scalars); ``rule`` is plain Python, read while tracing. ``idx`` is the column.
    """
    noisy_q, noisy_kv = stream_q == NOISY, stream_kv == NOISY
    clean_q, clean_kv = stream_q == CLEAN, stream_kv == CLEAN
    causal = pos_kv <= pos_q
    same_block = block_kv == block_q
    if rule.noisy_sees_noisy == "same_block":
        noisy_to_noisy = same_block
    elif rule.noisy_sees_noisy == "same_block_causal":
        noisy_to_noisy = same_block & causal
    else:
        noisy_to_noisy = causal
    noisy_to_clean = block_kv < (block_q if rule.noisy_sees_clean == "earlier_blocks" else 0)
    clean_to_clean = causal
    if rule.clean_sees_clean == "block_causal":
        clean_to_clean = clean_to_clean | (same_block & (block_q >= 0))
    allowed = (noisy_q & noisy_kv & noisy_to_noisy) | (noisy_q & clean_kv & noisy_to_clean) | (
        clean_q & clean_kv & clean_to_clean
    )
    same_pad = (stream_q == PAD) & (idx_q == idx_kv)
    return (allowed & (stream_kv != PAD)) | same_pad


@dataclass
class StreamLayout:
    """A batch of training rows, tagged per column; ``T`` is the widest row, every tensor is [b, T]."""

    input_ids: torch.Tensor  # [b, T]
    position_ids: torch.Tensor  # [b, T]
    stream: torch.Tensor  # [b, T] PAD / CLEAN / NOISY
    block: torch.Tensor  # [b, T] block index; -1 on the prompt

    def to(self, device: torch.device) -> StreamLayout:
        return StreamLayout(*(t.to(device) for t in (self.input_ids, self.position_ids, self.stream, self.block)))

    def dense_mask(self, rule: StreamRule) -> torch.Tensor:
        """The attention pattern as a dense bool mask [b, 1, T, T] (True = may attend)."""
        s, k, p = self.stream, self.block, self.position_ids
        i = torch.arange(s.shape[1], device=s.device)[None]  # [1, T]
        allowed = stream_allowed(s[:, :, None], k[:, :, None], p[:, :, None], i[:, :, None],
                                 s[:, None, :], k[:, None, :], p[:, None, :], i[:, None, :], rule)
        return allowed[:, None]

    def flex_mask(self, rule: StreamRule, block_rows: int = 128):
        """The same pattern as a FlexAttention ``BlockMask``; ``block_rows`` is its tile size."""
        from torch.nn.attention.flex_attention import create_block_mask

        s, k, p = self.stream, self.block, self.position_ids

        def mask_mod(b, h, q_idx, kv_idx):
            return stream_allowed(s[b, q_idx], k[b, q_idx], p[b, q_idx], q_idx, s[b, kv_idx], k[b, kv_idx],
                                  p[b, kv_idx], kv_idx, rule)

        b, t = self.input_ids.shape
        return create_block_mask(mask_mod, b, None, t, t, device=self.input_ids.device, BLOCK_SIZE=block_rows)


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` is FlexAttention on GPUs and the dense mask on CPU, where FlexAttention has no backward."""
    if backend not in ATTENTION_BACKENDS:
        raise StreamMaskError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "flex" if device.type == "cuda" else "dense"
    return backend


@contextlib.contextmanager
def attention_backend(model: PreTrainedModel, backend: str):
    """Run the forwards inside the block with the attention implementation ``backend``'s mask needs.

    Recipes load their model with sdpa/eager, which the engine decodes with (rollouts, eval,
    export); only the training forward on two-stream rows switches to FlexAttention (``flex``),
    and the model gets its own implementation back afterwards. ``dense`` keeps the model's.
    """
    before = model.config._attn_implementation
    if backend == "flex":
        model.config._attn_implementation = "flex_attention"
    try:
        yield
    finally:
        model.config._attn_implementation = before


def flex_backward_available(device: torch.device) -> bool:
    """torch's FlexAttention refuses a backward pass on CPU (it has one on CUDA)."""
    return device.type != "cpu"


def layout_attention(model: PreTrainedModel, layout: StreamLayout, backend: str, rule: StreamRule,
                     error: type[Exception] = StreamMaskError) -> Any:
    """What ``model(attention_mask=...)`` takes for ``layout`` under ``rule``: a BlockMask (flex) or a dense mask.

    The dense mask is the reference the FlexAttention path is tested against. Sliding windows
    are not applied to two-stream rows (their columns are not token distances), so a row wider
    than a model's window is refused rather than silently attended in full; so is a position id
    beyond the model's ``max_position_embeddings``. Problems are raised as ``error`` (the
    caller's recipe error class).
    """
    config = model.config
    width = layout.input_ids.shape[1]
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) is not False and width > window:
        raise error(
            f"a training row of {width} columns (prompt + 2 x response) exceeds the model's sliding window of {window}; "
            f"lower data.max_length so that rows stay within the window"
        )
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and layout.position_ids.numel() and int(layout.position_ids.max()) >= limit:
        raise error(
            f"a training row reaches position {int(layout.position_ids.max())}, beyond the model's "
            f"max_position_embeddings={limit}; lower data.max_length (or pack fewer answer blocks per row)"
        )
    impl = config._attn_implementation
    if backend == "flex":
        if impl != "flex_attention":
            raise error(f"the flex backend needs attn_implementation='flex_attention', the model uses {impl!r}")
        if torch.is_grad_enabled() and not flex_backward_available(layout.input_ids.device):
            raise error(
                "FlexAttention has no backward pass on CPU in this torch version; train with train.attention=dense "
                "(the same mask as a dense tensor) or on a GPU"
            )
        mask = layout.flex_mask(rule)
    elif backend == "dense":
        allowed = layout.dense_mask(rule)  # [b, 1, T, T]
        if impl == "eager":
            dtype = model.dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
        elif impl == "sdpa":
            mask = allowed
        else:
            raise error(f"the dense backend needs attn_implementation 'sdpa' or 'eager', the model uses {impl!r}")
    else:
        raise error(f"backend must be flex or dense (resolve 'auto' with resolve_backend first), got {backend!r}")
    if getattr(config, "layer_types", None) is not None:  # per-layer-type masks (Gemma 2/3, Qwen3 windows)
        return {kind: mask for kind in set(config.layer_types)}
    return mask


def two_stream_forward(model: PreTrainedModel, layout: StreamLayout, attention: str,
                       mask: Callable[[PreTrainedModel, StreamLayout, str], Any], *, hidden_states: bool = False):
    """The training forward of ``layout`` under ``mask(model, layout, backend)`` (the family's
    ``training_attention``), with ``attention`` (``train.attention``) resolved for the layout's device.

    The noisy stream's tokens go through the noisy weights of a model that has them (a no-op
    otherwise). Returns the logits [b, T, V]; with ``hidden_states`` (``train.fused_loss``) the
    final hidden states [b, T, h] and the head weight [V, h] instead, for a loss that never holds
    the full logits.
    """
    backend = resolve_backend(attention, layout.input_ids.device)
    with attention_backend(model, backend), noisy_tokens(model, layout.stream == NOISY):
        inputs = dict(input_ids=layout.input_ids, position_ids=layout.position_ids,
                      attention_mask=mask(model, layout, backend), use_cache=False)
        if hidden_states:
            return final_hidden_states(model, **inputs)
        return model(**inputs).logits
