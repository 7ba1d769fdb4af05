"""Recipe: a SpecDec++ acceptance head on a draft model, for adaptive-length speculative decoding.

    leaplm train configs/acceptance_head/tiny_teacher.yaml

``model`` is the draft (frozen; any smaller model with the target's tokenizer, e.g. one made by
``configs/pretrain/tiny_draft.yaml``) and ``method.target`` the model it drafts for.

Data: the target answers the configured data's prompts through the shared engine (the shared
rollout step, greedy). Then, once per rollout set, both models read every answer teacher-forced:
at each answer position the draft proposes a token y (its argmax, or a sample of q at
``method.draft_temperature``), labelled with its chance of acceptance under the speculative rule,
min(1, p(y)/q(y)) (at temperature 0: 1 when y is the target's argmax, else 0). Each position
then takes, with probability ``mixing_ratio``, the target's own token (and no label), otherwise y
with its label.

Loss: the draft reads the mixed sequence; the head (``models/heads.py``) on its last hidden
state at each drafted token predicts (reject, accept); weighted soft BCE
Σ [w (1 - p) (-log q_reject) + p (-log q_accept)] / (w Σ (1 - p) + Σ p) with w = ``mismatch_weight``,
as SpecDec++. Decoder: ``speculative`` with ``stop_threshold`` (``inference/decoders/speculative.py``).

Where we differ from the reference (Kaffaljidhmah2/SpecDec_pp): the target's answers are greedy
(the reference samples them); the mixing is drawn once per sample when the dataset is built (the
reference redraws it every time a sample is read); labels are computed right after the rollouts
instead of by separate scripts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from leaplm.config import Config, ConfigError
from leaplm.data.sft import IGNORE_INDEX
from leaplm.models.heads import DraftHeads, HeadsConfig, attach_heads, unwrap_heads
from leaplm.models.zoo import load_model
from leaplm.train.recipes import Recipe
from leaplm.train.rollouts import (
    GREEDY_DECODERS,
    answer_samples,
    check_rollout_sections,
    collect_run_greedy_answers,
    load_rollouts,
    model_fingerprint,
    rollout_key,
)

LABELS_FILE = "acceptance_labels"  # in output_dir: the path of the labels in use


@dataclass
class AcceptanceHeadConfig:
    RENAMED: ClassVar[dict[str, str]] = {"block_size": "rollout_block_size", "temperature": "draft_temperature"}
    target: str = "tiny-teacher"  # the model the draft drafts for (same tokenizer)
    num_layers: int = 3  # residual blocks of the head; the reference recommends 3
    mismatch_weight: float = 6.0  # w: weight of the reject class; the reference recommends 6
    mixing_ratio: float = 0.15  # share of positions that keep the target's token (unlabelled), the reference's r
    draft_temperature: float = 0.0  # sampling temperature of the drafting the labels are for: 0 = greedy
    rollout_block_size: int = 16  # Jacobi block of the rollout collection (speed only: the answers are greedy)

    def __post_init__(self):
        if (self.num_layers < 0 or self.mismatch_weight <= 0 or not 0 <= self.mixing_ratio < 1
                or self.draft_temperature < 0):
            raise ConfigError("method needs num_layers >= 0, mismatch_weight > 0, 0 <= mixing_ratio < 1 and "
                              f"draft_temperature >= 0; got {self.num_layers}, {self.mismatch_weight}, "
                              f"{self.mixing_ratio}, {self.draft_temperature}")


def build_model(cfg: Config):
    check_rollout_sections(cfg, "acceptance_head", cfg.method.rollout_block_size, decoder=GREEDY_DECODERS)
    if cfg.model.lora.r > 0:
        raise ConfigError("acceptance_head keeps the draft frozen: set model.lora.r=0")
    draft, tokenizer = load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.attn_implementation,
                                  cfg.model.tokenizer)
    draft.requires_grad_(False)
    config = HeadsConfig(kind="acceptance", num_heads=1, num_layers=cfg.method.num_layers,
                         hidden_size=draft.config.hidden_size, base=cfg.model.name_or_path)
    attach_heads(draft, DraftHeads(config))
    return draft, tokenizer


def draft_labels(draft, target, prompt: list[int], answer: list[int], draft_temperature: float,
                 generator: torch.Generator) -> tuple[list[int], list[float]]:
    """Per answer token: the draft's proposal y there (teacher-forced on the target's answer) and
    its acceptance chance min(1, p(y)/q(y))."""
    ids = torch.tensor([prompt + answer], device=next(draft.parameters()).device)
    start = len(prompt) - 1  # logits at start + i predict answer token i
    q_logits = draft(ids).logits[0, start:-1].float()  # [a, V]
    p_logits = target(ids).logits[0, start:-1].float()  # [a, V]
    if draft_temperature == 0:
        proposal = q_logits.argmax(-1)
        return proposal.tolist(), (proposal == p_logits.argmax(-1)).float().tolist()
    q, p = (q_logits / draft_temperature).softmax(-1), (p_logits / draft_temperature).softmax(-1)
    proposal = torch.multinomial(q.cpu(), 1, generator=generator).squeeze(1).to(q.device)
    ratio = p.gather(1, proposal[:, None]) / q.gather(1, proposal[:, None])
    return proposal.tolist(), ratio.clamp(max=1).squeeze(1).tolist()


def rollout(cfg: Config, model, tokenizer, accelerator) -> None:
    """The target's greedy answers, then (on the main process) the draft's proposals and labels."""
    m: AcceptanceHeadConfig = cfg.method
    target, _ = load_model(m.target, cfg.model.dtype, cfg.model.attn_implementation, cfg.model.tokenizer)
    found = collect_run_greedy_answers(cfg, target, tokenizer, accelerator, jacobi_block_size=m.rollout_block_size,
                                       model_name=m.target)
    draft_key = rollout_key({"draft": model_fingerprint(cfg.model.name_or_path),
                             "draft_temperature": m.draft_temperature, "seed": cfg.seed})
    path = found.parent / f"{found.name}-labels-{draft_key}.json"  # reused while rollouts and draft stay the same
    if accelerator.is_main_process and not path.is_file():
        model.to(accelerator.device).eval()
        generator = torch.Generator().manual_seed(cfg.seed)
        rows = []
        with torch.no_grad():
            for s in answer_samples(load_rollouts(found, cfg.rollout.drop_wrong)):
                proposal, labels = draft_labels(model, target, s["prompt_ids"], s["answer_ids"], m.draft_temperature,
                                                generator)
                rows.append({**s, "proposal": proposal, "accept": labels})
        path.write_text(json.dumps(rows))
    if accelerator.is_main_process:
        (Path(cfg.output_dir) / LABELS_FILE).write_text(str(path))
    accelerator.wait_for_everyone()


def build_dataset(cfg: Config, tokenizer) -> list[dict]:
    """Mixed sequences: each answer position takes the draft's proposal (labelled) or, with
    probability ``mixing_ratio``, the target's token (unlabelled); drawn once per sample."""
    m: AcceptanceHeadConfig = cfg.method
    rows = json.loads(Path((Path(cfg.output_dir) / LABELS_FILE).read_text()).read_text())
    rng = random.Random(cfg.seed)
    samples = []
    for row in rows:
        keep = [rng.random() < m.mixing_ratio for _ in row["answer_ids"]]
        answer = [t if k else y for t, y, k in zip(row["answer_ids"], row["proposal"], keep)]
        labels = [IGNORE_INDEX if k else a for a, k in zip(row["accept"], keep)]
        samples.append({"input_ids": row["prompt_ids"] + answer,
                        "accept": [IGNORE_INDEX] * len(row["prompt_ids"]) + labels})
    return samples


def build_collator(cfg: Config, tokenizer):
    w = cfg.method.mismatch_weight

    def collate(samples):
        width = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), width), tokenizer.pad_token_id, dtype=torch.long)  # [b, T]
        accept = torch.full((len(samples), width), float(IGNORE_INDEX))  # [b, T] label of the token at t
        attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[i, :n], accept[i, :n], attention_mask[i, :n] = torch.tensor(s["input_ids"]), torch.tensor(
                s["accept"], dtype=torch.float), 1
        labelled = accept != IGNORE_INDEX
        p = accept.clamp(min=0) * labelled
        # The reference's normaliser, w * Σ(1 - p) + Σ p, over the whole optimizer step.
        n_targets = (w * ((1 - p) * labelled).sum() + p.sum())
        return {"input_ids": input_ids, "attention_mask": attention_mask, "accept": accept, "n_targets": n_targets}

    return collate


def loss(model, batch, cfg: Config):
    w = cfg.method.mismatch_weight
    _, head = unwrap_heads(model)
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True, use_cache=False).hidden_states[-1]  # [b, T, H]
    log_q = F.log_softmax(head.accept_logits(hidden).float(), dim=-1)  # [b, T, 2] (reject, accept)
    accept = batch["accept"]
    labelled = accept != IGNORE_INDEX
    p = accept.clamp(min=0)
    per_token = -(w * (1 - p) * log_q[..., 0] + p * log_q[..., 1])  # [b, T]
    total = (per_token * labelled).sum()
    predicted = log_q[..., 1].detach().exp()  # [b, T]
    metrics = {"accept_rate": float(p[labelled].mean()), "predicted_accept": float(predicted[labelled].mean())}
    return total, metrics


RECIPE = Recipe(
    name="acceptance_head",
    description="SpecDec++ acceptance head on a frozen draft model, for adaptive speculative decoding",
    method_config=AcceptanceHeadConfig,
    build_model=build_model,
    build_dataset=build_dataset,
    build_collator=build_collator,
    loss=loss,
    # The export is the draft: on its own it decodes autoregressively; it speeds up method.target as the
    # `speculative` decoder's draft (draft=DIR, stop_threshold), which needs the target as the decoded model.
    decoder=lambda cfg: ("ar", {}),
    rollout=rollout,
)
