"""One typed config system for every leaplm recipe.

Precedence: dataclass defaults < YAML file < dotted command-line overrides
(``train.lr=3e-4 data.max_length=512``). The merged tree is validated once, after merging:
an unknown key is an error that lists the valid keys, a value of the wrong type names the
key and the expected type, and each section's ``__post_init__`` checks the cross-field rules.

Recipe-specific options live in the ``method`` section, validated against the dataclass the
recipe declares (``Recipe.method_config``), so there is still exactly one parser.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says how to fix it."""


# ----- Sections ---------------------------------------------------------------------------

ATTENTION_BACKENDS = ("auto", "flex", "dense")  # train.attention; resolved by models/two_stream.py


@dataclass
class LoraConfig:
    r: int = 0  # 0 = full fine-tuning; > 0 wraps the model with a peft LoRA adapter of this rank
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ConfigError(f"model.lora.r must be >= 0 (0 disables LoRA), got {self.r}")


@dataclass
class ModelConfig:
    # A local directory or Hub id of any AutoModelForCausalLM checkpoint; "tiny-teacher" is the
    # embedded default that ships in leaplm/models/tiny_teacher.
    name_or_path: str = "tiny-teacher"
    # Pretraining from scratch: a transformers config as a dict ({"architecture": "llama",
    # "hidden_size": 256, ...}). When set, the weights are random-initialised and, unless
    # `tokenizer` names one, a byte-level BPE tokenizer is trained on the task corpus.
    init: dict[str, Any] | None = None
    tokenizer: str | None = None  # defaults to name_or_path
    tokenizer_vocab_size: int = 512  # byte-level BPE size when training a tokenizer with `init`
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    # "synth" = the built-in synthetic task suite; "stdlib_code", "stdlib_chat" or "stdlib" (both)
    # = prompts built offline from the Python standard library (data/prompts.py); otherwise a Hub
    # id, a local dataset directory or a .json/.jsonl/.parquet file with prompt/response or chat
    # `messages` columns.
    source: str = "synth"
    tasks: list[str] | None = None  # synthetic task names; None = all
    train_per_task: int = 2000
    test_per_task: int = 100
    seed: int = 0
    split: str = "train"
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"
    max_length: int = 256  # tokens per sample, prompt + response
    overlong: Literal["drop", "truncate", "error"] = "drop"
    # A row that is not valid JSON, lacks its prompt/response (or messages) or holds a non-string
    # there: "error" stops at the first, naming the file, line (or row) and field; "skip" leaves
    # such rows out and logs how many.
    bad_rows: Literal["error", "skip"] = "error"
    # Concatenate whole samples into rows of max_length tokens: no padding waste. Position ids
    # restart per sample, so each sample still attends only to itself (block-diagonal mask).
    packing: bool = False

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise ConfigError(f"data.max_length must be >= 8, got {self.max_length}")


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps
    micro_batch_size: int = 8  # samples per forward on each process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio for cosine/linear
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    max_grad_norm: float = 1.0  # 0 disables clipping
    # Sort samples by length within windows of 32 steps: less padding, but a step then holds
    # samples of similar length, which on task-determined lengths means one task per step; at
    # high lr that made the tiny teacher forget tasks between their turns. Prefer data.packing.
    group_by_length: bool = False
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    save_every: int = 0  # checkpoint every N optimizer steps; 0 = only at the end
    keep_last: int = 2  # checkpoints kept on disk
    resume_from: str | None = None  # "latest", or a checkpoint directory
    # A new run refuses an output_dir that holds an earlier run's metrics or checkpoints (they would
    # mix with its own, and `latest` would pick the old model); true deletes them first.
    overwrite: bool = False
    log_every: int = 10
    torch_threads: int = 0  # 0 = torch's default
    # Attention of the two-stream training forward (block diffusion, Jacobi Forcing): the
    # FlexAttention block mask (flex), the same mask as a dense tensor (dense, the reference), or
    # auto: flex on GPUs, dense on CPU, where FlexAttention has no backward.
    attention: str = "auto"
    # Compute only the supervised positions' logits from the final hidden states, a chunk at a time
    # (losses/linear_cross_entropy.py), never the full [rows, length, vocab] logits (pretrain, ar2bd,
    # jacobi_forcing).
    fused_loss: bool = False

    def __post_init__(self) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(f"train.attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas needs two values, got {self.betas}")
        if self.overwrite and self.resume_from:
            raise ConfigError(f"train.overwrite=true starts the run in output_dir over, train.resume_from="
                              f"{self.resume_from!r} continues one: set only one of them")


@dataclass
class RolloutConfig:
    # How a recipe makes its own training data through the inference engine.
    RENAMED: ClassVar[dict[str, str]] = {"decoder_args": "decoder_settings"}  # old key -> new (see build)
    decoder: str = "ar"
    decoder_settings: dict[str, Any] = field(default_factory=dict)  # settings of `decoder` (answer rollouts)
    max_new_tokens: int = 128
    batch_size: int = 32
    temperature: float = 0.0  # 0 = greedy
    drop_wrong: bool = True  # drop rollouts whose answer fails the task checker
    max_prompts: int = 0  # prompts to roll out (per stage), drawn seeded from the configured data; 0 = all
    # Recipes that train on the final greedy answers alone (draft_heads), which `ar` and greedy `jacobi`
    # write token for token: time both on the first batch's first 32 tokens, log their tokens per forward
    # and speed, and collect everything with the faster. false: always `decoder`.
    pick_faster: bool = True

    def __post_init__(self) -> None:
        if self.max_prompts < 0:
            raise ConfigError(f"rollout.max_prompts must be >= 0 (0 = every prompt of the data), got {self.max_prompts}")


@dataclass
class EvalConfig:
    RENAMED: ClassVar[dict[str, str]] = {"decoder_args": "decoder_settings"}
    tasks: list[str] | None = None  # None = every task of the data source
    n: int = 100  # prompts per task (from the test split)
    # None: the decoder the recipe's models decode with (Recipe.decoder: medusa for Medusa heads, jacobi for
    # CLLM, ...), its settings under decoder_settings; filled in when the run's config loads. Also what the
    # export stores for `leaplm.ship.load`.
    decoder: str | None = None
    decoder_settings: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 160
    batch_size: int = 32
    at_end: bool = False  # evaluate the final model when training ends
    every: int = 0  # also evaluate every N optimizer steps (0 = never)


@dataclass
class ExportConfig:
    dir: str | None = None  # write the final model (safetensors + tokenizer + card) here
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # halve the files; None = the training dtype
    push_to: str | None = None  # Hub repo id to upload the export to (token from HF_TOKEN)
    merge_lora: bool = True  # LoRA runs: merge the adapter into the weights; false = base + adapter/


@dataclass
class LoggingConfig:
    wandb: bool = True  # offline unless WANDB_API_KEY is set
    wandb_project: str = "leaplm"
    progress_bar: bool = True


@dataclass
class Config:
    recipe: str = "pretrain"
    output_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Recipe-specific options, validated against the recipe's own dataclass after merging.
    method: Any = None
    # The command line that built this config, quoted in model cards; not a config key.
    origin: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# ----- Parsing ------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """PyYAML's SafeLoader with YAML 1.2 booleans and floats, for files and overrides alike.

    YAML 1.1 reads ``no``/``yes``/``on``/``off`` as booleans, so ``train.mixed_precision=no`` (a
    documented choice) became ``False``; and it reads ``3e-4`` or ``1e5`` as strings, because its
    floats need a dot and a signed exponent. Only ``true``/``false`` are booleans here, and
    scientific notation is a number.
    """


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003). Values are parsed as YAML scalars."""
    if "=" not in text or text.startswith("-"):
        raise ConfigError(f"override {text!r} is not of the form section.key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    return key.split("."), yaml.load(raw, Loader=_Loader) if raw != "" else None


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: nested dicts merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _refuse_unspaced_keys(mapping: dict, where: str) -> None:
    """Refuse ``{block_size:8}``: YAML's flow syntax needs a space after the colon, so without one
    it reads the key ``"block_size:8"`` with no value, which no check downstream would recognise."""
    for key, value in mapping.items():
        if isinstance(value, dict):
            _refuse_unspaced_keys(value, f"{where}.{key}")
        elif value is None and isinstance(key, str) and re.fullmatch(r"[^:\s]+:\S.*", key):
            name, given = key.split(":", 1)
            raise ConfigError(
                f"{where}: YAML reads {{{key}}} as the key {key!r} with no value; write `{{{name}: {given}}}` "
                "with a space after the colon"
            )


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (allowing int -> float), or raise."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _refuse_unspaced_keys(value, where)
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}")
        return build(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def build(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys with the list of valid ones.

    A section's ``RENAMED`` (old key -> new key) turns an old key in a user's YAML into an error
    naming its new name, rather than a bare "unknown key".
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        renamed = getattr(cls, "RENAMED", {}).get(unknown[0])
        if renamed:
            raise ConfigError(f"config key {prefix + unknown[0]!r} was renamed to {prefix + renamed!r}")
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}; valid keys{' in ' + where if where else ''}: "
            f"{', '.join(names) or '(none)'}"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def parse_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults < YAML < overrides, validated after merging; ``method`` left a plain mapping.

    A run's config is loaded by ``leaplm.train.recipes.load_config``, which builds ``method`` as the
    recipe's dataclass and checks the decoders' settings.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.load(path.read_text(), Loader=_Loader) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded
    for text in overrides:
        keys, value = parse_override(text)
        update: dict[str, Any] = {keys[-1]: value}
        for k in reversed(keys[:-1]):
            update = {k: update}
        tree = merge(tree, update)
    config = build(Config, tree)
    if path is not None:
        config.origin = "leaplm train " + shlex.join([str(path), *overrides])
    return config
