"""CLLM's consistency loss: map any Jacobi state of a block to the block's fixed point in one step.

A training row is one block of a greedy Jacobi trajectory (``train/rollouts.py``): a *context* x
(prompt plus the answer before the block), the block's *states* y⁽⁰⁾ … y⁽ᴷ⁾ and its *fixed point*
y* = y⁽ᴷ⁾, the model's own greedy answer for those tokens. The model is fed x followed by a block
of tokens; column i of the block logits is the model's distribution for block token i given x and
the block's first i tokens (column 0 sees x only).

- **global** (CLLM's trained loss): soft cross-entropy from the student on a random non-final
  state y to the stop-gradient distributions on the fixed point,
  Σ_i -Σ_v q_θ⁻(v | x, y*_{<i}) log q_θ(v | x, y_{<i}),
  which has the gradient of the forward KL(q_θ⁻(·|x, y*_{<i}) ‖ q_θ(·|x, y_{<i})).
- **local** (the blog's L_LC): the same from state y⁽ʲ⁾ to the next state y⁽ʲ⁺¹⁾ of the same
  trajectory instead of the fixed point.

**Which columns count.** If y and its target agree on tokens 0..k-1 and first differ at token k,
columns 0..k see the same tokens in both sequences: student and teacher distributions are equal,
the KL there is exactly zero and so is the gradient. Only columns k+1 .. m-1 (m = the block's
length) see a differing token, and only they are counted. A state equal to its target counts
nothing.

**Token shift.** Column i is the logit at the input position of block token i-1 (for i = 0, the
last context token): the prediction *of* token i. :func:`block_batch` lays rows out so that the
last ``jacobi_block_size + 1`` logits of every row are columns 0..n (column n, the prediction after the
block, is not used).

Where we differ from the reference (hao-ai-lab Consistency_LLM, ``cllm_trainer_global.py``):

- **Counted from the first prediction that sees a difference.** The reference masks predictions
  of tokens before the first mismatch and counts the prediction *of* the first mismatching token,
  whose context is still identical (zero KL, zero gradient, but its teacher entropy enters the
  soft CE and it adds one to the count). We leave it out.
- **Summed, not averaged per row.** The reference averages the soft CE over its counted positions;
  we return the sum and the trainer divides the whole step by its number of fixed-point tokens
  (the AR targets). Columns we do not count have exactly zero KL, so this is the blog's
  Σ_{i=1}^{n} D(·‖·) per answer token; a nearly converged state (few counted columns) weighs less
  than in the reference.
- **No prediction after the block.** The blog's sum runs to the prediction after the block's last
  token; like the reference code (``logits[:, :-1]``), we stop at the block's last token.
- **The local loss exists.** The reference code implements only the global loss; we add L_LC as
  written in the blog.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from leaplm.data.sft import IGNORE_INDEX

CONSISTENCY = ("global", "local")


@dataclass
class BlockBatch:
    """Rows of ``context | block``: contexts left-padded to one width, blocks right-padded to ``n``.

    Every row's block starts in the same column, so the model's last ``n + 1`` logits of each row
    are its block columns 0..n (see the module docstring).
    """

    input_ids: torch.Tensor  # [b, w + n]
    attention_mask: torch.Tensor  # [b, w + n] 1 = real token
    position_ids: torch.Tensor  # [b, w + n] cumsum(mask) - 1; 0 on padding
    blocks: torch.Tensor  # [b, n] block tokens, padded with the pad id
    lengths: torch.Tensor  # [b] real tokens per block

    def to(self, device: torch.device) -> BlockBatch:
        return BlockBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                                   self.blocks, self.lengths)))

    @property
    def jacobi_block_size(self) -> int:
        return self.blocks.shape[1]


def block_batch(contexts: list[list[int]], blocks: list[list[int]], jacobi_block_size: int,
                pad_token_id: int) -> BlockBatch:
    """Lay out ``contexts[r] + blocks[r]`` per row (each block at most ``jacobi_block_size`` tokens)."""
    if len(contexts) != len(blocks) or not contexts:
        raise ValueError(f"need one block per context and at least one row, got {len(contexts)} and {len(blocks)}")
    width = max(len(c) for c in contexts)
    if min(len(c) for c in contexts) == 0:
        raise ValueError("every context needs at least one token (the prompt), which predicts the block's first token")
    if max(len(b) for b in blocks) > jacobi_block_size or min(len(b) for b in blocks) == 0:
        raise ValueError(f"blocks must hold 1..{jacobi_block_size} tokens, "
                         f"got lengths {sorted({len(b) for b in blocks})}")
    b = len(contexts)
    input_ids = torch.full((b, width + jacobi_block_size), pad_token_id, dtype=torch.long)  # [b, w + n]
    mask = torch.zeros((b, width + jacobi_block_size), dtype=torch.long)  # [b, w + n]
    for row, (context, block) in enumerate(zip(contexts, blocks)):
        input_ids[row, width - len(context):width] = torch.tensor(context)
        input_ids[row, width:width + len(block)] = torch.tensor(block)
        mask[row, width - len(context):width + len(block)] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0) * mask  # [b, w + n]
    return BlockBatch(input_ids, mask, positions, input_ids[:, width:].clone(),
                      torch.tensor([len(x) for x in blocks]))


def block_logits(model, batch: BlockBatch) -> torch.Tensor:
    """Logits [b, n + 1, v]: column i predicts block token i (column n: the token after the block)."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                 use_cache=False, logits_to_keep=batch.jacobi_block_size + 1).logits


def counted_columns(states: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Bool [b, n]: block columns that see a token where ``states`` [b, n] differ from ``targets``
    [b, n] (columns first difference + 1 .. length - 1; none when they agree)."""
    n = states.shape[1]
    columns = torch.arange(n, device=states.device)[None]  # [1, n]
    valid = columns < lengths[:, None]  # [b, n]
    differs = (states != targets) & valid  # [b, n]
    first = torch.where(differs.any(-1), differs.long().argmax(-1), n)  # [b] first differing token
    return valid & (columns > first[:, None])


def soft_cross_entropy_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           counted: torch.Tensor) -> torch.Tensor:
    """Σ over ``counted`` [b, n] of -Σ_v softmax(teacher) log_softmax(student); teacher detached."""
    log_q = F.log_softmax(student_logits.float(), dim=-1)  # [b, n, v]
    p = F.softmax(teacher_logits.detach().float(), dim=-1)  # [b, n, v]
    per_column = -(p * log_q).sum(-1)  # [b, n]
    return (per_column * counted).sum()


def ar_labels(blocks: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Labels [b, n + 1] for :func:`~leaplm.losses.causal_lm.causal_lm_loss_sum` on block logits:
    the block's tokens after an ignored first slot (logit column i predicts label i + 1)."""
    n = blocks.shape[1]
    labels = blocks.masked_fill(torch.arange(n, device=blocks.device)[None] >= lengths[:, None], IGNORE_INDEX)
    return F.pad(labels, (1, 0), value=IGNORE_INDEX)


def consistency_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, states: torch.Tensor,
                         targets: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(soft CE summed over the counted columns, their count) for block logits [b, >= n, v] of the
    student fed ``states`` [b, n] and the teacher fed ``targets`` [b, n] (fixed points for the
    global loss, next states for the local one)."""
    n = states.shape[1]
    counted = counted_columns(states, targets, lengths)  # [b, n]
    return soft_cross_entropy_sum(student_logits[:, :n], teacher_logits[:, :n], counted), counted.sum()
