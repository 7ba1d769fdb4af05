"""Shared fixtures. Append new fixtures at the end; several test files rely on these."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors under its interpreter, which is chosen when triton
# is first imported (transformers imports it with the model classes): so before leaplm is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from leaplm.models.zoo import TINY_CONFIGS, build_from_config, tiny_model


@pytest.fixture(scope="session")
def tiny():
    """``tiny(family)`` -> (model, tokenizer): random-initialised tiny models, built once per session.

    Tests must not change the weights; put a model in train mode only if you restore eval mode.
    """
    built: dict[str, tuple] = {}

    def get(family: str):
        if family not in built:
            built[family] = tiny_model(family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny) -> Path:
    """A tiny Llama saved like a real checkpoint (weights + tokenizer), for CLI tests."""
    model, tokenizer = tiny("llama")
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def lively_tiny():
    """``lively_tiny(family, scale=1.0, **config)`` -> (model, tokenizer): a tiny model whose layer
    weights are re-drawn ``scale`` times larger than the default init, built once per session;
    ``config`` overrides the family's tiny config (e.g. ``sliding_window=8``).

    At the default init the residual stream is mostly the input embedding, so greedy output
    hardly depends on the prompt (tied-embedding families repeat the last prompt token). Tests
    must not change the weights.
    """
    built: dict[tuple, tuple] = {}

    def get(family: str, scale: float = 1.0, **config):
        key = (family, scale, tuple(sorted(config.items())))
        if key not in built:
            model, tokenizer = tiny_model(family)
            if config:
                model = build_from_config(dict(TINY_CONFIGS[family], **config), tokenizer).eval()
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if param.dim() >= 2 and "embed" not in name:
                        param.copy_(torch.randn(param.shape, generator=generator) * scale / param.shape[-1] ** 0.5)
            built[key] = (model, tokenizer)
        return built[key]

    return get


@pytest.fixture
def eager_flex_backward_on_cpu(monkeypatch):
    """Let FlexAttention train on CPU through torch's eager flex path.

    torch refuses a CPU backward at flex_attention's front door, but its eager implementation
    (the dense math reference torch tests its kernels against) differentiates fine. Route
    transformers' compiled flex call to it, so a two-stream BlockMask's mask_mod
    (``models/two_stream.py``, block diffusion and Jacobi Forcing) is checked for gradients on
    CPU; the block-sparse indices are checked by the compiled forward-only tests and on CUDA.
    """
    import torch.nn.attention.flex_attention as torch_flex
    from transformers.integrations import flex_attention as hf_flex

    import leaplm.models.two_stream as two_stream

    monkeypatch.setattr(torch_flex, "_validate_device", lambda *tensors: None)
    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention",
                        lambda q, k, v, training=False, **kwargs: torch_flex.flex_attention(q, k, v, **kwargs))
    monkeypatch.setattr(two_stream, "flex_backward_available", lambda device: True)


@pytest.fixture
def static_flex_compile():
    """Compile FlexAttention for each new shape statically on CPU.

    transformers compiles ``flex_attention`` once per process with automatic dynamic shapes, so
    the second row width a process sees recompiles it with symbolic shapes, and torch's CPU
    flex template then fails to build (inductor C++ compile error, torch 2.13). Tests that
    run the compiled CPU forward on different layouts in one process use this.
    """
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        yield


# Overrides that shrink each landed recipe's shipped CPU config (configs/<recipe>/tiny_teacher.yaml)
# to a two-step smoke run (tests/test_export.py, tests/test_launch.py).
# A rollout recipe's small run: two tasks, few prompts, short answers (recipe tests add their own).
SMALL_ROLLOUT_RUN = ["data.tasks=[copy,sort]", "data.train_per_task=4", "rollout.max_new_tokens=32",
                     "rollout.batch_size=4", "train.warmup_steps=0", "eval.at_end=false", "logging.progress_bar=false"]
_SMOKE_COMMON = ["eval.at_end=false", "export.dir=null", "logging.wandb=false", "logging.progress_bar=false",
                 "train.warmup_steps=0", "train.save_every=0", "train.max_steps=2"]
_SMOKE_ROLLOUT = ["data.tasks=[copy,sort]", "data.train_per_task=4", "rollout.max_prompts=4", "method.jacobi_block_size=8",
                  "rollout.max_new_tokens=32", "rollout.batch_size=4", "eval.decoder_settings={jacobi_block_size: 8}"]
RECIPE_SMOKE = {
    "pretrain": [*_SMOKE_COMMON, "model.tokenizer=tiny-teacher", "model.init.hidden_size=32",
                 "model.init.intermediate_size=64", "model.init.num_hidden_layers=1",
                 "model.init.num_attention_heads=2", "model.init.num_key_value_heads=1", "data.train_per_task=8",
                 "train.micro_batch_size=8", "train.lr=1e-2"],
    "ar2bd": [*_SMOKE_COMMON, "data.tasks=[copy,sort]", "data.train_per_task=8", "data.max_length=128",
              "method.block_size=4", "method.block_size_curriculum=[]", "method.curriculum_steps=0",
              "train.micro_batch_size=4", "train.lr=1e-3",
              "export.dtype=null"],  # the config ships float16; round trips compare float32 weights exactly
    "cllm": [*_SMOKE_COMMON, *_SMOKE_ROLLOUT, "train.micro_batch_size=4"],
    "jacobi_forcing": [*_SMOKE_COMMON, *_SMOKE_ROLLOUT, "method.window_size=2", "method.min_noise_ratio=0.0",
                       "train.micro_batch_size=2"],
    # dLLM distillation of the shipped block-diffusion teacher (tiny-teacher-bd, block size 16)
    "dparallel": [*_SMOKE_COMMON, "data.tasks=[copy,sort]", "data.train_per_task=4", "rollout.max_prompts=4",
                  "rollout.max_new_tokens=32", "rollout.batch_size=4", "rollout.drop_wrong=false",
                  "train.micro_batch_size=2", "export.dtype=null"],
    "cd4lm": [*_SMOKE_COMMON, "data.tasks=[copy,sort]", "data.train_per_task=4", "data.max_length=128",
              "train.micro_batch_size=2", "export.dtype=null"],
    "learn2pd": [*_SMOKE_COMMON, "data.tasks=[copy,sort]", "data.train_per_task=4", "rollout.max_prompts=4",
                 "rollout.max_new_tokens=32", "rollout.batch_size=4", "rollout.drop_wrong=false",
                 "train.micro_batch_size=64"],
    # the shipped teacher stands in for a trained draft (configs/pretrain/tiny_draft.yaml), drafting for itself
    "acceptance_head": [*_SMOKE_COMMON, "model.name_or_path=tiny-teacher", "data.tasks=[copy,sort]",
                        "data.train_per_task=4", "rollout.max_prompts=4", "rollout.max_new_tokens=32",
                        "rollout.batch_size=4", "train.micro_batch_size=2"],
    "draft_heads": [*_SMOKE_COMMON, "data.tasks=[copy,sort]", "data.train_per_task=4", "rollout.max_prompts=4",
                    "method.num_heads=2", "rollout.max_new_tokens=32", "rollout.batch_size=4",
                    "train.micro_batch_size=2"],
    "eagle3": [*_SMOKE_COMMON, "data.tasks=[copy,sort]", "data.train_per_task=4", "rollout.max_prompts=4",
               "method.ttt_steps=2", "method.draft_vocab_size=128", "rollout.max_new_tokens=32",
               "rollout.batch_size=4", "train.micro_batch_size=2"],
    "kangaroo": [*_SMOKE_COMMON, "data.tasks=[copy,sort]", "data.train_per_task=4", "rollout.max_prompts=4",
                 "rollout.max_new_tokens=32", "rollout.batch_size=4", "train.micro_batch_size=2"],
}
