"""Jacobi Forcing's training row: a prompt and [noisy state | fixed point] pairs, and who sees whom.

Follows Jacobi Forcing (arXiv 2512.14681; github.com/hao-ai-lab/JacobiForcing,
``soft_flexattn_cllm_trainer_multiblock.py``). The model stays a plain causal LM; only training
changes. One row holds one prompt and, for each block j of its answer (in order, from the
answer's start), a pair: a noisy Jacobi state k_j of the block, then the block's fixed point
last_j::

    [prompt][k_0][last_0][k_1][last_1] ... [k_{T-1}][last_{T-1}][padding]

**Positions.** Both halves of a pair carry the position ids the block has in the plain answer:
``len(prompt) + (tokens of the blocks before it) + [0, len)``. The reference writes this
``prompt_len + j * n + [0, n)``; counting tokens instead lets a row's last block be shorter than
``n`` (where the answer ended), as ``collect_jacobi_trajectories`` stores it.

**Attention** (:func:`attention_rule`), one predicate for the dense and FlexAttention masks
(``models/two_stream.py``):

- prompt: causal;
- noisy k_j: the prompt, the noisy blocks k_{<j} and its own causal prefix;
- clean last_j: the prompt, the clean blocks last_{<j} and its own causal prefix; so every
  clean token sees exactly its AR context at its AR position, and the clean stream's logits
  are the plain model's on prompt + answer;
- clean never sees noisy; padding is never seen.

This is the reference's rule (the default, ``noisy_context="noisy"``): a
noisy block is conditioned on the *noisy* blocks before it, as when several blocks are in flight
(``jacobi_multiblock``). ``noisy_context="clean"`` is the other choice: a noisy block sees the
clean blocks before it (and only its own causal prefix of noisy tokens), the context that
one-block ``jacobi`` decoding has, where the blocks before are final.

The reference trains one row per step (batch size 1) and requires every block to be ``n``
tokens; here rows of different lengths are batched, padded at the end.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from transformers import PreTrainedModel

from leaplm.models.two_stream import (
    CLEAN,
    NOISY,
    PAD,
    StreamLayout,
    StreamMaskError,
    StreamRule,
    layout_attention,
)

NOISY_CONTEXTS = ("noisy", "clean")

# One packed block: (noisy state, fixed point), token ids of the same length.
Pair = tuple[Sequence[int], Sequence[int]]


class JacobiForcingError(StreamMaskError):
    """Input or settings that Jacobi Forcing training cannot use; the message names the fix."""


class PairSpan(NamedTuple):
    """Where one pair sits in its row."""

    noisy: int  # column of the noisy half's first token
    clean: int  # column of the clean half's first token
    start: int  # index of the block's first token in the answer
    length: int  # tokens in the block


def attention_rule(noisy_context: str = "noisy") -> StreamRule:
    """The Jacobi Forcing rule of the module docstring; ``noisy_context`` is ``noisy`` or ``clean``."""
    if noisy_context not in NOISY_CONTEXTS:
        raise JacobiForcingError(f"noisy_context must be one of {', '.join(NOISY_CONTEXTS)}, got {noisy_context!r}")
    if noisy_context == "noisy":
        return StreamRule(noisy_sees_noisy="causal", noisy_sees_clean="prompt", clean_sees_clean="causal")
    return StreamRule(noisy_sees_noisy="same_block_causal", noisy_sees_clean="earlier_blocks",
                      clean_sees_clean="causal")


def check_pairs(prompt: Sequence[int], pairs: Sequence[Pair], row: int = 0) -> None:
    """Refuse a row the layout cannot hold, naming the row and block."""
    if len(prompt) == 0:
        raise JacobiForcingError(f"row {row} has an empty prompt; the answer's first token is predicted from the "
                                 "prompt's last token, so every row needs at least one prompt token")
    if len(pairs) == 0:
        raise JacobiForcingError(f"row {row} has no (noisy state, fixed point) pairs; drop prompts whose trajectory "
                                 "has no blocks (an answer that is a lone stop token gives none)")
    width = len(pairs[0][1])
    for j, (noisy, fixed) in enumerate(pairs):
        if len(fixed) == 0:
            raise JacobiForcingError(f"row {row} block {j} has an empty fixed point")
        if len(noisy) != len(fixed):
            raise JacobiForcingError(f"row {row} block {j}: the noisy state has {len(noisy)} tokens and the fixed "
                                     f"point {len(fixed)}; a state and its fixed point must have the same length")
        if len(fixed) > width or (len(fixed) < width and j < len(pairs) - 1):
            raise JacobiForcingError(f"row {row} block {j} has {len(fixed)} tokens but block 0 has {width}; the pairs "
                                     "must be one answer's consecutive blocks of one block size (only the last may be "
                                     "shorter)")


def pack_rows(prompts: Sequence[Sequence[int]], pairs: Sequence[Sequence[Pair]],
              pad_token_id: int = 0) -> tuple[StreamLayout, list[list[PairSpan]]]:
    """Lay out one row per prompt: ``prompt, k_0, last_0, k_1, last_1, ...``, padded to the widest row.

    ``pairs[r]`` are row r's (noisy state, fixed point) pairs, one per answer block, in order from
    the answer's start. Returns the tagged layout and, per row, where each pair sits. Padding
    columns hold ``pad_token_id`` (never attended).
    """
    if len(prompts) != len(pairs):
        raise JacobiForcingError(f"got {len(prompts)} prompts but pairs for {len(pairs)} rows")
    if len(prompts) == 0:
        raise JacobiForcingError("no rows to pack")
    for r, (prompt, row_pairs) in enumerate(zip(prompts, pairs)):
        check_pairs(prompt, row_pairs, r)
    widths = [len(p) + 2 * sum(len(fixed) for _, fixed in row) for p, row in zip(prompts, pairs)]
    n_rows, width = len(prompts), max(widths)
    input_ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)  # [b, T]
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)  # [b, T]
    stream = torch.full((n_rows, width), PAD, dtype=torch.long)  # [b, T]
    block = torch.full((n_rows, width), -1, dtype=torch.long)  # [b, T]
    spans: list[list[PairSpan]] = []
    for r, (prompt, row_pairs) in enumerate(zip(prompts, pairs)):
        n_prompt = len(prompt)
        input_ids[r, :n_prompt] = torch.tensor(prompt)
        position_ids[r, :n_prompt] = torch.arange(n_prompt)
        stream[r, :n_prompt] = CLEAN
        col, start, row_spans = n_prompt, 0, []
        for j, (noisy, fixed) in enumerate(row_pairs):
            n = len(fixed)
            row_spans.append(PairSpan(col, col + n, start, n))
            input_ids[r, col:col + 2 * n] = torch.tensor([*noisy, *fixed])
            position_ids[r, col:col + 2 * n] = (n_prompt + start + torch.arange(n)).repeat(2)
            stream[r, col:col + n] = NOISY
            stream[r, col + n:col + 2 * n] = CLEAN
            block[r, col:col + 2 * n] = j
            col, start = col + 2 * n, start + n
        block[r, col:] = len(row_pairs)  # padding: a block of its own
        spans.append(row_spans)
    return StreamLayout(input_ids, position_ids, stream, block), spans


def training_attention(model: PreTrainedModel, layout: StreamLayout, backend: str, noisy_context: str = "noisy") -> Any:
    """What ``model(attention_mask=...)`` takes for a packed layout: a BlockMask (``flex``) or a dense mask (``dense``).

    Rows longer than the model's sliding window or positions beyond its
    ``max_position_embeddings`` are refused (:func:`~leaplm.models.two_stream.layout_attention`).
    """
    return layout_attention(model, layout, backend, attention_rule(noisy_context), error=JacobiForcingError)
