"""Recipe: draft heads on a causal LM, Medusa-1, Medusa-2, Hydra++ or Clover-2 (``method.variant``).

    leaplm train configs/draft_heads/tiny_teacher.yaml            # Medusa-1
    leaplm train configs/draft_heads/tiny_teacher_medusa2.yaml    # Medusa-2
    leaplm train configs/draft_heads/tiny_teacher_hydra_pp.yaml   # Hydra++
    leaplm train configs/draft_heads/tiny_teacher_clover2.yaml    # Clover-2
    accelerate launch --config_file launch/accelerate/multi_gpu.yaml -m leaplm.train configs/draft_heads/qwen2.5-1.5b.yaml

Data (self-distillation): the base model answers the configured data's prompts through the
shared engine (the shared rollout step, ``train/rollouts.py``: greedy, so the answers are
exactly what the decoders will verify against; ``rollout.decoder`` ``ar`` or ``jacobi``, and with
``rollout.pick_faster`` whichever decodes the first batch faster: the answers are the same).
Each sample is a prompt and the base's answer; every loss below counts answer tokens only.

Heads (``models/heads.py``): head k at position t predicts token t+k+2.

- ``medusa1``: Medusa heads, base frozen. Loss = Σ_k decay^(k+1) · heads_coefficient · sched(step) · CE_k
  over heads k = 0.. (the loss of Medusa's axolotl fork, ctlllll/axolotl ``medusa_utils.py``, with
  ``medusa_only_heads``: its head 1 drafts token t+2, as our head 0, and is weighted decay^1).
- ``medusa2``: Medusa heads trained jointly with LoRA on the base (``model.lora.r > 0``; the heads
  stay fully trainable). Loss = L_0 + the Medusa-1 head terms, where L_0 is the base's own
  next-token loss: with ``self_distillation`` the KL from the adapter-disabled base's distribution
  (Medusa's self-distillation), else CE on the answer.
- ``hydra_pp``: Hydra heads (each sees the embeddings of the tokens before its target) over a
  prefix decoder layer, base frozen. Loss = Σ_k teacher_weight · softCE(head_k, base distribution
  of the same token) + lm_weight · CE_k (Hydra's ``_score_preds`` without the reconstruction term).
- ``clover2``: Clover-2 heads (an augmenting gate and an attention decoder, then regressive heads
  through the base's own LM head; ``models/heads.py``), base frozen. Loss = the Hydra++ terms +
  Σ_k feature_weight · SmoothL1(head k's output before the LM head, the base's final hidden state
  that predicts the same token), averaged over the hidden size (Clover-2's ``main_clover2.py``:
  ``p_w = 1``, ``v_w = 10``).

Only the positions whose target is an answer token reach the heads' vocabulary projections (a
head is position-wise after the prefix layer, so this changes no loss term): at a real vocabulary
those projections, not the base, dominate a step.

**Shared LM head** (``shared_lm_head``, ``models/heads.py``): the heads project through the
frozen base's LM head instead of their own copies of it.

**Offline** (``offline``, frozen-base variants; as Hydra's ``hydra/data/build_hidden_states.py`` and
SpecForge's offline training): after the rollouts, the base's final hidden states (after its final
norm) of every training sample are computed once into ``OUTPUT_DIR/features/<key>/``
(``train/features.py``) and the heads train from them without running the base. Hydra's
drafted-token embeddings come from the base's input embedding and Hydra++'s teacher
distribution from its LM head, both on the cached states. See :func:`extract_features`.

``sched`` is ``constant``, ``linear`` (step/max), ``sine`` (sin(step/max · π/2)) or ``sine_<r>`` (a sine
warm-up over the first fraction r of training), as in the Medusa fork. The heads' rank
accuracies are averaged during training and saved with them; the ``medusa``/``hydra`` decoders
grow their default tree from them. Export writes the base (merged, for Medusa-2) and
``draft_heads.safetensors`` + ``draft_heads.json`` beside it.

Where we differ from the references: self-distillation answers are greedy (Medusa samples at
temperature 0.3); the heads share the base's learning rate (Medusa multiplies it by 4 for the heads
through a second optimizer group; the trainer has one); each Medusa head has its own residual
blocks (see ``models/heads.py``); Hydra++ drops the hidden-state reconstruction loss and its
dropout.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from leaplm.config import Config, ConfigError
from leaplm.data.sft import IGNORE_INDEX
from leaplm.models.heads import (
    ACCURACY_TOP_K,
    HEADS_ATTR,
    TOKEN_READERS,
    DraftHeads,
    HeadsConfig,
    attach_heads,
    lm_logits,
    unwrap_heads,
)
from leaplm.models.zoo import load_model
from leaplm.train import features
from leaplm.train.rank_accuracy import rank_hits, record_accuracy
from leaplm.train.recipes import Recipe
from leaplm.train.rollouts import (
    GREEDY_DECODERS,
    answer_dataset,
    check_rollout_sections,
    collect_run_greedy_answers,
)

log = logging.getLogger(__name__)

VARIANTS = ("medusa1", "medusa2", "hydra_pp", "clover2")
HEAD_KIND = {"medusa1": "medusa", "medusa2": "medusa", "hydra_pp": "hydra", "clover2": "clover"}  # and decoder
DISTILLED = ("hydra_pp", "clover2")  # variants trained on the base's distribution (teacher_weight, lm_weight)


@dataclass
class DraftHeadsMethodConfig:
    RENAMED: ClassVar[dict[str, str]] = {"block_size": "rollout_block_size"}  # old key -> new (config.py::build)
    variant: str = "medusa1"  # medusa1 (base frozen) | medusa2 (jointly with LoRA) | hydra_pp | clover2
    num_heads: int = 4  # heads; head k drafts the token k+2 ahead. Medusa uses 5, Hydra++ 4
    num_layers: int = 1  # residual blocks per head; Medusa uses 1, Hydra++ 4 (Clover-2's heads have none)
    heads_coefficient: float = 0.2  # Medusa: weight of the head losses (0.2 in stage 1, 0.01 in Zephyr's stage 2)
    decay: float = 0.8  # Medusa: head k (drafting t+k+2) weighted decay**(k+1), as the fork's head k+1
    schedule: str = "constant"  # Medusa: warm-up of the head weight: constant | linear | sine | sine_<r>
    self_distillation: bool = True  # Medusa-2: L_0 = KL to the adapter-disabled base instead of CE
    teacher_weight: float = 1.0  # Hydra++, Clover-2: soft CE to the base's distribution
    lm_weight: float = 0.0  # Hydra++, Clover-2: CE to the answer tokens (both use 0)
    feature_weight: float = 10.0  # Clover-2: SmoothL1 of each head's output to the base's hidden state
    rollout_block_size: int = 16  # Jacobi block of the rollout collection (speed only: the answers are greedy)
    shared_lm_head: bool = False  # heads project through the base's LM head (EAGLE) instead of their own copies
    offline: bool = False  # cache the frozen base's hidden states once, then train without running the base

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ConfigError(f"method.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.num_heads < 1 or self.num_layers < 1:
            raise ConfigError(f"method.num_heads and method.num_layers must be >= 1, got {self.num_heads}, "
                              f"{self.num_layers}")
        if self.offline and self.variant == "medusa2":
            raise ConfigError("method.offline caches the frozen base's hidden states, and medusa2 trains the base "
                              "(LoRA), so they change every step: set method.offline=false, or variant medusa1, "
                              "hydra_pp or clover2")
        if self.variant == "clover2" and not self.shared_lm_head:
            raise ConfigError("Clover-2's heads project through the base's own LM head: set method.shared_lm_head=true")
        if self.feature_weight < 0:
            raise ConfigError(f"method.feature_weight must be >= 0, got {self.feature_weight}")
        schedule_weight(self.schedule, 0, 1)  # raises on an unknown schedule


def schedule_weight(schedule: str, step: int, max_steps: int) -> float:
    """The Medusa fork's head-loss schedule at ``step`` of ``max_steps``."""
    progress = step / max(1, max_steps)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return progress
    if schedule == "sine":
        return math.sin(progress * math.pi / 2)
    if schedule.startswith("sine_"):
        try:
            ratio = float(schedule[len("sine_"):])
        except ValueError:
            ratio = 0.0
        if 0 < ratio <= 1:
            return math.sin(min(1.0, progress / ratio) * math.pi / 2)
    raise ConfigError(f"method.schedule must be constant, linear, sine or sine_<r> with 0 < r <= 1, got {schedule!r}")


def check_sections(cfg: Config) -> None:
    m: DraftHeadsMethodConfig = cfg.method
    check_rollout_sections(cfg, "draft_heads", m.rollout_block_size, decoder=GREEDY_DECODERS)
    if m.variant == "medusa2" and cfg.model.lora.r == 0:
        raise ConfigError("medusa2 trains the base jointly with LoRA: set model.lora.r > 0 (or variant medusa1)")
    if m.variant != "medusa2" and cfg.model.lora.r > 0:
        raise ConfigError(f"{m.variant} keeps the base frozen: set model.lora.r=0 (or variant medusa2)")


# ----- Model and data -------------------------------------------------------------------------


def build_model(cfg: Config):
    check_sections(cfg)
    m: DraftHeadsMethodConfig = cfg.method
    model, tokenizer = load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.attn_implementation,
                                  cfg.model.tokenizer)
    model.requires_grad_(False)  # medusa2's LoRA adapter is added (and trained) by the trainer
    config = HeadsConfig(kind=HEAD_KIND[m.variant], num_heads=m.num_heads,
                         num_layers=m.num_layers, hidden_size=model.config.hidden_size,
                         vocab_size=model.config.vocab_size, prefix_layer=m.variant in DISTILLED,
                         base=cfg.model.name_or_path, shared_lm_head=m.shared_lm_head)
    attach_heads(model, DraftHeads(config, model))
    return model, tokenizer


def rollout(cfg: Config, model, tokenizer, accelerator) -> None:
    """The base's greedy answers to the data's prompts (collected once, reused on a rerun); with
    ``method.offline``, then the base's hidden states of every training sample (:func:`extract_features`)."""
    m: DraftHeadsMethodConfig = cfg.method
    collect_run_greedy_answers(cfg, model, tokenizer, accelerator, jacobi_block_size=m.rollout_block_size)
    if m.offline:
        extract_features(cfg, model, tokenizer, accelerator)


def build_dataset(cfg: Config, tokenizer) -> list[dict[str, list[int]]]:
    """One sample per answered prompt (:func:`~leaplm.train.rollouts.answer_dataset`)."""
    return answer_dataset(cfg)


# ----- Offline features -------------------------------------------------------------------


def base_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The frozen base's final hidden states [b, T, H] (after its final norm), the heads' input (and what
    :mod:`leaplm.train.features` caches for offline training).

    One call for online training and feature extraction alike, so a cached state is what the
    online step computes. The logits of the last position only: nothing here reads them.
    """
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False,
                    logits_to_keep=1)
    return out.hidden_states[-1]


def extract_features(cfg: Config, model, tokenizer, accelerator) -> Path:
    """The base's final hidden states of every training sample, computed once (or reused)."""
    return features.extract_features(cfg, model, answer_dataset(cfg), base_hidden_states, accelerator,
                                     what="final hidden states", pad_token_id=tokenizer.pad_token_id)


# ----- Loss ---------------------------------------------------------------------------------


def head_inputs(heads: DraftHeads, embedded: torch.Tensor | None, hidden: torch.Tensor, counted: torch.Tensor,
                k: int):
    """Head k's inputs at the positions t whose target t+k+2 is counted (``counted`` [b, T-k-2]):
    hidden [n, H] and, for Hydra and Clover-2, the embeddings of tokens t+1 .. t+k+1 [n, k+1, H] (from
    ``embedded`` [b, T, H], the base's input embeddings of the batch)."""
    t = counted.shape[1]
    if heads.kind not in TOKEN_READERS:
        return hidden[:, :t][counted], None
    return hidden[:, :t][counted], torch.stack([embedded[:, 1 + j:1 + j + t][counted] for j in range(k + 1)], dim=1)


def loss(model, batch, cfg: Config):
    m: DraftHeadsMethodConfig = cfg.method
    inner, heads = unwrap_heads(model)
    input_ids, labels = batch["input_ids"], batch["labels"]
    answer = labels != IGNORE_INDEX  # [b, T] answer tokens: the targets
    joint = m.variant == "medusa2"
    if joint:
        out = model(input_ids=input_ids, attention_mask=batch["attention_mask"], output_hidden_states=True,
                    use_cache=False)
        base, base_logits = out.hidden_states[-1], out.logits  # [b, T, H], [b, T, V]
    else:
        base = batch["hidden"] if m.offline else base_hidden_states(model, input_ids, batch["attention_mask"])
    hidden = base
    embedded = inner.get_input_embeddings()(input_ids) if heads.kind in TOKEN_READERS else None  # [b, T, H]
    if heads.prefix is not None:
        b, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device)[None].expand(b, -1)
        causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()[None]  # right padding: causal is enough
        following = torch.cat([embedded[:, 1:], embedded[:, -1:]], 1)  # [b, T, H] x_{t+1} (the last: never counted)
        hidden = heads.run_prefix(base, following, positions, causal.expand(b, -1, -1))
    total = torch.zeros((), device=input_ids.device)
    metrics: dict[str, float] = {}
    weight = m.heads_coefficient * schedule_weight(m.schedule, batch["step"], cfg.train.max_steps)
    counts = torch.zeros(heads.config.num_heads, ACCURACY_TOP_K + 1, dtype=torch.float64, device=input_ids.device)
    if m.variant in DISTILLED:
        # The base's distribution of every answer token, once: head k's teacher for the token at t+k+2 is
        # the base's logits at t+k+1, so all heads read the same rows. At a real vocabulary this
        # projection costs as much as a head's, once per step instead of once per head.
        predicts = answer[:, 1:]  # [b, T-1] positions p whose next token is an answer token
        predictor_states = base[:, :-1][predicts]  # [n_all, H] the base's final states before answer tokens
        with torch.no_grad():
            teacher_all = F.softmax(lm_logits(inner, predictor_states).float(), dim=-1)  # [n_all, V]
        slot = predicts.flatten().cumsum(0).view_as(predicts) - 1  # [b, T-1] row of position p in teacher_all
    for k in range(heads.config.num_heads):
        shift = k + 2
        if input_ids.shape[1] <= shift:
            break
        counted = answer[:, shift:]  # [b, T-shift] positions t whose target t+shift is an answer token
        targets = input_ids[:, shift:][counted]  # [n]
        h, embeds = head_inputs(heads, embedded, hidden, counted, k)
        features_k = heads.features(k, h, embeds)  # [n, H]
        logits = heads.head_logits(k, features_k).float()  # [n, V] predicting tokens shift ahead
        ce_sum = F.cross_entropy(logits, targets, reduction="sum")
        if m.variant in DISTILLED:
            rows = slot[:, shift - 1:][counted]  # [n] the base's state one position before each target
            soft = -(teacher_all[rows] * F.log_softmax(logits, dim=-1)).sum()
            total = total + m.teacher_weight * soft + m.lm_weight * ce_sum
            if m.variant == "clover2":
                total = total + m.feature_weight * F.smooth_l1_loss(
                    features_k.float(), predictor_states[rows].float(), reduction="none").mean(-1).sum()
        else:
            total = total + weight * m.decay ** (k + 1) * ce_sum
        counts[k] = rank_hits(logits, targets)
    metrics.update(record_accuracy(heads.accuracy, counts, "head"))
    if joint:
        predicted = answer[:, 1:]  # [b, T-1] positions whose next token is an answer token
        student = base_logits[:, :-1].float()
        if m.self_distillation:
            with torch.no_grad(), inner.disable_adapter():
                original = inner(input_ids=input_ids, attention_mask=batch["attention_mask"], use_cache=False).logits
            teacher = F.log_softmax(original[:, :-1].float(), dim=-1)  # [b, T-1, V]
            kl = (teacher.exp() * (teacher - F.log_softmax(student, dim=-1))).sum(-1)  # [b, T-1]
            base_term = (kl * predicted).sum()
        else:
            base_term = F.cross_entropy(student.transpose(1, 2), input_ids[:, 1:], reduction="none")[predicted].sum()
        metrics["base_term"] = (base_term.detach() / batch["n_targets"]).item()
        total = total + base_term
    return total, metrics


RECIPE = Recipe(
    name="draft_heads",
    description="Medusa-1 / Medusa-2 / Hydra++ / Clover-2 draft heads on the base's own greedy answers",
    method_config=DraftHeadsMethodConfig,
    build_model=build_model,
    build_dataset=build_dataset,
    build_collator=features.build_collator,
    loss=loss,
    decoder=lambda cfg: (HEAD_KIND[cfg.method.variant], {}),
    rollout=rollout,
    trained_in_full=(HEADS_ATTR,),
    export_settings=lambda cfg, model, out_dir: {"draft_heads": asdict(unwrap_heads(model)[1].config)},
)
