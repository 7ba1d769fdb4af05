"""Kangaroo's adapter: with the target's own first layers and LM head, a self-draft for the target.

**Self-draft** (Kangaroo, arXiv 2404.18911; Equationliu/Kangaroo ``kangaroo/adapter.py``): the
target's first ``exit_layer`` decoder layers (shared and frozen: the draft's first layers *are* the
target's), then this adapter, then the target's own LM head (shared, frozen, not saved with it).
At position t the adapter reads the target's hidden state after layer ``exit_layer - 1``
(pre-norm: ``hidden_states[exit_layer]`` of a forward with ``output_hidden_states``) and predicts
the token the target predicts there, t+1.

**The adapter** is one layer: RMSNorm (``input_layernorm``) -> multi-head self-attention (rotary,
q/k/v/o sized like the target's, as ``models/eagle3.py``'s attention: sdpa with a bool mask) ->
residual add, with no MLP; then a final RMSNorm (``norm``) and the target's LM head
(:func:`~leaplm.models.heads.lm_logits`, so a family's logit scaling or soft-capping applies).

**Start.** On a Llama-like target (``model_type`` llama or mistral: rotary attention without
biases, q/k norms or score scaling of its own), the input norm and the attention start as the
target's layer ``exit_layer``'s (the layer right after the exit) and ``norm`` as the target's final
norm, so a new adapter is "the next layer's attention, then the target's head". On other families
they start random (``nn.Linear``'s default init, norms at 1), as the reference's always do.

Saved beside the target as ``kangaroo.safetensors`` + ``kangaroo.json`` (``models/addons.py``); on
the model it lives as ``model.kangaroo``, held out of the target's own files. The decoder that runs
it is ``inference/decoders/kangaroo.py``; ``models/early_exit.py`` runs the target's first layers
alone and its other layers alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from leaplm.models.eagle3 import Eagle3Attention, RMSNorm
from leaplm.models.early_exit import check_split, decoder_layers
from leaplm.models.heads import ACCURACY_TOP_K, attach_drafter, llama_layer_config, lm_logits

KANGAROO_ATTR = "kangaroo"
WEIGHTS_FILE = "kangaroo.safetensors"
CONFIG_FILE = "kangaroo.json"
LLAMA_LIKE = ("llama", "mistral")  # attention the adapter's copies exactly: the start from the target's layer


@dataclass
class KangarooConfig:
    hidden_size: int = 0
    vocab_size: int = 0  # the target's
    exit_layer: int = 2  # the self-draft is the target's first exit_layer layers (Kangaroo: 2)
    base: str = ""  # the target model the adapter was trained on, for the record

    def __post_init__(self):
        if self.exit_layer < 1:
            raise ValueError(f"exit_layer must be >= 1 (the target layers the self-draft shares), "
                             f"got {self.exit_layer}")


class KangarooAdapter(nn.Module):
    """The adapter (see the module docstring); ``target`` is held by reference for its LM head."""

    def __init__(self, config: KangarooConfig, target):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        check_split(target, config.exit_layer)
        self.config = config
        layer_config = llama_layer_config(target.config.get_text_config())
        h = config.hidden_size
        self.input_layernorm = RMSNorm(h, layer_config.rms_norm_eps)
        self.self_attn = Eagle3Attention(layer_config, inputs=h)
        self.norm = RMSNorm(h, layer_config.rms_norm_eps)
        self.rotary = LlamaRotaryEmbedding(layer_config)
        # accuracy[0, r]: how often the target's greedy token was the adapter's rank-r token (training average)
        self.register_buffer("accuracy", torch.zeros(1, ACCURACY_TOP_K))
        self.__dict__["target"] = target  # not a submodule: the target owns, saves and freezes its head
        self.started_from_target = target.config.get_text_config().model_type in LLAMA_LIKE
        if self.started_from_target:
            self._start_from(target)

    def _start_from(self, target) -> None:
        layer = decoder_layers(target)[self.config.exit_layer]
        with torch.no_grad():
            self.input_layernorm.weight.copy_(layer.input_layernorm.weight)
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(self.self_attn, name).weight.copy_(getattr(layer.self_attn, name).weight)
            self.norm.weight.copy_(target.get_decoder().norm.weight)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The adapter over exit-layer states ``hidden`` [b, s, H] at ``positions`` [b, s], attending
        per ``allowed`` [b, s, p + s] (True = may attend) to the ``p`` keys of ``past`` and the s new
        ones. Returns the normed output [b, s, H] (what the LM head reads) and the new (k, v)."""
        cos, sin = self.rotary(hidden, positions)
        attended, kv = self.self_attn(self.input_layernorm(hidden), cos, sin, allowed, past)
        return self.norm(hidden + attended), kv

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] of the next token at the adapter's outputs [..., H], by the target's head."""
        return lm_logits(self.target, out)


# ----- Attach, save, load --------------------------------------------------------------------


def attach_kangaroo(model, adapter: KangarooAdapter) -> KangarooAdapter:
    """Put ``adapter`` on ``model`` as ``model.kangaroo`` (same device and dtype), out of its saved files."""
    return attach_drafter(model, KANGAROO_ATTR, adapter)


def kangaroo_of(model) -> KangarooAdapter:
    adapter = getattr(model, KANGAROO_ATTR, None)
    if adapter is None:
        raise ValueError(f"this decoder needs a Kangaroo adapter on the model; load a directory with {WEIGHTS_FILE} "
                         "(train one with configs/kangaroo/*.yaml) or attach_kangaroo() one")
    return adapter


def save_attached_kangaroo(model, directory: str | Path) -> list[str]:
    """Save the Kangaroo adapter ``model`` carries beside its weights; the file names, or [] without one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    adapter = getattr(base, KANGAROO_ATTR, None)
    if adapter is None:
        return []
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(asdict(adapter.config), indent=2))
    return [WEIGHTS_FILE, CONFIG_FILE]


def attach_saved_kangaroo(model, directory: str | Path) -> None:
    """Attach the Kangaroo adapter saved in ``directory`` when there is one (a no-op otherwise)."""
    directory = Path(directory)
    if not (directory / WEIGHTS_FILE).is_file():
        return
    config = KangarooConfig(**json.loads((directory / CONFIG_FILE).read_text()))
    text = model.config.get_text_config()
    if config.hidden_size != text.hidden_size or config.exit_layer >= text.num_hidden_layers:
        raise ValueError(f"the Kangaroo adapter in {directory} is for hidden size {config.hidden_size} after layer "
                         f"{config.exit_layer - 1}; the model has hidden size {text.hidden_size} and "
                         f"{text.num_hidden_layers} layers: load it onto its target ({config.base})")
    adapter = KangarooAdapter(config, model)
    adapter.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    attach_kangaroo(model, adapter)
