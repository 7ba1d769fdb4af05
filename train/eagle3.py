"""Recipe: an EAGLE-3 draft for a frozen causal LM (``models/eagle3.py``), trained with training-time test.

    leaplm train configs/eagle3/tiny_teacher.yaml
    leaplm train configs/eagle3/smollm2-135m.yaml
    accelerate launch --config_file launch/accelerate/multi_gpu.yaml -m leaplm.train configs/eagle3/tiny_teacher.yaml

Data (self-distillation, as the draft-heads recipe): the target answers the configured data's
prompts greedily through the shared engine (``train/rollouts.py``); a sample is a prompt and the
target's answer, and the loss counts answer tokens only. With ``draft_vocab_size`` below the
target's vocabulary, the draft predicts the most frequent answer tokens (EAGLE-3's
``t2d``/``d2t``; ties to the lower id, and a vocabulary larger than the tokens seen is filled with
the lowest unseen ids).

Loss (EAGLE-3, arXiv 2503.01840; SafeAILab/EAGLE ``eagle/traineagle3/cnets.py``): the target runs
once (frozen, no gradient) for the states of the fused layers and its final hidden state, whose
logits give its distribution. With ``offline`` (as EAGLE-3's and SpecForge's offline training),
these states are computed once after the rollouts (``train/features.py``) and training reads them
instead of running the target. The draft is unrolled for
``ttt_steps`` steps ("training-time test"); at step k, index t reads the token x_{t+1+k} and, as h,
the fused target features g_t (k = 0) or its own step k-1 output at t, at position t + k, and
predicts x_{t+2+k}. Its attention sees the step-0 keys of indices <= t (causal) and the keys of its
own index at steps 1..k, exactly what drafting sees from the cache and the drafted chain. Step k's
loss is the soft cross-entropy to the target's distribution at t+1+k restricted to the draft
vocabulary, ``-sum_v p_v log q_v``, over positions whose target token is an answer token that the
draft vocabulary holds; the total is ``sum_k step_decay^k L_k`` (EAGLE-3: 0.8^k over 7 steps).

The draft's rank accuracies per step are averaged during training (over all processes) and saved
with it; the ``eagle3`` decoder grows its tree from them. Export writes the target and
``eagle3.safetensors`` + ``eagle3.json`` beside it; ``leaplm export-speculators`` writes the draft
in the ``speculators`` format vLLM loads (``ship/speculators.py``).

Where we differ: rotary positions advance with the unrolled step (t + k), as drafting places
them; tokens are the target's greedy answers (EAGLE-3 regenerates with the target too, sampling);
no feature noise.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from leaplm.config import Config, ConfigError
from leaplm.data.sft import IGNORE_INDEX
from leaplm.models.eagle3 import EAGLE3_ATTR, Eagle3Config, Eagle3Draft, attach_eagle3, default_aux_layers, eagle3_of
from leaplm.models.heads import ACCURACY_TOP_K, lm_logits
from leaplm.models.zoo import load_model
from leaplm.train import features
from leaplm.train.rank_accuracy import rank_hits, record_accuracy
from leaplm.train.recipes import Recipe
from leaplm.train.rollouts import GREEDY_DECODERS, answer_dataset, check_rollout_sections, collect_run_greedy_answers


@dataclass
class Eagle3MethodConfig:
    ttt_steps: int = 7  # EAGLE-3: draft steps unrolled in training (the tree's depth at decode time)
    step_decay: float = 0.8  # EAGLE-3: step k's loss weighted step_decay**k
    draft_vocab_size: int = 0  # tokens the draft predicts; 0 = the target's whole vocabulary (EAGLE-3: 32000)
    aux_layers: list[int] = field(default_factory=list)  # target layers fused; [] = 2, L/2, L-3
    rollout_block_size: int = 16  # Jacobi block of the rollout collection (speed only: the answers are greedy)
    offline: bool = False  # cache the frozen target's states once, then train without running the target

    def __post_init__(self):
        if self.ttt_steps < 1:
            raise ConfigError(f"method.ttt_steps must be >= 1, got {self.ttt_steps}")
        if not 0 < self.step_decay <= 1:
            raise ConfigError(f"method.step_decay must be in (0, 1], got {self.step_decay}")
        if self.draft_vocab_size < 0:
            raise ConfigError(f"method.draft_vocab_size must be >= 0 (0 = the target's vocabulary), "
                              f"got {self.draft_vocab_size}")
        if self.aux_layers and len(self.aux_layers) != 3:
            raise ConfigError(f"method.aux_layers names 3 target layers (low, middle, high), got {self.aux_layers}")


def check_sections(cfg: Config, target) -> None:
    m: Eagle3MethodConfig = cfg.method
    check_rollout_sections(cfg, "eagle3", m.rollout_block_size, decoder=GREEDY_DECODERS)
    if cfg.model.lora.r > 0:
        raise ConfigError("eagle3 keeps the target frozen: set model.lora.r=0")
    text = target.config.get_text_config()
    layers = text.num_hidden_layers
    if any(not 0 <= i < layers for i in m.aux_layers):
        raise ConfigError(f"method.aux_layers must be target layers 0..{layers - 1}, got {m.aux_layers}")
    if m.draft_vocab_size > text.vocab_size:
        raise ConfigError(f"method.draft_vocab_size {m.draft_vocab_size} exceeds the target's vocabulary "
                          f"({text.vocab_size})")


def build_model(cfg: Config):
    m: Eagle3MethodConfig = cfg.method
    model, tokenizer = load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.attn_implementation,
                                  cfg.model.tokenizer)
    check_sections(cfg, model)
    model.requires_grad_(False)
    text = model.config.get_text_config()
    config = Eagle3Config(hidden_size=text.hidden_size, vocab_size=text.vocab_size,
                          draft_vocab_size=m.draft_vocab_size,
                          aux_layers=list(m.aux_layers) or default_aux_layers(text.num_hidden_layers),
                          ttt_steps=m.ttt_steps, base=cfg.model.name_or_path)
    attach_eagle3(model, Eagle3Draft(config, model))
    return model, tokenizer


def frequent_tokens(samples: list[dict], vocab_size: int, size: int) -> torch.Tensor:
    """The ``size`` most frequent answer tokens of ``samples`` (ties to the lower id), filled with
    the lowest ids not seen when the answers hold fewer distinct tokens (EAGLE#241)."""
    counts = Counter(token for s in samples for token in s["labels"] if token != IGNORE_INDEX)
    ranked = sorted(counts, key=lambda token: (-counts[token], token))[:size]
    unseen = (token for token in range(vocab_size) if token not in counts)
    ranked += [next(unseen) for _ in range(size - len(ranked))]
    return torch.tensor(sorted(ranked))


def target_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """What the loss reads of the frozen target [b, T, 4H]: the fused layers' states (3H) and the
    final hidden state (after the final norm; the target's distribution comes from it). One call for
    online training and feature extraction alike, so a cached state is what the online step computes."""
    draft = eagle3_of(model)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False,
                    logits_to_keep=1)
    return torch.cat([draft.aux_states(out.hidden_states), out.hidden_states[-1]], dim=-1)


def rollout(cfg: Config, model, tokenizer, accelerator) -> None:
    """The target's greedy answers (collected once, reused on a rerun); the draft vocabulary; with
    ``method.offline``, then the target's states of every training sample (``train/features.py``)."""
    collect_run_greedy_answers(cfg, model, tokenizer, accelerator, jacobi_block_size=cfg.method.rollout_block_size)
    draft = eagle3_of(model)
    samples = answer_dataset(cfg)
    if draft.config.draft_vocab_size < draft.config.vocab_size:  # the same on every process: same samples
        draft.set_vocabulary(frequent_tokens(samples, draft.config.vocab_size, draft.config.draft_vocab_size))
    if cfg.method.offline:
        features.extract_features(cfg, model, samples, target_states, accelerator,
                                  what=f"EAGLE-3 states: layers {draft.config.aux_layers} and final",
                                  pad_token_id=tokenizer.pad_token_id)


def build_dataset(cfg: Config, tokenizer) -> list[dict]:
    """One sample per answered prompt (:func:`~leaplm.train.rollouts.answer_dataset`)."""
    return answer_dataset(cfg)


# ----- Loss ---------------------------------------------------------------------------------


def unrolled_mask(n: int, steps: int, padding: torch.Tensor) -> torch.Tensor:
    """[b, n, steps * n]: what step ``steps - 1``'s queries at indices 0..n-1 attend to among the keys
    of steps 0..steps-1 (step j's keys at columns j*n .. j*n + n - 1): step 0's causally over the
    real tokens (``padding`` [b, n]), each later step's at the query's own index only."""
    eye = torch.eye(n, dtype=torch.bool, device=padding.device)
    causal = eye.cumsum(0).bool() if n else eye  # [n, n] lower triangle
    first = causal[None] & padding[:, None, :].bool() | eye[None]  # [b, n, n] a padded query sees itself
    return torch.cat([first] + [eye[None].expand(len(padding), -1, -1)] * (steps - 1), dim=-1)


def unrolled_steps(draft: Eagle3Draft, features: torch.Tensor, input_ids: torch.Tensor, padding: torch.Tensor,
                   steps: int):
    """Yield (k, output states [b, n, H]) for k = 0..steps-1 over indices 0..n-1, n = T - 2: the
    draft unrolled as the module docstring says. Tokens past the sequence are its last token (their
    positions are never counted)."""
    b, T = input_ids.shape
    n = T - 2
    index = torch.arange(n, device=input_ids.device)
    hidden = features[:, :n]
    keys, values = [], []
    for k in range(steps):
        tokens = input_ids[:, (index + 1 + k).clamp(max=T - 1)]  # [b, n] x_{t+1+k}
        positions = (index + k)[None].expand(b, -1)  # [b, n]
        past = (torch.cat(keys, 2), torch.cat(values, 2)) if keys else None
        hidden, (key, value) = draft.layer_forward(tokens, hidden, positions, unrolled_mask(n, k + 1, padding[:, :n]),
                                                   past)
        keys.append(key)
        values.append(value)
        yield k, hidden


def loss(model, batch, cfg: Config):
    m: Eagle3MethodConfig = cfg.method
    draft = eagle3_of(model)
    input_ids, labels = batch["input_ids"], batch["labels"]
    b, T = input_ids.shape
    if T < 3:
        return draft.fc.weight.sum() * 0.0, {}
    states = batch["hidden"] if m.offline else target_states(model, input_ids, batch["attention_mask"])  # [b, T, 4H]
    fused, final = states.split([3 * draft.config.hidden_size, draft.config.hidden_size], dim=-1)
    features = draft.fc(fused)  # [b, T, H]
    draft_ids = draft.draft_ids()  # [D]
    answer = labels != IGNORE_INDEX  # [b, T]
    total = torch.zeros((), device=input_ids.device)
    counts = torch.zeros(m.ttt_steps, ACCURACY_TOP_K + 1, dtype=torch.float64, device=input_ids.device)
    n = T - 2
    index = torch.arange(n, device=input_ids.device)
    for k, hidden in unrolled_steps(draft, features, input_ids, batch["attention_mask"], m.ttt_steps):
        ahead = index + 2 + k  # the token step k predicts at each index
        inside = ahead < T
        target_tokens = input_ids[:, ahead.clamp(max=T - 1)]  # [b, n]
        counted = answer[:, ahead.clamp(max=T - 1)] & inside[None] & draft.t2d[target_tokens]  # [b, n]
        if not counted.any():
            continue
        with torch.no_grad():  # the target's distribution of each counted token, on the draft vocabulary
            before = final[:, (index + 1 + k).clamp(max=T - 1)][counted]  # [c, H]
            teacher = F.softmax(lm_logits(model, before)[:, draft_ids].float(), -1)  # [c, D]
        logits = draft.logits(hidden[counted]).float()  # [c, D]
        total = total + m.step_decay ** k * -(teacher * F.log_softmax(logits, -1)).sum()
        counts[k] = rank_hits(logits, teacher.argmax(-1))
    return total, record_accuracy(draft.accuracy, counts, "step")


RECIPE = Recipe(
    name="eagle3",
    description="EAGLE-3 draft (fused target features, one layer, training-time test) on the target's greedy answers",
    method_config=Eagle3MethodConfig,
    build_model=build_model,
    build_dataset=build_dataset,
    build_collator=features.build_collator,
    loss=loss,
    decoder=lambda cfg: ("eagle3", {}),
    rollout=rollout,
    trained_in_full=(EAGLE3_ATTR,),
    export_settings=lambda cfg, model, out_dir: {"eagle3": asdict(eagle3_of(model).config)},
)
