"""Recipe: a Kangaroo adapter for a frozen causal LM (``models/kangaroo.py``): a self-draft made of the
target's own first layers, one small attention block and the target's LM head.

    leaplm train configs/kangaroo/tiny_teacher.yaml
    leaplm train configs/kangaroo/smollm2-135m.yaml
    accelerate launch --config_file launch/accelerate/multi_gpu.yaml -m leaplm.train configs/kangaroo/tiny_teacher.yaml

Data (self-distillation, as the EAGLE-3 and draft-heads recipes): the target answers the configured
data's prompts greedily through the shared engine (``train/rollouts.py``); a sample is a prompt and
the target's answer, and the loss counts answer tokens only.

Loss (Kangaroo, arXiv 2404.18911; Equationliu/Kangaroo ``train.py``): the target runs once (frozen,
no gradient) for its hidden state after layer ``exit_layer - 1`` (the adapter's input) and its
final hidden state (after the final norm; its logits give the target's distribution). With
``offline`` these are computed once after the rollouts (``train/features.py``) and training reads
them instead of running the target. The adapter runs over every position causally, as it does over
the committed tokens when drafting, and at each position t whose next token is an answer token its
logits (through the target's LM head) take the soft cross-entropy to the target's distribution at
the same position, ``-sum_v p_v log q_v``: both predict token t+1. The logged ``accept_proxy`` is
Kangaroo's acceptance proxy, the mean of ``sum_v min(p_v, q_v)``.

The adapter's rank accuracy (how often the target's greedy token was its rank-r token) is averaged
during training over all processes and saved with it (``adapter0_top1`` in the metrics). Export
writes the target and ``kangaroo.safetensors`` + ``kangaroo.json`` beside it.

Where we differ: tokens are the target's greedy answers (Kangaroo trains on ShareGPT conversations
as EAGLE does); on a Llama-like target the adapter starts from the target's layer ``exit_layer``
(``models/kangaroo.py``), where the reference starts it at random; the loss is summed over the
counted positions and divided by the global batch's answer tokens (the trainer's rule for every
recipe), as the reference's mean over its loss mask within a batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from leaplm.config import Config, ConfigError
from leaplm.data.sft import IGNORE_INDEX
from leaplm.models.early_exit import decoder_layers
from leaplm.models.heads import ACCURACY_TOP_K, lm_logits
from leaplm.models.kangaroo import KANGAROO_ATTR, KangarooAdapter, KangarooConfig, attach_kangaroo, kangaroo_of
from leaplm.models.zoo import load_model
from leaplm.train import features
from leaplm.train.rank_accuracy import rank_hits, record_accuracy
from leaplm.train.recipes import Recipe
from leaplm.train.rollouts import GREEDY_DECODERS, answer_dataset, check_rollout_sections, collect_run_greedy_answers


@dataclass
class KangarooMethodConfig:
    exit_layer: int = 2  # Kangaroo: the self-draft is the target's first exit_layer layers
    rollout_block_size: int = 16  # Jacobi block of the rollout collection (speed only: the answers are greedy)
    offline: bool = False  # cache the frozen target's states once, then train without running the target

    def __post_init__(self):
        if isinstance(self.exit_layer, bool) or self.exit_layer < 1:
            raise ConfigError(f"method.exit_layer must be >= 1 (the target layers the self-draft shares), "
                              f"got {self.exit_layer}")


def check_sections(cfg: Config, target) -> None:
    m: KangarooMethodConfig = cfg.method
    check_rollout_sections(cfg, "kangaroo", m.rollout_block_size, decoder=GREEDY_DECODERS)
    if cfg.model.lora.r > 0:
        raise ConfigError("kangaroo keeps the target frozen (the self-draft shares its layers): set model.lora.r=0")
    try:
        layers = len(decoder_layers(target))
    except ValueError as err:
        raise ConfigError(f"kangaroo cannot split this model: {err}") from None
    if not m.exit_layer < layers:
        raise ConfigError(f"method.exit_layer must leave layers to verify with: 1..{layers - 1} for the target's "
                          f"{layers} layers, got {m.exit_layer}")


def build_model(cfg: Config):
    m: KangarooMethodConfig = cfg.method
    model, tokenizer = load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.attn_implementation,
                                  cfg.model.tokenizer)
    check_sections(cfg, model)
    model.requires_grad_(False)
    text = model.config.get_text_config()
    config = KangarooConfig(hidden_size=text.hidden_size, vocab_size=text.vocab_size, exit_layer=m.exit_layer,
                            base=cfg.model.name_or_path)
    attach_kangaroo(model, KangarooAdapter(config, model))
    return model, tokenizer


def target_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """What the loss reads of the frozen target [b, T, 2H]: its hidden state after layer
    ``exit_layer - 1`` (pre-norm) and its final hidden state (after the final norm). One call for
    online training and feature extraction alike, so a cached state is what the online step computes."""
    adapter = kangaroo_of(model)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False,
                    logits_to_keep=1)
    return torch.cat([out.hidden_states[adapter.config.exit_layer], out.hidden_states[-1]], dim=-1)


def rollout(cfg: Config, model, tokenizer, accelerator) -> None:
    """The target's greedy answers (collected once, reused on a rerun); with ``method.offline``, then
    the target's states of every training sample (``train/features.py``)."""
    collect_run_greedy_answers(cfg, model, tokenizer, accelerator, jacobi_block_size=cfg.method.rollout_block_size)
    if cfg.method.offline:
        features.extract_features(cfg, model, answer_dataset(cfg), target_states, accelerator,
                                  what=f"Kangaroo states: layer {cfg.method.exit_layer}'s input and the final one",
                                  pad_token_id=tokenizer.pad_token_id)


def build_dataset(cfg: Config, tokenizer) -> list[dict]:
    """One sample per answered prompt (:func:`~leaplm.train.rollouts.answer_dataset`)."""
    return answer_dataset(cfg)


# ----- Loss ---------------------------------------------------------------------------------


def causal_padded_mask(padding: torch.Tensor) -> torch.Tensor:
    """[b, T, T]: each query attends causally to the real keys (``padding`` [b, T], 1 = real); a
    padded query sees itself only, so no row of the mask is empty."""
    T = padding.shape[1]
    eye = torch.eye(T, dtype=torch.bool, device=padding.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=padding.device).tril()
    return causal[None] & padding[:, None, :].bool() | eye[None]


def adapter_outputs(adapter: KangarooAdapter, exit_states: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """The adapter's outputs [b, T, H] over a right-padded batch's exit states [b, T, H], causally,
    at positions 0..T-1: what drafting computes over the committed tokens."""
    b, T = padding.shape
    positions = torch.arange(T, device=padding.device)[None].expand(b, -1)
    out, _ = adapter(exit_states, positions, causal_padded_mask(padding))
    return out


def loss(model, batch, cfg: Config):
    adapter = kangaroo_of(model)
    input_ids, labels = batch["input_ids"], batch["labels"]
    counted = labels[:, 1:] != IGNORE_INDEX  # [b, T - 1] position t predicts the answer token t+1
    counts = torch.zeros(1, ACCURACY_TOP_K + 1, dtype=torch.float64, device=input_ids.device)
    total, metrics = adapter.norm.weight.sum() * 0.0, {}
    if counted.any():
        states = batch["hidden"] if cfg.method.offline else target_states(model, input_ids, batch["attention_mask"])
        exit_states, final = states.split([adapter.config.hidden_size, adapter.config.hidden_size], dim=-1)
        out = adapter_outputs(adapter, exit_states, batch["attention_mask"])  # [b, T, H]
        with torch.no_grad():  # the target's distribution at each counted position
            teacher = F.softmax(lm_logits(model, final[:, :-1][counted]).float(), -1)  # [c, V]
        logits = adapter.logits(out[:, :-1][counted]).float()  # [c, V]
        log_q = F.log_softmax(logits, -1)
        total = -(teacher * log_q).sum()
        counts[0] = rank_hits(logits, teacher.argmax(-1))
        with torch.no_grad():
            metrics["accept_proxy"] = float(torch.minimum(teacher, log_q.exp()).sum(-1).mean())
    # every process records once per micro-batch (the counts are summed over processes)
    return total, {**record_accuracy(adapter.accuracy, counts, "adapter"), **metrics}


RECIPE = Recipe(
    name="kangaroo",
    description="Kangaroo adapter (a self-draft: the target's first layers, one attention block, its LM head) on "
                "the target's greedy answers",
    method_config=KangarooMethodConfig,
    build_model=build_model,
    build_dataset=build_dataset,
    build_collator=features.build_collator,
    loss=loss,
    decoder=lambda cfg: ("kangaroo", {}),
    rollout=rollout,
    trained_in_full=(KANGAROO_ATTR,),
    export_settings=lambda cfg, model, out_dir: {"kangaroo": asdict(kangaroo_of(model).config)},
)
