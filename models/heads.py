"""Draft heads that ride on a causal LM's last hidden state: Medusa, Hydra, the Hydra++ prefix layer and Clover-2.

**Medusa** (FasterDecoding/Medusa): head k (0-based) reads the base's last hidden state h_t and
predicts token t+k+2 (the base's own LM head predicts t+1). A head is ``num_layers`` residual
blocks ``x + SiLU(Linear(x))`` (weights zero-initialised, so a new head starts as the identity)
and a vocabulary projection initialised from the base LM head.

**Hydra** (zankner/Hydra): head k also sees the embeddings of the tokens drafted before it,
``concat(h_t, E(x_{t+1}), ..., E(x_{t+k+1}))``. Its first block maps (k+2)H -> H with a learned
linear residual projection; the rest are Medusa's blocks.

**Hydra++ prefix layer**: one extra decoder layer over the base's hidden states before the heads
(Hydra's ``prefix-mlp``), with its own KV cache at decode time. We build it as a Llama decoder
layer sized like the base (as the reference does for its Llama bases) and, when the base is a
Llama, start it from the base's last layer.

**Clover-2** (XiaoBin1992/clover ``clover/model/clover2.py``; Xiao et al., arXiv 2405.00263): an
*augmenting block* first mixes the next token's embedding into each base hidden state,
``h_t + gate(h_t, E(x_{t+1}))``; the *attention decoder* (the prefix layer above, started from the
base's last layer, then an RMSNorm) runs over those states with its own KV cache. The heads are
*regressive*: head 0 is ``norm(Linear(H, H)(s_t))``; head k > 0 first folds the embedding of each
earlier drafted token into the state with a second gate, ``s <- s + gate(s, E(x_{t+1+j}))`` for
j = 1..k, then ``norm(Linear(2H, H)([s, E(x_{t+1+k})]))``; the base's own LM head gives the logits
(shared, frozen). The gate (the reference's ``ResAttentionBlock``) is per attention head:
``v(y) * cos(q(RMSNorm(x)), k(y))``. All heads k > 0 share one gate and one projection, as the
reference's. Where we differ: one attention-decoder layer (the reference's scripts use two) and
its input is the base's final hidden state after the base's norm (as our Hydra++ heads read it),
so Clover-2 and Hydra++ share offline features.

**Acceptance head** (SpecDec++): residual blocks and ``Linear(H, 2)`` on a draft model's last
hidden state, predicting (reject, accept) of the token drafted from it.

Heads are saved beside the base model as ``draft_heads.safetensors`` + ``draft_heads.json``
(:func:`save_heads`) and attached back to a loaded base by :func:`attach_saved_heads` (the zoo's
``load_model`` does this when the files are there). On the model they live as the submodule
``draft_heads``, left out of the base's own ``save_pretrained`` files.

**Shared LM head** (``shared_lm_head``): head k's logits are the base's own LM head applied to its
blocks' output, ``base_lm_head(blocks_k(x))``, as EAGLE's draft reuses the frozen target head
(SafeAILab/EAGLE ``eagle/model/cnets1.py``). The heads then hold the base by reference, not as a
submodule, and call its head: it is not copied, not saved with them and not trained (the base is
frozen, and Medusa-2's default LoRA targets leave the head out), so a head costs H² per block instead of
H² + H·V (at V = 49,152 and H = 576 that is 0.3M instead of 28.6M parameters). Medusa and
Hydra give each head its own ``Linear(H, V)`` started from the base's head: that is the
default (``shared_lm_head=False``).

Where we differ from the references: each Medusa head has its own residual blocks (Medusa's
``[ResBlock] * n`` repeats one instance, sharing the weights when n > 1); heads store the top-k
accuracy per head measured during training (``accuracy``), from which the decoders grow a tree;
Hydra's per-head projection has a bias, ours (as Medusa's) has none.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from leaplm.models.cache import cache_argument

HEADS_ATTR = "draft_heads"
WEIGHTS_FILE = "draft_heads.safetensors"
CONFIG_FILE = "draft_heads.json"
KINDS = ("medusa", "hydra", "clover", "acceptance")
TOKEN_READERS = ("hydra", "clover")  # kinds whose head k also reads the embeddings of the k+1 tokens before its target
ACCURACY_TOP_K = 8  # ranks whose hit rate each head records, for growing trees


@dataclass
class HeadsConfig:
    kind: str = "medusa"  # medusa | hydra | clover | acceptance
    num_heads: int = 4  # draft heads (1 for an acceptance head)
    num_layers: int = 1  # residual blocks per head
    hidden_size: int = 0
    vocab_size: int = 0
    prefix_layer: bool = False  # Hydra++ and Clover-2: one decoder layer over the base's hidden states first
    base: str = ""  # the base model the heads were trained on, for the record
    shared_lm_head: bool = False  # heads project through the base's own LM head instead of their own copies

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"heads kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.num_heads < 1 or self.num_layers < 0:
            raise ValueError(f"heads need num_heads >= 1 and num_layers >= 0, got {self.num_heads}, {self.num_layers}")
        if self.prefix_layer and self.kind not in TOKEN_READERS:
            raise ValueError("the prefix layer is Hydra++'s and Clover-2's: set kind='hydra' or 'clover', or "
                             "prefix_layer=false")
        if self.kind == "clover" and not (self.prefix_layer and self.shared_lm_head):
            raise ValueError("Clover-2 heads have an attention decoder (prefix_layer=true) and project through the "
                             "base's LM head (shared_lm_head=true)")
        if self.shared_lm_head and self.kind == "acceptance":
            raise ValueError("an acceptance head predicts (reject, accept), not tokens: set shared_lm_head=false")


class ResBlock(nn.Module):
    """``x + SiLU(Linear(x))``; ``zero_init`` makes a new block the identity (Medusa), SpecDec++ does not."""

    def __init__(self, hidden: int, zero_init: bool = True):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        if zero_init:
            nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class HydraInput(nn.Module):
    """Hydra's first block: (k+2)H inputs -> H, ``proj(x) + SiLU(Linear(x))``."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.linear = nn.Linear(width, hidden)
        self.proj = nn.Linear(width, hidden, bias=False)
        nn.init.zeros_(self.linear.weight)
        with torch.no_grad():  # start as "take h_t": the residual projection copies the hidden state
            self.proj.weight.zero_()
            self.proj.weight[:, :hidden] = torch.eye(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + F.silu(self.linear(x))


class CosineGate(nn.Module):
    """Clover-2's augmenting block: ``x + v(y) * cos(q(RMSNorm(x)), k(y))``, the cosine taken per
    attention head (``heads`` slices of H), so each head's slice of v(y) is let through by how well
    x's query matches y's key. Starts near ``x + 0``: q and k near the identity, v near zero."""

    def __init__(self, hidden: int, heads: int, eps: float):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        if hidden % heads:
            raise ValueError(f"the gate splits the hidden size {hidden} into {heads} heads: it must divide evenly")
        self.heads, self.eps = heads, eps
        self.norm = LlamaRMSNorm(hidden, eps)
        self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))
        with torch.no_grad():  # the reference's init: eye + U(0, 0.01) for q and k, U(0, 0.01) for v, zero biases
            for linear in (self.q, self.k, self.v):
                nn.init.uniform_(linear.weight, 0.0, 0.01)
                nn.init.zeros_(linear.bias)
            for linear in (self.q, self.k):
                linear.weight += torch.eye(hidden)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x`` [..., H] gated by ``y`` [..., H] -> [..., H]."""
        split = (*x.shape[:-1], self.heads, -1)
        q, k = self.q(self.norm(x)).view(split), self.k(y).view(split)  # [..., heads, H/heads]
        cos = F.cosine_similarity(q, k, dim=-1, eps=self.eps)  # [..., heads]
        return x + (self.v(y).view(split) * cos[..., None]).flatten(-2)


def llama_layer_config(base_config):
    """A Llama config for one decoder layer sized like ``base_config``'s (a draft's own layer: the
    Hydra++ prefix layer, EAGLE-3's draft layer), with the base's rotary embedding."""
    from transformers import LlamaConfig

    heads = base_config.num_attention_heads
    rope = getattr(base_config, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope:  # per-layer-type rope (Gemma3): take the global one
        rope = rope["full_attention"]
    config = LlamaConfig(
        hidden_size=base_config.hidden_size, intermediate_size=base_config.intermediate_size,
        num_attention_heads=heads, num_key_value_heads=getattr(base_config, "num_key_value_heads", heads),
        head_dim=getattr(base_config, "head_dim", None) or base_config.hidden_size // heads,
        rms_norm_eps=getattr(base_config, "rms_norm_eps", 1e-6),
        max_position_embeddings=base_config.max_position_embeddings,
        rope_parameters=rope,
    )
    config._attn_implementation = "sdpa"  # our own layers: the bool masks they take are sdpa's form
    return config


class PrefixLayer(nn.Module):
    """One Llama decoder layer over hidden states [b, s, H], with rotary positions and its own cache."""

    def __init__(self, base_config):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        config = llama_layer_config(base_config)
        self.layer = LlamaDecoderLayer(config, layer_idx=0)
        self.rotary = LlamaRotaryEmbedding(config)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor, cache=None) -> torch.Tensor:
        """``allowed`` [b, s, kv] (True = may attend); ``cache`` (a DynamicCache) gets the s new K/V."""
        position_embeddings = self.rotary(hidden, positions)
        out = self.layer(hidden, attention_mask=allowed[:, None], position_ids=positions,
                         **{cache_argument(self.layer): cache}, use_cache=cache is not None,
                         position_embeddings=position_embeddings)
        return out[0] if isinstance(out, tuple) else out


class DraftHeads(nn.Module):
    """Medusa, Hydra or Clover-2 heads (or one acceptance head), see the module docstring."""

    def __init__(self, config: HeadsConfig, base=None):
        super().__init__()
        self.config = config
        h, v = config.hidden_size, config.vocab_size
        if config.kind == "acceptance":
            self.blocks = nn.ModuleList([nn.Sequential(*[ResBlock(h, zero_init=False) for _ in range(config.num_layers)],
                                                       nn.Linear(h, 2))])
        elif config.kind == "clover":
            self._build_clover(base)
        else:
            self.blocks = nn.ModuleList()
            for k in range(config.num_heads):
                layers: list[nn.Module] = []
                if config.kind == "hydra":
                    layers.append(HydraInput((k + 2) * h, h))
                layers += [ResBlock(h) for _ in range(config.num_layers - (config.kind == "hydra"))]
                self.blocks.append(nn.Sequential(*layers))
            self.lm_heads = None if config.shared_lm_head else nn.ModuleList(
                [nn.Linear(h, v, bias=False) for _ in range(config.num_heads)])
        if config.shared_lm_head:
            if base is None:
                raise ValueError("heads with shared_lm_head project through the base's LM head: pass base=")
            # Kept out of _modules: the base owns (saves, moves, freezes) its head; registering it
            # here would save it again with the heads and list it among their parameters.
            self.__dict__["base"] = base
        self.prefix = PrefixLayer(base.config) if config.prefix_layer and base is not None else None
        if config.prefix_layer and base is None:
            raise ValueError("a prefix layer (Hydra++, Clover-2) is sized from the base model: pass base=")
        # accuracy[k, r]: how often the target of head k was its rank-r prediction (training average)
        self.register_buffer("accuracy", torch.zeros(config.num_heads, ACCURACY_TOP_K))
        if base is not None and config.kind != "acceptance":
            self._init_from(base)

    def _build_clover(self, base) -> None:
        """Clover-2's parts (module docstring): the augmenting gate and the attention decoder's norm
        around the prefix layer; head 0's projection, the later heads' shared gate and projection."""
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        if base is None:
            raise ValueError("Clover-2 heads are sized from the base model: pass base=")
        text = base.config.get_text_config()
        h, eps = self.config.hidden_size, getattr(text, "rms_norm_eps", 1e-6)
        self.augment = CosineGate(h, text.num_attention_heads, eps)
        self.prefix_norm = LlamaRMSNorm(h, eps)
        self.regress = CosineGate(h, text.num_attention_heads, eps)
        self.blocks = nn.ModuleList([nn.Linear(h, h), nn.Linear(2 * h, h)])  # head 0's; the later heads' shared
        self.head_norm = LlamaRMSNorm(h, eps)
        self.lm_heads = None  # the base's head
        with torch.no_grad():  # the reference's init: (the left block of) the identity + U(0, 0.01), zero biases
            for linear in self.blocks:
                nn.init.uniform_(linear.weight, 0.0, 0.01)
                linear.weight[:, :h] += torch.eye(h)
                nn.init.zeros_(linear.bias)

    def _init_from(self, base) -> None:
        with torch.no_grad():
            for head in self.lm_heads or ():
                head.weight.copy_(base.get_output_embeddings().weight)
            if base.config.model_type == "llama":  # the base's own last layer and norm fit ours exactly
                if self.prefix is not None:
                    self.prefix.layer.load_state_dict(base.model.layers[-1].state_dict())
                if self.kind == "clover":
                    self.prefix_norm.weight.copy_(base.model.norm.weight)
                    self.head_norm.weight.copy_(base.model.norm.weight)

    @property
    def kind(self) -> str:
        return self.config.kind

    def run_prefix(self, hidden: torch.Tensor, next_embeds: torch.Tensor, positions: torch.Tensor,
                   allowed: torch.Tensor, cache=None) -> torch.Tensor:
        """The prefix layer over base hidden states ``hidden`` [b, s, H] whose next tokens have the
        embeddings ``next_embeds`` [b, s, H] (Clover-2 mixes them in first and norms the output;
        Hydra++ reads the hidden states alone). ``allowed`` and ``cache`` as :meth:`PrefixLayer.forward`."""
        if self.kind != "clover":
            return self.prefix(hidden, positions, allowed, cache)
        return self.prefix_norm(self.prefix(self.augment(hidden, next_embeds.to(hidden.dtype)), positions, allowed,
                                            cache))

    def features(self, k: int, hidden: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Head k's output [..., H] before the vocabulary projection, at hidden states [..., H]; a
        Hydra or Clover-2 head also takes the embeddings [..., k+1, H] of the k+1 tokens before its
        target (the base's next token first)."""
        if self.kind == "clover":
            state = hidden
            for j in range(1, k + 1):  # fold in the drafted tokens before the target, one at a time
                state = self.regress(state, embeds[..., j, :])
            if k == 0:
                return self.head_norm(self.blocks[0](state))
            return self.head_norm(self.blocks[1](torch.cat([state, embeds[..., k, :]], dim=-1)))
        x = hidden
        if self.kind == "hydra":
            x = torch.cat([hidden, embeds.flatten(-2)], dim=-1)  # [..., (k+2)H]
        return self.blocks[k](x)

    def head(self, k: int, hidden: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [..., V] of head k (arguments as :meth:`features`)."""
        return self.head_logits(k, self.features(k, hidden, embeds))

    def head_logits(self, k: int, features: torch.Tensor) -> torch.Tensor:
        """Head k's vocabulary projection of its :meth:`features` [..., H] -> [..., V]."""
        # Looked up on every call: under LoRA (Medusa-2) the base's head may be replaced by a wrapper.
        lm_head = self.base.get_output_embeddings() if self.lm_heads is None else self.lm_heads[k]
        return lm_head(features)

    def accept_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Acceptance head: (reject, accept) logits [..., 2] at draft hidden states [..., H]."""
        return self.blocks[0](hidden)


def lm_logits(base, hidden: torch.Tensor) -> torch.Tensor:
    """The base's logits [..., V] at its final hidden states [..., H], as its own forward computes
    them: its LM head, then the scaling of families that scale their logits (Cohere multiplies by
    ``logit_scale``, Granite divides by ``logits_scaling``) and the soft-capping of those that cap
    them (Gemma 2). Distillation targets are softmaxes of these: a missed scale changes them."""
    logits = base.get_output_embeddings()(hidden)
    text = base.config.get_text_config()
    if getattr(text, "logit_scale", None) is not None:
        logits = logits * text.logit_scale
    if getattr(text, "logits_scaling", None) is not None:
        logits = logits / text.logits_scaling
    cap = getattr(text, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


# ----- Attach, save, load --------------------------------------------------------------------


def attach_drafter(model, name: str, drafter: nn.Module) -> nn.Module:
    """Put ``drafter`` (heads or an EAGLE-3 draft) on ``model`` as ``model.<name>``, in the model's
    device and dtype, out of its saved files; its rank ``accuracy`` stays float32."""
    drafter.to(device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)
    drafter.accuracy.data = drafter.accuracy.data.float()
    setattr(model, name, drafter)
    ignored = set(model._keys_to_ignore_on_save or ())
    model._keys_to_ignore_on_save = ignored | {f"{name}.{k}" for k in drafter.state_dict()}
    return drafter


def attach_heads(model, heads: DraftHeads) -> DraftHeads:
    """Put ``heads`` on ``model`` as ``model.draft_heads`` (same device and dtype), out of its saved files."""
    return attach_drafter(model, HEADS_ATTR, heads)


def heads_of(model, kind: tuple[str, ...] = ("medusa", "hydra")) -> DraftHeads:
    heads = getattr(model, HEADS_ATTR, None)
    if heads is None or heads.kind not in kind:
        have = "no draft heads" if heads is None else f"{heads.kind} heads"
        raise ValueError(
            f"this decoder needs {' or '.join(kind)} heads on the model, which has {have}; load a directory with "
            f"{WEIGHTS_FILE} (train one with configs/draft_heads/*.yaml) or attach_heads() them"
        )
    return heads


def unwrap_heads(model) -> tuple:
    """(the causal LM, maybe under LoRA, and its heads)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return model, getattr(base, HEADS_ATTR)


def save_heads(heads: DraftHeads, directory: str | Path) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(asdict(heads.config), indent=2))
    return out / WEIGHTS_FILE


def save_attached_heads(model, directory: str | Path) -> list[str]:
    """Save the heads ``model`` carries (under LoRA too) beside its weights; the file names, or [] without heads.

    ``save_pretrained`` leaves them out of the base's weights, so a checkpoint or an export that
    calls this keeps them, and the zoo's loader attaches them again.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    heads = getattr(base, HEADS_ATTR, None)
    if heads is None:
        return []
    save_heads(heads, directory)
    return [WEIGHTS_FILE, CONFIG_FILE]


def load_heads(directory: str | Path, base) -> DraftHeads:
    """The heads saved in ``directory``, attached to ``base``."""
    directory = Path(directory)
    config = HeadsConfig(**json.loads((directory / CONFIG_FILE).read_text()))
    if config.kind != "acceptance" and config.hidden_size != base.config.hidden_size:
        raise ValueError(f"heads in {directory} are for hidden size {config.hidden_size}, the model has "
                         f"{base.config.hidden_size}; load them onto the base they were trained on ({config.base})")
    heads = DraftHeads(config, base if config.prefix_layer or config.shared_lm_head else None)
    heads.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return attach_heads(base, heads)


def attach_saved_heads(model, directory: str | Path) -> None:
    """Attach the heads saved in ``directory`` when there are any (a no-op otherwise)."""
    if (Path(directory) / WEIGHTS_FILE).is_file():
        load_heads(directory, model)
