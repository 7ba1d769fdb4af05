"""EAGLE-3's draft model: one decoder layer over fused low, middle and high target features.

**Features** (EAGLE-3, arXiv 2503.01840; SafeAILab/EAGLE ``eagle/traineagle3/cnets.py``): the
target's hidden states entering three of its layers (``aux_layers``; by default 2, L/2 and L-3 of L,
as EAGLE-3 and ``speculators``) are concatenated, [b, T, 3H], and fused by ``fc = Linear(3H, H)``:
g_t, what the target knew at position t.

**Draft step.** At position t the draft layer reads ``concat(RMSNorm(E(x_{t+1})), RMSNorm(h_t))``
(2H) into its attention's q/k/v, with the residual from h_t, then a gated MLP; ``norm`` and
``lm_head`` give the logits of token t+2. h_t is g_t for the first step over committed tokens;
drafting further feeds the draft's own output back as h (and its own drafted token as x), one
position on each time. The input embedding is the target's own, frozen and not saved with the
draft (as EAGLE-3's exports drop it).

**Draft vocabulary** (``draft_vocab_size`` < the target's): the lm_head predicts only the most
frequent tokens of the training data; ``d2t[i]`` maps draft id i to target id ``i + d2t[i]``
(EAGLE-3's offsets) and ``t2d`` [V] marks the target ids the draft can propose. A draft with the
full vocabulary has ``d2t`` all zeros.

**Training-time test** (the loss lives in ``train/eagle3.py``): the draft is unrolled for
``ttt_steps`` steps during training as it is at decode time; :meth:`Eagle3Draft.layer_forward`
takes the keys and values of the earlier steps for that.

Saved beside the target as ``eagle3.safetensors`` + ``eagle3.json`` (``models/addons.py``); on
the model it lives as ``model.eagle3``, held out of the target's own files. ``ship/speculators.py``
exports it in the ``speculators`` format vLLM loads.

Where we differ: rotary positions advance with the unrolled step in training, as they do when
drafting; the layer's attention is full (no sliding window), like the reference's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from leaplm.models.heads import ACCURACY_TOP_K, attach_drafter, llama_layer_config

EAGLE3_ATTR = "eagle3"
WEIGHTS_FILE = "eagle3.safetensors"
CONFIG_FILE = "eagle3.json"


def default_aux_layers(num_layers: int) -> list[int]:
    """EAGLE-3's low, middle and high layers (2, L/2, L-3), spread out on targets too shallow for them."""
    if num_layers >= 8:
        return [2, num_layers // 2, num_layers - 3]
    return [min(1, num_layers - 1), num_layers // 2, num_layers - 1]


@dataclass
class Eagle3Config:
    hidden_size: int = 0
    vocab_size: int = 0  # the target's
    draft_vocab_size: int = 0  # tokens the draft predicts (0: the target's whole vocabulary)
    aux_layers: list[int] = field(default_factory=list)  # target layers whose input hidden states are fused
    ttt_steps: int = 1  # steps unrolled in training: the depth the decoders draft to by default
    base: str = ""  # the target model the draft was trained on, for the record

    def __post_init__(self):
        if self.draft_vocab_size == 0:
            self.draft_vocab_size = self.vocab_size
        if not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size must be in 1..{self.vocab_size} (the target's vocabulary), "
                             f"got {self.draft_vocab_size}")
        if len(self.aux_layers) != 3:
            raise ValueError(f"aux_layers must name 3 target layers (low, middle, high), got {self.aux_layers}")
        if self.ttt_steps < 1:
            raise ValueError(f"ttt_steps must be >= 1, got {self.ttt_steps}")


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Eagle3Attention(nn.Module):
    """Attention whose q/k/v read the 2H input (or ``inputs`` features: Kangaroo's adapter reads H);
    keys and values are returned for a cache or the next TTT step."""

    def __init__(self, config, inputs: int | None = None):
        super().__init__()
        h, self.heads, self.kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        width = 2 * h if inputs is None else inputs
        self.q_proj = nn.Linear(width, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """``x`` [b, s, 2H] (or [b, s, inputs]); ``allowed`` [b, s, p + s] (True = may attend) over the
        ``p`` keys of ``past`` (k, v [b, kv_heads, p, d]), then the s new ones. Returns the output
        [b, s, H] and the new keys and values [b, kv_heads, s, d] (rotated)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)  # [b, heads, s, d]
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)  # [b, kv, s, d]
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed[:, None],
                                             enable_gqa=self.heads != self.kv_heads)  # [b, heads, s, d]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), (k, v)


class Eagle3Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)  # on the token embeddings
        self.hidden_norm = RMSNorm(h, eps)  # on the fused features or the previous step's output
        self.self_attn = Eagle3Attention(config)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = nn.ModuleDict({name: nn.Linear(*dims, bias=False) for name, dims in (
            ("gate_proj", (h, config.intermediate_size)), ("up_proj", (h, config.intermediate_size)),
            ("down_proj", (config.intermediate_size, h)))})

    def forward(self, embeds, hidden, cos, sin, allowed, past=None):
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)  # [b, s, 2H]
        attended, kv = self.self_attn(x, cos, sin, allowed, past)
        hidden = hidden + attended
        mlp = self.mlp
        gated = F.silu(mlp["gate_proj"](self.post_attention_layernorm(hidden)))
        hidden = hidden + mlp["down_proj"](gated * mlp["up_proj"](self.post_attention_layernorm(hidden)))
        return hidden, kv


class Eagle3Draft(nn.Module):
    """The draft (see the module docstring); ``target`` is held by reference for its input embedding."""

    def __init__(self, config: Eagle3Config, target):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.config = config
        layer_config = llama_layer_config(target.config.get_text_config())
        self.layer_config = layer_config
        h = config.hidden_size
        self.fc = nn.Linear(3 * h, h, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(layer_config)])
        self.norm = RMSNorm(h, layer_config.rms_norm_eps)
        self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
        self.rotary = LlamaRotaryEmbedding(layer_config)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(config.vocab_size, dtype=torch.bool))
        # accuracy[k, r]: how often the target's token at unrolled step k was the draft's rank-r token
        self.register_buffer("accuracy", torch.zeros(config.ttt_steps, ACCURACY_TOP_K))
        self.__dict__["target"] = target  # not a submodule: the target owns, saves and freezes its embedding
        with torch.no_grad():  # the draft's head starts as the target's, on the draft vocabulary
            self.lm_head.weight.copy_(target.get_output_embeddings().weight[self.draft_ids()])

    def draft_ids(self) -> torch.Tensor:
        """The target id of every draft id [D]."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    def set_vocabulary(self, target_ids: torch.Tensor) -> None:
        """Predict the target ids ``target_ids`` [D] (ascending), starting the head from the target's rows."""
        target_ids = target_ids.sort().values.to(self.d2t.device)
        if len(target_ids) != self.config.draft_vocab_size:
            raise ValueError(f"the draft vocabulary holds {self.config.draft_vocab_size} tokens, got {len(target_ids)}")
        self.d2t.copy_(target_ids - torch.arange(len(target_ids), device=target_ids.device))
        self.t2d.zero_()
        self.t2d[target_ids] = True
        with torch.no_grad():
            head = self.target.get_output_embeddings().weight
            self.lm_head.weight.copy_(head[target_ids.to(head.device)])

    def aux_states(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The fused layers' states [b, T, 3H] of a target forward's ``hidden_states`` (layer i's input at i)."""
        return torch.cat([hidden_states[i] for i in self.config.aux_layers], dim=-1)

    def features(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The fused features g [b, T, H] of a target forward's ``hidden_states``."""
        return self.fc(self.aux_states(hidden_states))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.target.get_input_embeddings()(tokens)

    def layer_forward(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor,
                      past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """One draft step: the embeddings of ``tokens`` [b, s] with ``hidden`` [b, s, H] at ``positions``
        [b, s], attending per ``allowed`` [b, s, p + s] to ``past`` keys/values and the new ones.
        Returns the output hidden states [b, s, H] (fed back to the next step) and the new (k, v)."""
        cos, sin = self.rotary(hidden, positions)
        return self.layers[0](self.embed(tokens).to(hidden.dtype), hidden, cos, sin, allowed, past)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [..., D] of the next-next token at output hidden states [..., H]."""
        return self.lm_head(self.norm(hidden))

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]


# ----- Attach, save, load --------------------------------------------------------------------


def attach_eagle3(model, draft: Eagle3Draft) -> Eagle3Draft:
    """Put ``draft`` on ``model`` as ``model.eagle3`` (same device and dtype), out of its saved files."""
    return attach_drafter(model, EAGLE3_ATTR, draft)


def eagle3_of(model) -> Eagle3Draft:
    draft = getattr(model, EAGLE3_ATTR, None)
    if draft is None:
        raise ValueError(f"this decoder needs an EAGLE-3 draft on the model; load a directory with {WEIGHTS_FILE} "
                         "(train one with configs/eagle3/*.yaml) or attach_eagle3() one")
    return draft


def save_attached_eagle3(model, directory: str | Path) -> list[str]:
    """Save the EAGLE-3 draft ``model`` carries beside its weights; the file names, or [] without one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    draft = getattr(base, EAGLE3_ATTR, None)
    if draft is None:
        return []
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in draft.state_dict().items()}, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(asdict(draft.config), indent=2))
    return [WEIGHTS_FILE, CONFIG_FILE]


def attach_saved_eagle3(model, directory: str | Path) -> None:
    """Attach the EAGLE-3 draft saved in ``directory`` when there is one (a no-op otherwise)."""
    directory = Path(directory)
    if not (directory / WEIGHTS_FILE).is_file():
        return
    config = Eagle3Config(**json.loads((directory / CONFIG_FILE).read_text()))
    if config.hidden_size != model.config.get_text_config().hidden_size:
        raise ValueError(f"the EAGLE-3 draft in {directory} is for hidden size {config.hidden_size}, the model has "
                         f"{model.config.get_text_config().hidden_size}; load it onto its target ({config.base})")
    draft = Eagle3Draft(config, model)
    draft.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    attach_eagle3(model, draft)
