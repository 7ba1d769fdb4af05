"""``leaplm check MODEL``: is every lossless decoder exact on this model, and which recipes can train it?

    leaplm check MODEL [--prompts FILE.jsonl] [--n N] [--max-new-tokens T] [--out DIR]

The zoo loads any decoder-only causal LM with the pieces the engine needs (``models/zoo.py``
names the one a model lacks). Whether the decoders then reproduce the model's greedy output is a
property of the model's code, so this command measures it on the user's own model: every
lossless decoder (:data:`CASES`) decodes a few prompts (generic ones, or the first rows of a
prompts file) one at a time and as one left-padded batch, and its tokens are compared with Hugging
Face ``generate``'s on the same layout (``hf_generate``, as ``leaplm bench`` compares them).

Decoders that need more than the model get untrained stand-ins, since exactness does not depend
on their quality: random Medusa, Hydra and Hydra++ heads, an untrained EAGLE-3 draft and Kangaroo
adapter, a random tiny Llama draft with the
model's vocabulary (and, for adaptive drafting, a random acceptance head), and for block
diffusion the model converted in place (a mask token added, ``models/block_diffusion.py``), whose
clean stream is still the AR model, so verified decoding must reproduce its greedy output too.
A stand-in the model cannot take (a Hydra++ prefix layer sized from a config without
``intermediate_size``, say) makes its decoder *unavailable*, with the reason; a decoder that runs
and differs from ``generate`` is *not exact*, one that raises is an *error*, and either makes the
command exit with 1.

Then the model pieces the training recipes use are probed (:data:`PIECES`: two-stream attention,
a mask-token row, noisy weight copies, final hidden states and a linear head, the Hydra++ prefix
layer, the fused loss, LoRA's default target modules), and each recipe of ``train/recipes.py`` is
listed with the pieces it needs (:data:`RECIPE_NEEDS`) and whether it can train this model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from leaplm.config import LoraConfig
from leaplm.data.sft import prompt_ids
from leaplm.inference.engine import DecoderError, Engine
from leaplm.inference.evaluate import (
    REFERENCE,
    TaskScore,
    UserPrompt,
    agreed_prefix,
    format_table,
    load_for_eval,
    plain_prompt_ids,
    prompt_room,
    read_prompts,
)
from leaplm.models.block_diffusion import convert
from leaplm.models.eagle3 import EAGLE3_ATTR, Eagle3Config, Eagle3Draft, attach_eagle3, default_aux_layers
from leaplm.models.early_exit import decoder_layers, first_layers, later_layers
from leaplm.models.heads import HEADS_ATTR, DraftHeads, HeadsConfig, PrefixLayer, attach_heads
from leaplm.models.kangaroo import KANGAROO_ATTR, KangarooAdapter, KangarooConfig, attach_kangaroo
from leaplm.models.two_stream import CLEAN, NOISY, StreamLayout, StreamRule, layout_attention
from leaplm.models.zoo import DTYPES, TINY_SIZE, UnsupportedModelError, final_hidden_states
from leaplm.train.recipes import RECIPE_MODULES

# Generic prompts of different lengths (so the batch is left-padded): chat turns when the tokenizer
# has a chat template, plain text otherwise.
DEFAULT_PROMPTS = (
    "What is 12 + 30?",
    "Write a short poem about the sea.",
    "List three prime numbers and say why each one is prime.",
    "Explain in two sentences what a hash table is and when to use one.",
)
DEFAULT_N = len(DEFAULT_PROMPTS)
DEFAULT_MAX_NEW_TOKENS = 32
HEADS = 3  # random draft heads for the tree decoders


# ----- The decoders ----------------------------------------------------------------------------


class Unavailable(Exception):
    """The model cannot take what a decoder or a recipe needs; the message says why."""


# (model, tokenizer) -> context manager yielding (settings the decoder also needs, the tokenizer to decode with)
Setup = Callable[[PreTrainedModel, PreTrainedTokenizerBase], contextlib.AbstractContextManager]


@contextlib.contextmanager
def as_it_is(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Iterator[tuple[dict, Any]]:
    yield {}, tokenizer


def random_heads(kind: str, prefix_layer: bool = False) -> Setup:
    """Untrained ``kind`` heads on the model for the decoder's run; the model's own heads come back after."""

    @contextlib.contextmanager
    def setup(model, tokenizer):
        text = model.config.get_text_config()
        config = HeadsConfig(kind=kind, num_heads=HEADS, hidden_size=text.hidden_size, vocab_size=text.vocab_size,
                             prefix_layer=prefix_layer, shared_lm_head=kind == "clover")
        try:
            heads = DraftHeads(config, model)
        except Exception as err:  # the prefix layer is sized from the config, which may lack a field
            name = {"clover": "Clover-2"}.get(kind, "Hydra++" if prefix_layer else kind)
            raise Unavailable(f"{name} heads cannot be built for this model "
                              f"({type(err).__name__}: {err})") from err
        own = getattr(model, HEADS_ATTR, None)
        attach_heads(model, heads)
        try:
            yield {}, tokenizer
        finally:
            delattr(model, HEADS_ATTR)
            if own is not None:
                setattr(model, HEADS_ATTR, own)

    return setup


@contextlib.contextmanager
def random_eagle3(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Iterator[tuple[dict, Any]]:
    """An untrained EAGLE-3 draft on the model for the decoder's run; the model's own comes back after."""
    text = model.config.get_text_config()
    config = Eagle3Config(hidden_size=text.hidden_size, vocab_size=text.vocab_size, ttt_steps=HEADS,
                          aux_layers=default_aux_layers(text.num_hidden_layers))
    try:
        draft = Eagle3Draft(config, model)
    except Exception as err:  # its layer is sized from the config, which may lack a field
        raise Unavailable(f"an EAGLE-3 draft cannot be built for this model ({type(err).__name__}: {err})") from err
    own = getattr(model, EAGLE3_ATTR, None)
    attach_eagle3(model, draft)
    try:
        yield {}, tokenizer
    finally:
        delattr(model, EAGLE3_ATTR)
        if own is not None:
            setattr(model, EAGLE3_ATTR, own)


@contextlib.contextmanager
def untrained_kangaroo(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Iterator[tuple[dict, Any]]:
    """An untrained Kangaroo adapter (exiting after layer 2, or 1 on two layers) on the model for the
    decoder's run; the model's own comes back after."""
    text = model.config.get_text_config()
    try:
        config = KangarooConfig(hidden_size=text.hidden_size, vocab_size=text.vocab_size,
                                exit_layer=max(1, min(2, len(decoder_layers(model)) - 1)))
        adapter = KangarooAdapter(config, model)
    except Exception as err:  # no `.layers` to split, or an attention sized from a config that lacks a field
        raise Unavailable(f"a Kangaroo adapter cannot be built for this model ({type(err).__name__}: {err})") from err
    own = getattr(model, KANGAROO_ATTR, None)
    attach_kangaroo(model, adapter)
    try:
        yield {}, tokenizer
    finally:
        delattr(model, KANGAROO_ATTR)
        if own is not None:
            setattr(model, KANGAROO_ATTR, own)


def random_draft(model: PreTrainedModel) -> PreTrainedModel:
    """A random tiny Llama with the model's vocabulary and positions: a draft whose guesses are
    mostly rejected, so speculative decoding's rejection path is what gets checked."""
    text = model.config.get_text_config()
    positions = getattr(text, "max_position_embeddings", None) or 4096
    config = AutoConfig.for_model("llama", **dict(TINY_SIZE, vocab_size=text.vocab_size,
                                                  max_position_embeddings=positions))
    torch.manual_seed(0)
    draft = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return draft.to(device=next(model.parameters()).device, dtype=model.dtype).eval()


def a_draft(adaptive: bool) -> Setup:
    @contextlib.contextmanager
    def setup(model, tokenizer):
        draft = random_draft(model)
        if adaptive:
            head = HeadsConfig(kind="acceptance", num_heads=1, hidden_size=TINY_SIZE["hidden_size"])
            attach_heads(draft, DraftHeads(head))
        yield {"draft": draft}, tokenizer

    return setup


@contextlib.contextmanager
def block_diffusion_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Iterator[tuple[dict, Any]]:
    """The model converted to block diffusion in place (kept so for the later cases), unless it is one."""
    if not getattr(model.config, "block_diffusion", None):
        tokenizer = copy.deepcopy(tokenizer)  # convert adds the mask token to it
        try:
            convert(model, tokenizer, block_size=4)
        except Exception as err:
            raise Unavailable(f"the model cannot be converted to block diffusion "
                              f"({type(err).__name__}: {err})") from err
    yield {}, tokenizer


@dataclass(frozen=True)
class Case:
    label: str  # how the tables name it
    decoder: str
    settings: dict[str, Any] = field(default_factory=dict)
    setup: Setup = as_it_is


# Every lossless decoder, greedy. Block diffusion comes last: it converts the model in place.
CASES = (
    Case("ar", "ar"),
    Case("jacobi", "jacobi"),
    Case("jacobi_multiblock", "jacobi_multiblock"),
    Case("medusa", "medusa", setup=random_heads("medusa")),
    Case("hydra", "hydra", setup=random_heads("hydra")),
    Case("hydra++", "hydra", setup=random_heads("hydra", prefix_layer=True)),
    Case("clover", "clover", setup=random_heads("clover", prefix_layer=True)),
    Case("eagle3", "eagle3", setup=random_eagle3),
    Case("kangaroo", "kangaroo", setup=untrained_kangaroo),
    Case("speculative", "speculative", {"draft_tokens": 4}, a_draft(adaptive=False)),
    Case("speculative adaptive", "speculative", {"stop_threshold": 0.5, "min_draft": 1, "max_draft": 6},
         a_draft(adaptive=True)),
    Case("block_diffusion verified", "block_diffusion", {"verify": True}, block_diffusion_model),
    Case("block_diffusion verified DualCache", "block_diffusion", {"verify": True, "sub_block_cache": True},
         block_diffusion_model),
)
FAILED = ("not exact", "error")  # the statuses that fail the check; "unavailable" names a missing piece


def first_difference(prompts: list[UserPrompt], got: list[list[int]], want: list[list[int]],
                     tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Where the first row that differs from ``generate`` leaves it, in words; None when every row agrees."""
    for prompt, tokens, expected in zip(prompts, got, want):
        if tokens != expected:
            k = agreed_prefix(tokens, expected)

            def at(seq: list[int]) -> str:
                return f"{seq[k]} {tokenizer.decode([seq[k]])!r}" if k < len(seq) else "the end"

            return f"prompt {prompt.id!r}, new token {k}: generate {at(expected)}, decoder {at(tokens)}"
    return None


def check_case(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, case: Case, prompts: list[UserPrompt],
               max_new_tokens: int) -> dict[str, Any]:
    """One decoder alone on each prompt and on all of them as one left-padded batch, against ``generate``."""
    row: dict[str, Any] = {"decoder": case.label, "settings": case.settings, "status": "exact", "batch_1": None,
                           "batch_n": None, "tokens_per_forward": None, "first_difference": None, "detail": None}
    try:
        with case.setup(model, tokenizer) as (extra, decode_with):
            engine = Engine(model, decode_with)
            ids = [p.tokens for p in prompts]
            for key, layouts in (("batch_1", [[i] for i in range(len(ids))]), ("batch_n", [list(range(len(ids)))])):
                # [prompt indices] per generate call: each prompt alone, then all of them as one padded batch
                score, got, want = TaskScore(), [], []
                for rows in layouts:
                    batch = [ids[i] for i in rows]
                    reference = engine.generate(batch, REFERENCE, max_new_tokens).sequences
                    try:
                        out = engine.generate(batch, case.decoder, max_new_tokens, **case.settings, **extra)
                    except DecoderError as err:  # a setting the model cannot use: verify, block-causal clean attention
                        raise Unavailable(str(err)) from err
                    score.add(out, reference=reference)
                    got += out.sequences
                    want += reference
                row[key] = bool(score.reproduces_greedy)
                row["tokens_per_forward"] = score.stats.tokens_per_forward  # the padded batch's, set last
                where = first_difference([prompts[i] for rows in layouts for i in rows], got, want, decode_with)
                if where and not row["first_difference"]:
                    row["first_difference"] = f"{'alone' if key == 'batch_1' else 'batched'}: {where}"
    except Unavailable as err:
        row.update(status="unavailable", detail=str(err))
        return row
    except Exception as err:  # a decoder that breaks on this model is a finding, not a crash of the check
        row.update(status="error", detail=f"{type(err).__name__}: {err}")
        return row
    if not (row["batch_1"] and row["batch_n"]):
        row["status"] = "not exact"
    return row


# ----- The pieces the recipes use -----------------------------------------------------------


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _tolerance(model: PreTrainedModel) -> float:
    return 1e-3 if model.dtype == torch.float32 else 3e-2


def probe_two_stream(model: PreTrainedModel, tokens: list[int], results: dict) -> str:
    """A two-stream row [prompt, answer, copy of the answer] whose copy sees the prompt and itself
    causally, at the answer's positions: both streams must give the plain causal forward's logits.
    A model that ignores the 4D mask (the copy would also see the answer) or the position ids fails."""
    p = len(tokens) - 4
    ids = torch.tensor([tokens + tokens[p:]], device=model.device)  # [1, p + 8]
    positions = torch.tensor([list(range(p + 4)) + list(range(p, p + 4))], device=model.device)
    stream = torch.tensor([[CLEAN] * (p + 4) + [NOISY] * 4], device=model.device)
    block = torch.tensor([[-1] * p + [0] * 8], device=model.device)
    rule = StreamRule(noisy_sees_noisy="causal", noisy_sees_clean="prompt")
    # The model is called directly, not through two_stream_forward: separate noisy weights (a piece
    # of their own) would change the copy, and outside that call every token goes through the clean ones.
    mask = layout_attention(model, StreamLayout(ids, positions, stream, block), "dense", rule, error=Unavailable)
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=positions, attention_mask=mask).logits  # [1, p + 8, v]
        causal = model(input_ids=ids[:, : p + 4]).logits  # [1, p + 4, v]
    clean = _relative_difference(logits[:, : p + 4], causal)
    copied = _relative_difference(logits[:, p + 4:], causal[:, p:])
    if max(clean, copied) > _tolerance(model):
        raise Unavailable(f"a dense 4D mask with position ids is not applied as given (clean stream off the causal "
                          f"forward by {clean:.2g}, the copy by {copied:.2g})")
    flex = "yes" if getattr(model, "_supports_flex_attn", False) else "no (train.attention=dense on GPUs too)"
    return f"dense mask exact; FlexAttention for GPU training: {flex}"


def probe_mask_token(model: PreTrainedModel, tokens: list[int], results: dict) -> str:
    if getattr(model.config, "block_diffusion", None):
        return f"has one: token {model.config.block_diffusion['mask_token_id']}"
    embeddings = model.get_input_embeddings()
    if not isinstance(embeddings, nn.Embedding):
        raise Unavailable(f"the input embeddings are a {type(embeddings).__name__}, not an nn.Embedding to add a "
                          "row to")
    return f"nn.Embedding({embeddings.num_embeddings}, {embeddings.embedding_dim}) takes a new row"


def probe_noisy_weights(model: PreTrainedModel, tokens: list[int], results: dict) -> str:
    """What ``split_noisy_weights`` copies (the nn.Linear layers) and what stays shared by both streams."""
    linear = [m for m in model.modules() if type(m) is nn.Linear]  # as split_noisy_weights finds them
    if not any(type(m) is nn.Linear for m in model.get_decoder().modules()):
        raise Unavailable("the decoder layers have no nn.Linear layers to give noisy copies (e.g. GPT-2's Conv1D "
                          "projections): at most the LM head would get one")
    copied = {id(p) for m in linear for p in m.parameters(recurse=False)}
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    shared = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and id(p) not in copied | embeddings)
    total = shared + sum(p.numel() for m in linear for p in m.parameters(recurse=False))
    note = f"; {shared / total:.0%} of the weight matrices are not nn.Linear (e.g. fused experts) and stay shared"
    return f"{len(linear)} nn.Linear layers get noisy copies" + (note if shared else "")


def probe_hidden_states(model: PreTrainedModel, tokens: list[int], results: dict) -> str:
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise Unavailable(f"the LM head is a {type(head).__name__}, not an nn.Linear the heads can start from")
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([tokens], device=model.device), output_hidden_states=True).hidden_states
    size = model.config.get_text_config().hidden_size
    if hidden is None or hidden[-1].shape[-1] != size:
        raise Unavailable(f"the forward returns no final hidden states of the config's hidden_size {size}")
    return f"hidden size {size}; head Linear({head.in_features}, {head.out_features})"


def probe_prefix_layer(model: PreTrainedModel, tokens: list[int], results: dict) -> str:
    try:
        PrefixLayer(model.config)
    except Exception as err:
        raise Unavailable(f"a Llama decoder layer cannot be sized from this config "
                          f"({type(err).__name__}: {err})") from err
    return "a Llama decoder layer sized from the config"


def probe_decoder_layers(model: PreTrainedModel, tokens: list[int], results: dict) -> str:
    """The decoder split after its first layer (``models/early_exit.py``): the first part must give the
    forward's hidden state there, the rest its logits."""
    try:
        layers = decoder_layers(model)
    except ValueError as err:
        raise Unavailable(str(err)) from err
    if len(layers) < 2:
        raise Unavailable("one decoder layer: nothing to split")
    ids = torch.tensor([tokens], device=model.device)
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True)
        exited = first_layers(model, 1, lambda: model(input_ids=ids))
        with later_layers(model, 1, exited):
            logits = model(input_ids=ids).logits
    off = max(_relative_difference(exited, full.hidden_states[1]), _relative_difference(logits, full.logits))
    if off > _tolerance(model):
        raise Unavailable(f"running the layers in two parts is off the whole forward by {off:.2g}")
    return f"{len(layers)} layers in `.layers`, the split after the first is exact"


def probe_fused_loss(model: PreTrainedModel, tokens: list[int], results: dict) -> str:
    try:
        with torch.no_grad():
            final_hidden_states(model, input_ids=torch.tensor([tokens], device=model.device))
    except ValueError as err:
        raise Unavailable(str(err)) from err
    return "logits = last hidden state x head weight"


def probe_lora_targets(model: PreTrainedModel, tokens: list[int], results: dict) -> str:
    """The default ``model.lora.target_modules`` this model has (the trainer adapts the ones present)."""
    default = LoraConfig().target_modules
    # projections peft can adapt: nn.Linear, and GPT-2's Conv1D, whose weight is 2-D too
    present = sorted({name.rsplit(".", 1)[-1] for name, m in model.get_decoder().named_modules()
                      if not isinstance(m, nn.Embedding) and getattr(getattr(m, "weight", None), "ndim", 0) == 2})
    matched = [t for t in default if t in present]
    if not matched:
        raise Unavailable(f"none of the default model.lora.target_modules is a layer here; set it to some of {present}")
    others = [name for name in present if name not in default]
    return f"adapts {', '.join(matched)}" + (f"; not adapted by default: {', '.join(others)}" if others else "")


def probe_jacobi_rollouts(model: PreTrainedModel, tokens: list[int], results: dict) -> str:
    status = results["jacobi"]["status"]
    if status != "exact":
        raise Unavailable(f"the jacobi decoder is {status} on this model (decoders table)")
    return "the jacobi decoder is exact (decoders table)"


def probe_block_diffusion_model(model: PreTrainedModel, tokens: list[int], results: dict) -> str:
    if not getattr(model.config, "block_diffusion", None):
        raise Unavailable("not a block-diffusion model: adapt it with ar2bd first")
    return f"block size {model.config.block_diffusion['block_size']}"


@dataclass(frozen=True)
class Piece:
    name: str
    what: str  # what it is and which recipes use it
    probe: Callable[[PreTrainedModel, list[int], dict], str]  # (model, tokens, decoder rows by label) -> detail


PIECES = {piece.name: piece for piece in (
    Piece("two_stream", "two-stream training attention: a dense 4D mask over a clean and a noisy answer "
          "(ar2bd, jacobi_forcing, dparallel, cd4lm, learn2pd)", probe_two_stream),
    Piece("mask_token", "a mask-token row added to the input embeddings (ar2bd's conversion)", probe_mask_token),
    Piece("noisy_weights", "separate noisy weights: copies of the nn.Linear layers (ar2bd "
          "method.noisy_weights=separate)", probe_noisy_weights),
    Piece("hidden_states", "final hidden states and a linear LM head (draft_heads, acceptance_head)",
          probe_hidden_states),
    Piece("prefix_layer", "Hydra++'s and Clover-2's prefix layer (draft_heads method.variant=hydra_pp or clover2)",
          probe_prefix_layer),
    Piece("decoder_layers", "decoder layers run in two parts: the first n, then the rest on their output (kangaroo)",
          probe_decoder_layers),
    Piece("fused_loss", "logits computable from the last hidden state (train.fused_loss=true)", probe_fused_loss),
    Piece("lora_targets", "LoRA's default target modules (model.lora.r > 0)", probe_lora_targets),
    Piece("jacobi_rollouts", "greedy rollouts through the jacobi decoder (cllm, jacobi_forcing, draft_heads)",
          probe_jacobi_rollouts),
    Piece("block_diffusion_model", "a block-diffusion model to start from (dparallel, cd4lm, learn2pd)",
          probe_block_diffusion_model),
)}

# recipe -> (pieces it needs, pieces only some of its settings need). LoRA and the fused loss are
# switches of the shared trainer, so they are listed once as pieces rather than per recipe.
RECIPE_NEEDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "pretrain": ((), ("fused_loss", "lora_targets")),
    "ar2bd": (("mask_token", "two_stream"), ("noisy_weights", "fused_loss", "lora_targets")),
    "cllm": (("jacobi_rollouts",), ("lora_targets",)),
    "jacobi_forcing": (("jacobi_rollouts", "two_stream"), ("fused_loss", "lora_targets")),
    "dparallel": (("block_diffusion_model", "two_stream"), ("lora_targets",)),
    "cd4lm": (("block_diffusion_model", "two_stream"), ("lora_targets",)),
    "learn2pd": (("block_diffusion_model", "two_stream"), ()),
    "draft_heads": (("jacobi_rollouts", "hidden_states"), ("prefix_layer", "lora_targets")),
    "eagle3": (("jacobi_rollouts", "hidden_states"), ()),
    "kangaroo": (("jacobi_rollouts", "hidden_states", "decoder_layers"), ()),
    "acceptance_head": (("hidden_states",), ()),
}


def check_pieces(model: PreTrainedModel, tokens: list[int], results: dict) -> list[dict[str, Any]]:
    rows = []
    for piece in PIECES.values():
        try:
            rows.append({"piece": piece.name, "has": True, "detail": piece.probe(model, tokens, results)})
        except Unavailable as err:
            rows.append({"piece": piece.name, "has": False, "detail": str(err)})
        rows[-1]["what"] = piece.what
    return rows


def recipe_rows(pieces: list[dict[str, Any]]) -> list[dict[str, Any]]:
    has = {row["piece"]: row["has"] for row in pieces}
    rows = []
    for recipe in RECIPE_MODULES:
        needs, options = RECIPE_NEEDS[recipe]
        missing = [name for name in needs if not has[name]]
        ar2bd_can = all(has[name] for name in RECIPE_NEEDS["ar2bd"][0])
        if not missing:
            verdict = "yes"
        elif missing == ["block_diffusion_model"] and ar2bd_can:
            verdict = "after ar2bd"
        else:
            verdict = "no"
        rows.append({"recipe": recipe, "can_train": verdict, "needs": ", ".join(needs) or "-",
                     "missing": ", ".join(missing) or "-",
                     "settings_unavailable": ", ".join(name for name in options if not has[name]) or "-"})
    return rows


# ----- The command ----------------------------------------------------------------------------


def default_prompts(tokenizer: PreTrainedTokenizerBase, n: int) -> list[UserPrompt]:
    chat = bool(getattr(tokenizer, "chat_template", None))
    return [UserPrompt(i + 1, prompt_ids(tokenizer, [{"role": "user", "content": text}]) if chat
                       else plain_prompt_ids(tokenizer, text)) for i, text in enumerate(DEFAULT_PROMPTS[:n])]


def run_check(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[UserPrompt],
              max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, model_name: str = "model") -> dict[str, Any]:
    """The report: decoder rows (:data:`CASES`), piece rows (:data:`PIECES`) and recipe rows; ``exact``
    is False when a decoder is not exact or fails. The model ends converted to block diffusion."""
    # The probes' row: a prompt and a 4-token answer, from the prompts' tokens (repeated if they are fewer).
    probe_tokens = ([t for p in prompts for t in p.tokens] * 12)[:12]
    converting = [case for case in CASES if case.setup is block_diffusion_model]
    # On a real model each case decodes the prompts twice and generate twice: minutes, so a bar with an ETA.
    bar = tqdm(total=len(CASES), desc="check", unit="decoder")

    def check(case: Case) -> dict[str, Any]:
        bar.set_postfix_str(case.label)
        row = check_case(model, tokenizer, case, prompts, max_new_tokens)
        bar.update()
        return row

    decoders = [check(case) for case in CASES if case not in converting]
    pieces = check_pieces(model, probe_tokens, {row["decoder"]: row for row in decoders})  # before the conversion
    decoders += [check(case) for case in converting]
    bar.close()
    return {"model": model_name, "transformers": transformers.__version__, "prompts": len(prompts),
            "max_new_tokens": max_new_tokens, "exact": not any(r["status"] in FAILED for r in decoders),
            "decoders": decoders, "pieces": pieces, "recipes": recipe_rows(pieces)}


DECODER_COLUMNS = [("decoder", "decoder"), ("status", "status"), ("batch_1", "batch 1"), ("batch_n", "padded batch"),
                   ("tokens_per_forward", "tokens/forward"), ("first_difference", "first difference"),
                   ("detail", "detail")]
PIECE_COLUMNS = [("piece", "piece"), ("has", "has it"), ("detail", "detail"), ("what", "what for")]
RECIPE_COLUMNS = [("recipe", "recipe"), ("can_train", "can train"), ("needs", "needs"), ("missing", "missing"),
                  ("settings_unavailable", "settings it cannot use")]


def render(report: dict[str, Any]) -> str:
    return (f"leaplm check {report['model']}: {report['prompts']} prompts, {report['max_new_tokens']} new tokens, "
            f"one at a time and as one left-padded batch, against generate (transformers "
            f"{report['transformers']})\n\n{format_table(report['decoders'], DECODER_COLUMNS)}\n\n"
            f"{format_table(report['pieces'], PIECE_COLUMNS)}\n\n{format_table(report['recipes'], RECIPE_COLUMNS)}\n\n"
            + ("every lossless decoder is exact" if report["exact"] else
               "NOT EXACT: " + ", ".join(r["decoder"] for r in report["decoders"] if r["status"] in FAILED)))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model directory, a Hub id, a .gguf file, or tiny-teacher")
    p.add_argument("--prompts", metavar="FILE.jsonl", help='your prompts, one JSON object a line: {"prompt": "..."}, '
                   '{"messages": [...]} or {"text": "..."} (docs/decoders.md); default: a few generic ones')
    p.add_argument("--n", type=int, default=DEFAULT_N, help="prompts to decode (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help="new tokens per prompt (default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--out", help="also write DIR/check.json")


def run_command(args: argparse.Namespace) -> None:
    try:
        model, tokenizer = load_for_eval(args.model, dtype=args.dtype)
    except UnsupportedModelError as err:
        sys.exit(f"leaplm check: {args.model} cannot be decoded by leaplm: {err}")
    engine = Engine(model, tokenizer)
    prompts = (read_prompts(args.prompts, tokenizer, args.n, prompt_room(engine, args.max_new_tokens)) if args.prompts
               else default_prompts(tokenizer, args.n))
    report = run_check(model, tokenizer, prompts, args.max_new_tokens, args.model)
    print(render(report))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "check.json").write_text(json.dumps(report, indent=2))
        print(f"wrote {out / 'check.json'}")
    if not report["exact"]:
        sys.exit(1)
