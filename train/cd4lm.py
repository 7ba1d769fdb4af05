"""Recipe: CD4LM consistency distillation of a block-diffusion LM from a frozen copy of itself.

    leaplm train configs/cd4lm/tiny_teacher.yaml
    accelerate launch --config_file launch/accelerate/zero2.yaml -m leaplm.train configs/cd4lm/qwen2.5-1.5b.yaml

Model: an adapted block-diffusion LM (``train/ar2bd.py``); the student is fine-tuned in full
(the reference; ``model.lora.r`` > 0 for LoRA), the teacher is a frozen copy of the starting
weights, kept beside the student (not a submodule: never trained, saved or exported).
Data: the data's ground-truth (prompt, answer) pairs, as the reference
(``train/block_diffusion.py::prompt_response_dataset``, as ar2bd's).
Batch: nested masks (``losses/dllm_distill.py::nested_masks``): the student masks each maskable
slot at ``r_s ~ U(0.4, 0.9)`` per row, the teacher a subset of those at
``clip(r_s * U(0.3, 0.7), 0.1, 0.6)``; both as two-stream rows of ``losses/block_diffusion.py::build_batch``.
Loss: ``lambda * T^2 * KL(teacher || student)`` at the slots both have masked plus
``(1 - lambda) * CE`` against the answer at every student-masked slot (and the block starts),
per-token terms clamped to 5, T = 2, ``lambda`` 0.9 for the first 10% of the steps then cosine
to 0.5 (``losses/dllm_distill.py::kl_consistency_loss_sum``, ``consistency_lambda``).
Decoder for eval and bench: ``block_diffusion`` with CD4LM's confidence-adaptive top-k
(``threshold: 0.95, max_per_step: 32``: the most confident slots above 0.95, at least one, at
most 32 per step).

Where we differ from the reference (yihao-liang/CDLM): masks are per answer block of our
block-diffusion layout (slot 0 of each block from the clean stream, never masked) rather than
over LLaDA's whole answer; the clamp is per token rather than on batch means; the KL is taken at
the slots the teacher still has masked (see ``losses/dllm_distill.py``); EOS is not suppressed
during the first 30% of decoding.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from leaplm.config import Config, ConfigError
from leaplm.losses.block_diffusion import NOISY_TARGET, build_batch
from leaplm.losses.dllm_distill import consistency_lambda, kl_consistency_loss_sum, nested_masks, target_keys
from leaplm.models.block_diffusion import training_attention
from leaplm.models.two_stream import two_stream_forward
from leaplm.train.block_diffusion import load_block_diffusion_model, load_model_config, prompt_response_dataset
from leaplm.train.recipes import NOISE_SEED, Recipe, sample_generators

TEACHER = "_cd4lm_teacher"  # attribute of the student holding the frozen teacher


@dataclass
class CD4LMConfig:
    RENAMED: ClassVar[dict[str, str]] = {"temperature": "kl_temperature"}  # old key -> new (config.py::build)
    student_rate: list[float] = field(default_factory=lambda: [0.4, 0.9])  # r_s ~ U(lo, hi)
    teacher_scale: list[float] = field(default_factory=lambda: [0.3, 0.7])  # r_t = clip(r_s * U(lo, hi), *teacher_clip)
    teacher_clip: list[float] = field(default_factory=lambda: [0.1, 0.6])
    kl_temperature: float = 2.0  # of the KL; the term is scaled by T^2
    lambda_start: float = 0.9  # KL weight for the first `lambda_hold` of training
    lambda_end: float = 0.5  # ... then cosine down to this
    lambda_hold: float = 0.1
    clamp: float = 5.0  # per-token cap of each term

    def __post_init__(self):
        for key in ("student_rate", "teacher_scale", "teacher_clip"):
            value = getattr(self, key)
            if len(value) != 2 or not 0 <= value[0] <= value[1] <= 1:
                raise ConfigError(f"method.{key} must be [lo, hi] with 0 <= lo <= hi <= 1, got {value}")
        if self.student_rate[0] <= 0:
            raise ConfigError("method.student_rate must start above 0 (the teacher keeps a subset of its masks)")
        if self.kl_temperature <= 0 or self.clamp <= 0:
            raise ConfigError(f"method.kl_temperature and method.clamp must be > 0, got {self.kl_temperature}, "
                              f"{self.clamp}")
        if not (0 <= self.lambda_end <= 1 and 0 <= self.lambda_start <= 1 and 0 <= self.lambda_hold <= 1):
            raise ConfigError("method.lambda_start, lambda_end and lambda_hold must lie in [0, 1]")


def build_model(cfg: Config):
    """The student, with a frozen copy of it as its teacher (an attribute, not a submodule)."""
    model, tokenizer = load_block_diffusion_model(cfg, "cd4lm")
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    object.__setattr__(model, TEACHER, teacher)  # plain attribute: no parameters, no state_dict entry
    return model, tokenizer


def build_collator(cfg: Config, tokenizer):
    m: CD4LMConfig = cfg.method
    spec = load_model_config(cfg)

    def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        prompts, responses = [s["prompt"] for s in samples], [s["response"] for s in samples]
        students, teachers = nested_masks([len(r) for r in responses], spec.block_size,
                                          student_rate=tuple(m.student_rate), teacher_scale=tuple(m.teacher_scale),
                                          teacher_clip=tuple(m.teacher_clip),
                                          generator=sample_generators(s[NOISE_SEED] for s in samples))
        ones = [torch.ones(len(x)) for x in students]
        layouts = [build_batch(prompts, responses, masks, ones, spec.block_size, spec.mask_token_id,
                               inverse_t_weight=False, ar_weight=0.0) for masks in (students, teachers)]
        (student, targets), (teacher, teacher_targets) = layouts
        width = student.input_ids.shape[1]  # the same for both: same prompts and answers
        teacher_masked = target_keys(teacher_targets, width)[teacher_targets.kinds == NOISY_TARGET]
        distilled = torch.isin(target_keys(targets, width), teacher_masked) & (targets.kinds == NOISY_TARGET)
        return {"student": student, "teacher": teacher, "targets": targets, "distilled": distilled,
                "n_targets": torch.tensor(len(targets.labels)),
                "n_tokens": torch.tensor(int((student.stream >= 0).sum()))}

    return collate


def loss(model, batch, cfg: Config):
    m: CD4LMConfig = cfg.method
    teacher = getattr(model, TEACHER, None)
    if teacher is None:
        raise ConfigError("cd4lm's loss needs the frozen teacher that cd4lm's build_model attaches to the model")
    device = next(model.parameters()).device
    attention = cfg.train.attention
    student_logits = two_stream_forward(model, batch["student"].to(device), attention, training_attention)  # [b, T, V]
    with torch.no_grad():
        teacher_logits = two_stream_forward(teacher.to(device), batch["teacher"].to(device), attention,
                                            training_attention)  # [b, T, V]
    weight = consistency_lambda(batch["step"], cfg.train.max_steps, m.lambda_start, m.lambda_end, m.lambda_hold)
    return kl_consistency_loss_sum(student_logits, teacher_logits, batch["targets"].to(device),
                                   batch["distilled"].to(device), weight=weight, kl_temperature=m.kl_temperature,
                                   clamp=m.clamp)


RECIPE = Recipe(
    name="cd4lm",
    description="CD4LM consistency distillation: nested-mask KL to a frozen teacher copy plus CE on the answer",
    method_config=CD4LMConfig,
    build_model=build_model,
    build_dataset=prompt_response_dataset,
    build_collator=build_collator,
    loss=loss,
    decoder=lambda cfg: ("block_diffusion", {"threshold": 0.95, "max_per_step": 32}),  # CD4LM's adaptive top-k
)
