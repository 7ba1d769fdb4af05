"""Jacobi Forcing training: noise-conditioned choice of states, the packed batch, and its loss.

Follows Jacobi Forcing (arXiv 2512.14681; github.com/hao-ai-lab/JacobiForcing: the data
script ``2_prepare_efficient_cllm_training_data_progressive_noise_window.py`` and the trainer
``soft_flexattn_cllm_trainer_multiblock.py``); the row layout and attention rule are in
``models/jacobi_forcing.py``. For one prompt with the Jacobi trajectories of its answer's blocks:

1. **Noise ratio** of a state: ``(n - d) / n`` where n is the block's length and d the index of
   its first token that differs from the fixed point (d = n for the fixed point itself, ratio
   0). It is the fraction of the block after its converged prefix, i.e. of the positions the
   consistency loss supervises. (It is not the fraction of differing tokens: tokens after the
   first wrong one count as noisy even where they happen to be right, since Jacobi decoding
   cannot accept them yet.)
2. **Progressive schedule**: ``noise_schedule(w, min, max)`` is ``linspace(min, max, w)``, and
   block j's target is entry ``j % w``: within every window of w blocks the target noise rises
   from easy to hard (``strategy="reverse"`` falls instead, the ablation the blog reports as
   worse). Defaults are the reference's: ``min=0``, ``max=1``, w=16. Each block takes the state
   whose ratio is nearest its target (the earliest such state on a tie); the fixed point itself
   (ratio 0) is a candidate.
3. **Packing**: ``prompt, [k_0 | last_0], [k_1 | last_1], ...`` in one row
   (:func:`~leaplm.models.jacobi_forcing.pack_rows`).
4. **Loss** (one forward): the sum of

   - consistency: soft cross-entropy ``-sum_v p_teacher(v) log p_student(v)``, student = the
     logit at noisy offset o of block j, teacher = the logit at the same offset of last_j,
     detached (stop-gradient). With the token shift both logits predict the token after offset
     o (for the block's last offset, the next block's first token), one from a noisy, one from
     the clean prefix. Offsets before the block's first difference are skipped (there the two
     see the same tokens of the block), and so are offsets from a stop token on (their
     teacher predicts past the answer's end). With ``distill_temperature`` T both sides are divided by
     T and the term is scaled by T^2;
   - ``ar_weight`` x AR: next-token CE of every answer token from the clean logit before it
     (the prompt's last token or the previous clean token, across block boundaries), through
     the first stop token.

   The sum is over **answer tokens**: ``n_targets`` (for the trainer's normaliser) is the
   number of AR targets, ``len(targets.ar_labels)``, so with ``ar_weight = 0`` the loss is the
   consistency CE per answer token.

Where we differ from the reference:

- **Normalisation.** The reference averages AR CE over its pairs and multiplies by 10, and
  divides the mean consistency CE by the number of blocks; we return sums that the trainer
  divides by the step's answer tokens (so the result does not depend on how a step is split
  into micro-batches). The reference's AR:consistency balance per token is not kept exactly;
  ``ar_weight`` is the knob (the reference's factor is 10).
- **AR targets are answer tokens only.** The reference also trains next-token CE on the
  prompt's own tokens; we supervise the answer (prompts are user text, as in the SFT recipe).
- **Batches.** Rows of several prompts are padded into one batch (the reference: batch size 1),
  and a row's last block may be shorter than the block size.
- **States are picked here, not in a data script.** The reference packs offline
  (``2_prepare_...progressive_noise_window.py``); :func:`pick_states` is the same rule as a
  function, deterministic, for a recipe to call when it builds its dataset. Its ``offset``
  shifts an answer's place in the window (the reference: 0 for every answer; the recipe's
  default draws one per answer, so short answers' first blocks see every target too). The paper's
  blog writes the loss as ``L_pc + lambda L_AR``; its code's lambda is the factor 10 above.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Collection, Sequence

import torch
import torch.nn.functional as F

from leaplm.losses.linear_cross_entropy import linear_cross_entropy_sum, linear_soft_cross_entropy_sum
from leaplm.models.jacobi_forcing import JacobiForcingError, Pair, pack_rows
from leaplm.models.two_stream import StreamLayout

STRATEGIES = ("progressive", "reverse")


def first_difference(state: Sequence[int], fixed_point: Sequence[int]) -> int:
    """Index of the first token of ``state`` that differs from ``fixed_point``; their length if none does."""
    return next((i for i, (a, b) in enumerate(zip(state, fixed_point)) if a != b), len(fixed_point))


def noise_ratio(state: Sequence[int], fixed_point: Sequence[int]) -> float:
    """``(n - first difference) / n``: the unconverged fraction of the block (0 for the fixed point)."""
    if len(state) != len(fixed_point) or not fixed_point:
        raise JacobiForcingError(f"a state of {len(state)} tokens against a fixed point of {len(fixed_point)}: they "
                                 "must have the same, nonzero length")
    return (len(fixed_point) - first_difference(state, fixed_point)) / len(fixed_point)


def noise_schedule(window_size: int = 16, min_ratio: float = 0.0, max_ratio: float = 1.0) -> list[float]:
    """Target noise ratios for one window of blocks: ``linspace(min_ratio, max_ratio, window_size)``."""
    if not isinstance(window_size, int) or window_size < 1:
        raise JacobiForcingError(f"window_size must be a positive integer, got {window_size!r}")
    if not 0 <= min_ratio <= max_ratio <= 1:
        raise JacobiForcingError(f"need 0 <= min_ratio <= max_ratio <= 1, got {min_ratio}, {max_ratio}")
    return torch.linspace(min_ratio, max_ratio, window_size, dtype=torch.float64).tolist()


def pick_states(blocks: Sequence[Sequence[Sequence[int]]], *, window_size: int = 16, min_ratio: float = 0.0,
                max_ratio: float = 1.0, strategy: str = "progressive", offset: int = 0) -> list[Pair]:
    """One (noisy state, fixed point) pair per block, by the noise schedule.

    ``blocks`` are one answer's blocks in order from its start, each given as its trajectory:
    the list of its Jacobi states, the last being the fixed point (the ``states`` of
    ``collect_jacobi_trajectories``' rows, sorted by ``block_index``). Block j takes the state
    whose :func:`noise_ratio` is nearest ``schedule[(j + offset) % window_size]`` (reversed for
    ``strategy="reverse"``), the earliest on a tie. ``offset`` 0 is the reference (every answer's
    first block takes the window's first target); answers shorter than a window need offsets
    that vary between answers, or their first blocks never see the window's later targets.
    """
    if strategy not in STRATEGIES:
        raise JacobiForcingError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    schedule = noise_schedule(window_size, min_ratio, max_ratio)
    if strategy == "reverse":
        schedule = schedule[::-1]
    if not blocks:
        raise JacobiForcingError("no blocks to pick states from (an empty trajectory)")
    pairs = []
    for j, states in enumerate(blocks):
        if not states:
            raise JacobiForcingError(f"block {j} has no states; a trajectory holds at least its fixed point")
        fixed = states[-1]
        target = schedule[(j + offset) % window_size]
        ratios = [noise_ratio(state, fixed) for state in states]
        best = min(range(len(states)), key=lambda i: abs(ratios[i] - target))
        pairs.append((list(states[best]), list(fixed)))
    return pairs


@dataclass
class JacobiTargets:
    """What the loss reads from the logits [b, T, V]: AR targets and consistency (student, teacher) pairs."""

    ar_rows: torch.Tensor  # [n_ar]
    ar_cols: torch.Tensor  # [n_ar] the clean (or last prompt) column whose logit predicts the label
    ar_labels: torch.Tensor  # [n_ar] answer tokens
    rows: torch.Tensor  # [n_c]
    student_cols: torch.Tensor  # [n_c] noisy columns
    teacher_cols: torch.Tensor  # [n_c] the clean columns at the same block offsets

    def to(self, device: torch.device) -> JacobiTargets:
        return JacobiTargets(*(getattr(self, f.name).to(device) for f in fields(self)))


def build_batch(prompts: Sequence[Sequence[int]], pairs: Sequence[Sequence[Pair]], *, pad_token_id: int = 0,
                stop_token_ids: Collection[int] = ()) -> tuple[StreamLayout, JacobiTargets]:
    """Pack one row per prompt and list its targets (see the module docstring).

    ``pairs[r]`` are row r's (noisy state, fixed point) pairs, one per answer block from the
    answer's start (e.g. from :func:`pick_states`). ``stop_token_ids`` (the tokenizer's end of
    turn / EOS ids) end the answer: nothing after a row's first stop token is supervised, and
    no consistency target has its teacher at a stop token.
    """
    layout, spans = pack_rows(prompts, pairs, pad_token_id)
    stops = set(stop_token_ids)
    ar_rows, ar_cols, ar_labels, rows, student_cols, teacher_cols = [], [], [], [], [], []
    for r, (prompt, row_pairs) in enumerate(zip(prompts, pairs)):
        answer = [t for _, fixed in row_pairs for t in fixed]
        stop = next((i for i, t in enumerate(answer) if t in stops), None)
        end = len(answer) if stop is None else stop + 1  # answer tokens [0, end) are AR targets
        teacher_end = len(answer) if stop is None else stop  # teachers at [0, teacher_end) predict inside the answer
        clean_col = torch.cat([torch.arange(s.clean, s.clean + s.length) for s in spans[r]])  # [R] column of answer i
        ar_rows.append(torch.full((end,), r))
        ar_cols.append(torch.cat([torch.tensor([len(prompt) - 1]), clean_col[:end - 1]]))  # the logit before token i
        ar_labels.append(torch.tensor(answer[:end]))
        for span, (noisy, fixed) in zip(spans[r], row_pairs):
            # offsets from the first difference on whose clean token (the teacher's input) is before the stop
            first = first_difference(noisy, fixed)
            offsets = torch.arange(first, max(first, min(span.length, teacher_end - span.start)))
            rows.append(torch.full((len(offsets),), r))
            student_cols.append(span.noisy + offsets)
            teacher_cols.append(span.clean + offsets)
    targets = JacobiTargets(*(torch.cat(parts).long() for parts in (ar_rows, ar_cols, ar_labels, rows, student_cols,
                                                                     teacher_cols)))
    return layout, targets


def jacobi_forcing_loss_sum(logits: torch.Tensor, targets: JacobiTargets, *, ar_weight: float,
                            distill_temperature: float = 1.0,
                            head: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Consistency soft CE + ``ar_weight`` x AR CE, summed over ``targets``, from one forward's ``logits`` [b, T, V].

    With ``head`` (the LM head weight [V, h]), ``logits`` are the final hidden states [b, T, h]
    instead and only the targeted positions' logits are computed, a chunk at a time
    (``losses/linear_cross_entropy.py``).

    Metrics: ``ce_ar`` and ``soft_ce_consistency`` / ``kl_consistency`` (means per target; the KL
    is the soft CE less the teacher's entropy, 0 when the noisy logits match the clean ones), and
    ``consistency_fraction``, consistency targets per answer token.
    """
    if distill_temperature <= 0:
        raise JacobiForcingError(f"distill_temperature must be positive, got {distill_temperature}")
    ar_picked = logits[targets.ar_rows, targets.ar_cols]  # [n_ar, V], or [n_ar, h] with a head
    student_picked = logits[targets.rows, targets.student_cols]  # [n_c, V] or [n_c, h]
    teacher_picked = logits[targets.rows, targets.teacher_cols].detach()  # [n_c, V] or [n_c, h]
    if head is None:
        ar_ce = F.cross_entropy(ar_picked.float(), targets.ar_labels, reduction="none")  # [n_ar]
        student = F.log_softmax(student_picked.float() / distill_temperature, dim=-1)  # [n_c, V]
        teacher = F.log_softmax(teacher_picked.float() / distill_temperature, dim=-1)
        soft_ce = -(teacher.exp() * student).sum(-1) * distill_temperature**2  # [n_c]
        kl = (teacher.exp() * (teacher - student.detach())).sum(-1) * distill_temperature**2
        ar_sum, consistency_sum = ar_ce.sum(), soft_ce.sum()
    else:
        ar_sum, ar_ce = linear_cross_entropy_sum(ar_picked, head, targets.ar_labels, return_rows=True)
        consistency_sum, soft_ce, kl = linear_soft_cross_entropy_sum(
            student_picked, teacher_picked, head, distill_temperature=distill_temperature, return_rows=True)
    metrics = {"consistency_fraction": len(soft_ce) / max(len(ar_ce), 1)}
    if len(ar_ce):
        metrics["ce_ar"] = float(ar_ce.detach().mean())
    if len(soft_ce):
        metrics["soft_ce_consistency"] = float(soft_ce.detach().mean())
        metrics["kl_consistency"] = float(kl.mean())
    return consistency_sum + ar_weight * ar_sum, metrics
