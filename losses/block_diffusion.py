"""Block-diffusion training: noising, the two-stream batch, and its loss.

Follows Fast-dLLM v2 (arXiv 2509.26328; github.com/NVlabs/Fast-dLLM), NBDiff (arXiv 2512.06776)
and BD3-LM (arXiv 2503.09573); the conventions (response-aligned blocks, first slot from the clean
stream) are in ``models/block_diffusion.py``. Per training row:

- every response block draws a noise level ``t ~ U(t_min, t_max)`` (the clipping range; BD3-LM
  tunes it to cut gradient variance, Fast-dLLM v2 uses ``[1e-3, 1]``) and masks each of its
  slots but the first with probability t;
- the **complementary view** (Fast-dLLM v2) is a second copy of the row that masks exactly the
  other slots, so every answer token is supervised once per step;
- the **masked-token loss** is cross-entropy of the noisy stream's logit at slot j-1 against
  the answer token at slot j (the token shift of AR adaptation), optionally weighted by 1/t
  (the MDLM/BD3-LM ELBO weight for a linear schedule; Fast-dLLM v2 uses no weight). The
  complementary view's rate is 1-t, clipped to the same range;
- the **block-start loss**: each block's first token from the clean stream's logit just
  before it, which is how the decoder produces it;
- the optional **auxiliary AR loss** (NBDiff): next-token cross-entropy on every answer token
  of the clean stream, times ``ar_weight``; only leak-free with ``clean_attention=causal``.

The sum over all of them is divided (by the trainer) by the number of answer tokens, so with
the complementary view and no AR loss the loss is the mean CE per answer token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from leaplm.losses.linear_cross_entropy import linear_cross_entropy_sum
from leaplm.models.two_stream import CLEAN, NOISY, PAD, StreamLayout

NOISY_TARGET, BLOCK_START_TARGET, AR_TARGET = 0, 1, 2
TARGET_KINDS = {NOISY_TARGET: "masked", BLOCK_START_TARGET: "block_start", AR_TARGET: "ar"}
# A generator for every row, or one per row (mask samplers draw row i's noise from entry i).
RowGenerators = Union[torch.Generator, Sequence[torch.Generator], None]


@dataclass
class Targets:
    """Where each supervised logit is: row and column of the layout, label, weight, kind."""

    rows: torch.Tensor  # [n]
    cols: torch.Tensor  # [n]
    labels: torch.Tensor  # [n]
    weights: torch.Tensor  # [n] float
    kinds: torch.Tensor  # [n] NOISY_TARGET / BLOCK_START_TARGET / AR_TARGET

    def to(self, device: torch.device) -> Targets:
        return Targets(*(t.to(device) for t in (self.rows, self.cols, self.labels, self.weights, self.kinds)))


def row_generators(generator: RowGenerators, n_rows: int) -> list[torch.Generator | None]:
    """One generator per row: ``generator`` repeated, or the per-row list as given.

    The trainer seeds one generator per sample from (seed, the sample's place in the run's sample
    stream), so a sample's noise does not depend on which process or micro-batch it lands in.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * n_rows
    if len(generator) != n_rows:
        raise ValueError(f"got {len(generator)} generators for {n_rows} rows")
    return list(generator)


def sample_masks(response_lengths: list[int], block_size: int, t_min: float, t_max: float,
                 complementary: bool, generator: RowGenerators = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Noise for each row (and its complementary copy, appended after all rows).

    Returns ``masks`` (bool [R_i] per row: slot is masked in the noisy stream) and ``rates``
    (float [R_i]: the mask rate of the slot's block, for the 1/t weight). A block's first slot
    is never masked; with ``complementary`` the copy masks exactly the other maskable slots.
    ``generator``: one for every row, or a list with one per row (see :func:`row_generators`).
    """
    masks, rates = [], []
    for length, gen in zip(response_lengths, row_generators(generator, len(response_lengths))):
        slots = torch.arange(length)
        n_blocks = -(-length // block_size)
        t = t_min + (t_max - t_min) * torch.rand(n_blocks, generator=gen)  # [n_blocks]
        rate = t[slots // block_size]  # [R]
        maskable = slots % block_size != 0  # [R]
        masks.append(maskable & (torch.rand(length, generator=gen) < rate))
        rates.append(rate)
    if complementary:
        for length, mask, rate in list(zip(response_lengths, masks, rates)):
            maskable = torch.arange(length) % block_size != 0
            masks.append(maskable & ~mask)
            rates.append((1 - rate).clamp(t_min, t_max))
    return masks, rates


def build_batch(prompts: list[list[int]], responses: list[list[int]], masks: list[torch.Tensor],
                rates: list[torch.Tensor], block_size: int, mask_token_id: int, *,
                inverse_t_weight: bool, ar_weight: float) -> tuple[StreamLayout, Targets]:
    """Lay out ``[clean | noisy]`` rows and list their targets.

    ``masks``/``rates`` may hold more rows than ``prompts`` (the complementary copies): row k
    uses prompt/response ``k % len(prompts)``; block-start and AR targets come from the first
    copy only. Responses are padded with the mask token to whole blocks, without targets; so
    are rows, to the widest one.
    """
    n_rows = len(masks)
    widths = []
    for k in range(n_rows):
        p, r = prompts[k % len(prompts)], responses[k % len(prompts)]
        widths.append(len(p) + 2 * block_size * -(-len(r) // block_size))
    width = max(widths)
    input_ids = torch.full((n_rows, width), mask_token_id, dtype=torch.long)  # [v*b, T]
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)  # [v*b, T]
    stream = torch.full((n_rows, width), PAD, dtype=torch.long)  # [v*b, T]
    block = torch.zeros((n_rows, width), dtype=torch.long)  # [v*b, T]
    rows, cols, labels, weights, kinds = [], [], [], [], []
    for k in range(n_rows):
        first_copy = k < len(prompts)
        prompt = torch.tensor(prompts[k % len(prompts)])  # [P]
        response = torch.tensor(responses[k % len(prompts)])  # [R]
        n_prompt, n_resp = len(prompt), len(response)
        n_padded = block_size * -(-n_resp // block_size)
        slots = torch.arange(n_padded)  # [Rp]
        padded = torch.full((n_padded,), mask_token_id)
        padded[:n_resp] = response
        noisy = padded.clone()
        noisy[:n_resp][masks[k]] = mask_token_id
        clean_end, noisy_end = n_prompt + n_padded, n_prompt + 2 * n_padded
        input_ids[k, :noisy_end] = torch.cat([prompt, padded, noisy])
        position_ids[k, :clean_end] = torch.arange(clean_end)
        position_ids[k, clean_end:noisy_end] = n_prompt + slots
        stream[k, :clean_end] = CLEAN
        stream[k, clean_end:noisy_end] = NOISY
        block[k, :n_prompt] = -1
        block[k, n_prompt:clean_end] = slots // block_size
        block[k, clean_end:noisy_end] = slots // block_size
        block[k, noisy_end:] = n_padded // block_size  # padding: a block of its own

        answer = torch.arange(n_resp)  # [R]
        masked = answer[masks[k]]  # slots whose token the noisy stream must recover
        # token shift: the noisy logit at slot j-1 (same block, as j is never a block start)
        _add(rows, cols, labels, weights, kinds, k, clean_end + masked - 1, response[masked],
             (1 / rates[k][masked]) if inverse_t_weight else torch.ones(len(masked)), NOISY_TARGET)
        if first_copy:
            starts = answer[answer % block_size == 0]
            _add(rows, cols, labels, weights, kinds, k, n_prompt + starts - 1, response[starts],
                 torch.ones(len(starts)), BLOCK_START_TARGET)
            if ar_weight > 0:
                _add(rows, cols, labels, weights, kinds, k, n_prompt + answer - 1, response,
                     torch.full((n_resp,), float(ar_weight)), AR_TARGET)
    layout = StreamLayout(input_ids, position_ids, stream, block)
    targets = Targets(torch.cat(rows), torch.cat(cols), torch.cat(labels), torch.cat(weights), torch.cat(kinds))
    return layout, targets


def _add(rows, cols, labels, weights, kinds, row: int, col: torch.Tensor, label: torch.Tensor,
         weight: torch.Tensor, kind: int) -> None:
    rows.append(torch.full_like(col, row))
    cols.append(col)
    labels.append(label)
    weights.append(weight.float())
    kinds.append(torch.full_like(col, kind))


def block_diffusion_loss_sum(logits: torch.Tensor, targets: Targets, *,
                             head: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted CE summed over ``targets`` from ``logits`` [b, T, V]; mean CE per kind as metrics.

    With ``head`` (the LM head weight [V, h]), ``logits`` are the final hidden states [b, T, h]
    instead and only the targeted positions' logits are computed, a chunk at a time
    (:func:`~leaplm.losses.linear_cross_entropy.linear_cross_entropy_sum`).
    """
    picked = logits[targets.rows, targets.cols]  # [n, V], or [n, h] with a head
    if head is None:
        ce = F.cross_entropy(picked.float(), targets.labels, reduction="none")  # [n]
        total = (ce * targets.weights).sum()
    else:
        total, ce = linear_cross_entropy_sum(picked, head, targets.labels, row_weights=targets.weights,
                                             return_rows=True)
    metrics = {}
    for kind, name in TARGET_KINDS.items():
        chosen = targets.kinds == kind
        if chosen.any():
            metrics[f"ce_{name}"] = float(ce[chosen].detach().mean())
    return total, metrics
