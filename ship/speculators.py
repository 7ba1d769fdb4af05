"""Export an EAGLE-3 draft in the ``speculators`` format, the draft checkpoint vLLM serves.

    leaplm export-speculators runs/eagle3_smollm2/model --out runs/eagle3_smollm2/speculators
    vllm serve VERIFIER --speculative-config \
        '{"method": "eagle3", "model": "runs/eagle3_smollm2/speculators", "num_speculative_tokens": 3}'

The format (vllm-project/speculators, ``src/speculators/models/eagle3``; checked against
``speculators`` 0.9.0, which loads it with ``SpeculatorModel.from_pretrained``, and vLLM 0.32): a
``config.json`` with ``speculators_model_type: eagle3``, the draft layer's Llama config
(``transformer_layer_config``, its ``vocab_size`` the target's), ``draft_vocab_size``, the fused
layers (``eagle_aux_hidden_state_layer_ids``: HF ``hidden_states`` indices, the input of that
layer, as ours), ``norm_before_residual: false`` (our residual is the un-normed state, as
EAGLE-3's), and ``speculators_config`` naming the algorithm, a greedy proposal of
``speculative_tokens`` and the verifier (the target); and ``model.safetensors`` with the draft's
weights under the names our draft already uses (``fc``, ``layers.0.*``, ``norm``, ``lm_head``,
``d2t`` as offsets, ``t2d`` as a mask; no embedding: the server shares the target's). A draft with
the target's whole vocabulary leaves ``d2t``/``t2d`` out, as the format asks.

The verifier is by default the target the draft was trained on (``eagle3.json``'s ``base``,
resolved to its local directory when it is one of the zoo's). vLLM reads every ``*.safetensors``
file of a model directory, so serve the target from a directory holding its weights only (a
leaplm export also holds ``eagle3.safetensors``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from leaplm.models.eagle3 import Eagle3Draft, eagle3_of
from leaplm.models.zoo import load_model, resolve
from leaplm.ship.export import ExportError, replacing

FORMAT_VERSION = "0.9.0"  # the speculators release this layout was checked against
DROPPED = ("accuracy",)  # leaplm's own bookkeeping: the tree decoders' rank accuracies


def looks_like_speculators(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and "speculators_model_type" in json.loads(config.read_text())


def speculators_config(draft: Eagle3Draft, verifier: str, architectures: list[str],
                       speculative_tokens: int) -> dict[str, Any]:
    """The draft's ``config.json`` in the speculators format."""
    layer = draft.layer_config
    rope = dict(layer.rope_parameters or {})
    transformer = {
        "model_type": "llama", "vocab_size": draft.config.vocab_size, "hidden_size": layer.hidden_size,
        "intermediate_size": layer.intermediate_size, "num_hidden_layers": 1,
        "num_attention_heads": layer.num_attention_heads, "num_key_value_heads": layer.num_key_value_heads,
        "head_dim": layer.head_dim, "hidden_act": "silu", "max_position_embeddings": layer.max_position_embeddings,
        "rms_norm_eps": layer.rms_norm_eps, "rope_parameters": rope, "rope_theta": rope.get("rope_theta", 10000.0),
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    }
    return {
        "architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
        "speculators_version": FORMAT_VERSION, "draft_vocab_size": draft.config.draft_vocab_size,
        "norm_before_residual": False, "target_hidden_size": None,
        "eagle_aux_hidden_state_layer_ids": list(draft.config.aux_layers),
        "norm_before_fc": False, "fc_norm": False, "norm_output": False, "embed_requires_grad": False,
        "tie_word_embeddings": False, "dtype": str(draft.fc.weight.dtype).removeprefix("torch."),
        "transformer_layer_config": transformer,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": speculative_tokens,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": architectures},
        },
    }


def speculators_weights(draft: Eagle3Draft) -> dict[str, torch.Tensor]:
    """The draft's weights under the format's names (ours), without leaplm's bookkeeping, and
    without the vocabulary maps when the draft predicts the target's whole vocabulary."""
    full = draft.config.draft_vocab_size == draft.config.vocab_size
    return {name: tensor.detach().contiguous().cpu() for name, tensor in draft.state_dict().items()
            if name not in DROPPED and not (full and name in ("d2t", "t2d"))}


def verify_speculators(path: Path, expected: dict[str, torch.Tensor]) -> None:
    """Raise :class:`ExportError` unless ``path`` holds the config and every expected weight, same shape and dtype."""
    if not looks_like_speculators(path):
        raise ExportError(f"the speculators export written to {path} has no readable config.json; nothing was "
                          "replaced: rerun it (check free disk space)")
    with safe_open(str(path / "model.safetensors"), "pt") as opened:
        got = {name: opened.get_slice(name) for name in opened.keys()}
        wrong = sorted(name for name, tensor in expected.items() if name not in got
                       or list(got[name].get_shape()) != list(tensor.shape))
    if wrong or set(got) != set(expected):
        raise ExportError(f"the speculators export written to {path} does not hold the draft's weights "
                          f"({', '.join(wrong) or 'unexpected names'}); nothing was replaced: rerun it")


def export_speculators(model_dir: str | Path, out: str | Path, verifier: str | None = None,
                       speculative_tokens: int | None = None) -> Path:
    """Write the EAGLE-3 draft that rides on the model in ``model_dir`` to ``out`` in the speculators
    format, atomically (``out`` may only be an earlier speculators export). ``verifier``: the
    target's path or Hub id as the config names it (default: the draft's ``base``, resolved to its
    local directory when the zoo has one). ``speculative_tokens``: the proposal length a server
    uses by default (default: the draft's trained depth)."""
    model, _ = load_model(str(model_dir))
    try:
        draft = eagle3_of(model)
    except ValueError as err:
        raise ExportError(f"{model_dir} has no EAGLE-3 draft to export (train one with configs/eagle3/*.yaml)") from err
    if verifier is None:
        base = draft.config.base or str(model_dir)
        try:
            verifier = str(Path(resolve(base)).resolve()) if Path(resolve(base)).is_dir() else base
        except (FileNotFoundError, ValueError):
            verifier = base
    tokens = speculative_tokens or draft.config.ttt_steps
    if tokens < 1:
        raise ExportError(f"--speculative-tokens must be >= 1, got {tokens}")
    config = speculators_config(draft, verifier, list(model.config.architectures or []), tokens)
    weights = speculators_weights(draft)
    out = Path(out)
    with replacing(out, [Path(model_dir)], verify=lambda tmp: verify_speculators(tmp, weights),
                   ours=looks_like_speculators, kind="a speculators export (config.json with speculators_model_type)"
                   ) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a directory with the target and its EAGLE-3 draft (eagle3.safetensors)")
    p.add_argument("--out", required=True, help="the speculators directory to write")
    p.add_argument("--verifier", help="the target as the config names it (default: the model the draft was trained on)")
    p.add_argument("--speculative-tokens", type=int, help="the proposal length (default: the draft's trained depth)")


def run_command(args: argparse.Namespace) -> None:
    out = export_speculators(args.model, args.out, args.verifier, args.speculative_tokens)
    print(f"exported the EAGLE-3 draft to {out} (speculators format)")
