"""Write a trained model in the Hub layout, and push it to the Hub.

Layout of an export directory (``leaplm export RUN_OR_CHECKPOINT --out DIR`` or ``export.dir``):

  model.safetensors, config.json   the weights, loadable with plain transformers; config.json has a
                                   ``leaplm`` section (:func:`leaplm_section`) that
                                   ``leaplm.ship.load(DIR)`` restores the fast decoder from
  generation_config.json           greedy, the stop tokens, the eval's max_new_tokens
  tokenizer files
  adapter/                         a LoRA run exported without merging: the peft adapter; the
                                   weights beside it are then the base model's
  files a recipe adds              e.g. draft heads or ar2bd's separate noisy weights, listed in ``leaplm.files``
  leaplm_config.yaml               the training config
  eval.json / bench.*              the numbers (and bench.png, the speed/quality plot) of the card
  README.md                        the model card (:data:`CARD_TEMPLATE`)

An export is written whole into a temporary sibling (``.DIR.tmp-PID``), verified, and swapped in
for DIR, so DIR always holds exactly one export: no file of an earlier export survives to be
loaded with the new one, and a failed export leaves the earlier one as it was.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shlex
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Sequence

import jinja2

import leaplm
from leaplm.data.sft import load_source, task_names, to_messages
from leaplm.data.tasks import make_split
from leaplm.inference.engine import check_decoder_settings, default_stop_ids
from leaplm.models.addons import save_addons
from leaplm.models.heads import HEADS_ATTR
from leaplm.models.zoo import DTYPES
from leaplm.ship import checkpoint as ckpt

LEAPLM_KEY = "leaplm"  # the section of config.json that holds the decoder and recipe settings
ADAPTER_DIR = "adapter"
RUN_CONFIG = "leaplm_config.yaml"  # written into every export, by every leaplm version: what marks one
# What a training run or a checkpoint holds and an export never does: such a directory is not replaced.
RUN_MARKERS = ("checkpoints", "trainer_state.json", "state")
CARD_LIBRARIES = ("leaplm", "torch", "transformers", "accelerate", "peft", "safetensors")
# The card's example prompt for a run whose data has no prompt to show.
NEUTRAL_PROMPT = "Explain in two sentences what a hash table is."


class ExportError(RuntimeError):
    """An export or push that cannot be done; the message says what to change."""


CARD_TEMPLATE = jinja2.Template(
    """---
library_name: transformers
{% if base_id %}base_model: {{ base_id }}
{% endif %}tags:
{% for tag in tags %}- {{ tag }}
{% endfor %}---
# {{ name }}

Trained with [leaplm](https://github.com/leaplm/leaplm) recipe `{{ recipe }}`; decodes fastest with
the `{{ decoder }}` decoder{% if settings %} (`{{ settings }}`){% endif %}.

```python
# plain transformers (autoregressive decoding)
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{{ name }}")
tokenizer = AutoTokenizer.from_pretrained("{{ name }}")

# leaplm: the {{ decoder }} decoder with the settings stored in config.json
import leaplm.ship
decoder = leaplm.ship.load("{{ name }}")
print(decoder.generate([{{ prompt }}]).texts)
```
{% if adapter %}
The weights here are the base model's; the LoRA adapter is in `adapter/` (peft).
`leaplm.ship.load` applies it; with transformers and peft installed, `model.load_adapter("{{ name }}/adapter")` does too.
{% endif %}
## Model
- base: {{ base }}
- architecture: `{{ architecture }}`, {{ n_params }} parameters, vocabulary {{ vocab_size }}
- leaplm settings (`config.json` → `leaplm`): `{{ section }}`

## Training
- recipe: `{{ recipe }}`
- data: `{{ data_source }}`{% if tasks %} (tasks: {{ tasks }}){% endif %}{% if samples %}, {{ samples }} training samples{% endif %}
{% if trained %}- trained: {{ trained }}
{% endif %}- steps: {{ steps }}, effective batch {{ batch }}, lr {{ lr }} ({{ schedule }}, warmup {{ warmup }}){% if lora %}, LoRA rank {{ lora }}{% endif %}
- precision: {{ precision }}
- reproduce: `{{ command }}`

## Evaluation
{% if rows %}Greedy decoding on the held-out test split of each task. Speedup is tokens/s over Hugging Face
`generate` (autoregressive, KV cache) on the same prompts in the same process{% if not has_speedup %}; this
export has no bench, so it is not given (`leaplm export ... --bench-n 20` measures it){% endif %}.

| decoder | task | n | accuracy | tokens/forward | speedup over AR |
|---|---|---|---|---|---|
{% for r in rows %}| {{ r.label }} | {{ r.task }} | {{ r.n }} | {{ "%.1f" % (100 * r.accuracy) }}% | {{ "%.2f" % r.tokens_per_forward }} | {{ r.speedup }} |
{% endfor %}{% if plot %}
![accuracy against speedup]({{ plot }})
{% endif %}{% else %}Not measured: the run did not evaluate this checkpoint, nor did its export bench it. Measure accuracy
and speed on your own prompts with `leaplm bench {{ name }} --prompts FILE`.
{% endif %}
## Library versions
{% for name, v in versions %}- {{ name }} {{ v }}
{% endfor %}- python {{ python }}
"""
)


def library_versions() -> list[tuple[str, str]]:
    out = []
    for name in CARD_LIBRARIES:
        try:
            out.append((name, version(name)))
        except PackageNotFoundError:  # leaplm run from a checkout rather than installed
            out.append((name, getattr(leaplm, "__version__", "?") if name == "leaplm" else "not installed"))
    return out


# (cfg, model, out_dir) -> a recipe's own entries of the `leaplm` section (Recipe.export_settings)
ExportSettings = Callable[[Any, Any, Path], dict[str, Any]]


def leaplm_section(cfg, model, out_dir: Path, export_settings: ExportSettings | None = None) -> dict[str, Any]:
    """The ``leaplm`` section of config.json: recipe, decoder and its settings, plus what the recipe adds.

    A recipe's ``export_settings(cfg, model, out_dir)`` hook returns its own entries (block size,
    heads) and may write extra files under ``out_dir``, which it lists under ``"files"``.
    """
    if cfg.eval.decoder is None:
        raise ExportError("the config's eval.decoder is unset: load it with leaplm.train.recipes.load_config, which "
                          "sets it to the recipe's decoder, or name one")
    section: dict[str, Any] = {
        "version": leaplm.__version__,
        "recipe": cfg.recipe,
        "decoder": cfg.eval.decoder,
        "decoder_settings": dict(cfg.eval.decoder_settings),
        "max_new_tokens": cfg.eval.max_new_tokens,
        "files": [],
    }
    if export_settings is not None:
        section.update(export_settings(cfg, model, out_dir))
    check_decoder_settings(section["decoder"], section["decoder_settings"])  # a recipe's own choice included
    return section


def trained_parts(model, lora_rank: int = 0) -> str:
    """What a run trains, in words for the card, from which of ``model``'s parameters require grad:
    "all weights", or the trained parts (LoRA adapter, draft heads, noisy copies), the rest frozen."""
    params = dict(model.named_parameters())
    trained = {name for name, p in params.items() if p.requires_grad}
    if trained == set(params):
        return "all weights"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    heads = getattr(base, HEADS_ATTR, None)
    parts = []
    if lora_rank:
        parts.append(f"a rank-{lora_rank} LoRA adapter")
    if heads is not None and any(p.requires_grad for p in heads.parameters()):
        c = heads.config
        parts.append("an acceptance head" if c.kind == "acceptance" else
                     f"{c.num_heads} {c.kind.capitalize()} heads" + (" over a prefix layer" if c.prefix_layer else ""))
    if any(name.endswith(".noisy_weight") for name in trained):
        parts.append("the noisy-stream copies of the linear layers")
    share = sum(params[n].numel() for n in trained) / sum(p.numel() for p in params.values())
    return f"{', '.join(parts) or 'part of the weights'} ({100 * share:.2g}% of the parameters), base frozen"


def card_prompt(data) -> str:
    """The card's example prompt: a test prompt of the first synthetic task the run trained on, or the
    first short user turn of its own data; :data:`NEUTRAL_PROMPT` when the data has none here."""
    if data.source == "synth":
        return make_split(task_names(data)[0], "test", 1, data.seed)[0].prompt
    try:
        ds = load_source(data, require_response=False)
    except (OSError, ValueError):  # e.g. a Hub dataset this machine cannot reach: the card still gets written
        return NEUTRAL_PROMPT
    for row in ds.select(range(min(len(ds), 50))):
        users = [m["content"] for m in to_messages(row, data) if m["role"] == "user"]
        if users and len(users[-1]) <= 300:  # a prompt that reads well in a code example
            return users[-1]
    return NEUTRAL_PROMPT


def _card_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in sorted(r["decoder_settings"].items()))
        speedup = r.get("speedup_vs_generate")
        out.append({**r, "label": f"{r['decoder']}" + (f" ({settings})" if settings else ""),
                    "speedup": "-" if speedup is None else f"{speedup:.2f}x"})
    return out


def render_card(model, cfg, rows: list[dict[str, Any]], command: str, section: dict[str, Any], name: str, *,
                plot: str | None = None, adapter: bool = False, steps: int | None = None, samples: int | None = None,
                trained: str | None = None) -> str:
    """The model card. ``steps``: the optimizer steps the exported weights had (default train.max_steps);
    ``samples``: the run's training samples; ``trained``: what it trained (:func:`trained_parts`)."""
    t = cfg.train
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    from_scratch = cfg.model.init is not None
    base = "random initialisation (pretrained from scratch)" if from_scratch else f"`{cfg.model.name_or_path}`"
    return CARD_TEMPLATE.render(
        name=name,
        recipe=cfg.recipe,
        decoder=section["decoder"],
        settings=json.dumps(section["decoder_settings"]) if section["decoder_settings"] else "",
        section=json.dumps(section, sort_keys=True),
        tags=["leaplm", cfg.recipe, section["decoder"], "parallel-decoding"],
        # Only Hub ids go in the card's metadata: a local path means nothing on the Hub.
        base_id=None if from_scratch or Path(cfg.model.name_or_path).exists() or "/" not in cfg.model.name_or_path
        else cfg.model.name_or_path,
        base=base,
        architecture=base_model.config.model_type,
        n_params=f"{sum(p.numel() for p in base_model.parameters()) / 1e6:.2f}M",
        vocab_size=base_model.config.vocab_size,
        data_source=cfg.data.source,
        tasks=", ".join(cfg.data.tasks or []) or None,
        samples=samples,
        trained=trained,
        prompt=json.dumps(card_prompt(cfg.data)),
        steps=t.max_steps if steps is None else steps,
        batch=(f"{t.micro_batch_size * t.grad_accum} packed rows of {cfg.data.max_length} tokens" if cfg.data.packing
               else f"{t.micro_batch_size * t.grad_accum} samples") + " per process",
        lr=t.lr,
        schedule=t.lr_schedule,
        warmup=t.warmup_steps,
        lora=cfg.model.lora.r,
        precision=f"{t.mixed_precision} mixed precision" if t.mixed_precision != "no" else cfg.model.dtype,
        command=command,
        rows=_card_rows(rows),
        has_speedup=any(r.get("speedup_vs_generate") is not None for r in rows),
        plot=plot,
        adapter=adapter,
        versions=library_versions(),
        python=platform.python_version(),
    )


def _write_generation_config(model, tokenizer, cfg, out: Path) -> None:
    """Greedy decoding that stops where the engine stops, so `generate` and leaplm agree by default."""

    generation = copy.deepcopy(model.generation_config)
    stops = list(dict.fromkeys(default_stop_ids(model, tokenizer)))
    generation.eos_token_id = stops[0] if len(stops) == 1 else stops
    generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    generation.do_sample = False
    generation.max_new_tokens = cfg.eval.max_new_tokens
    generation.save_pretrained(out)


def looks_like_export(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``leaplm export`` (and not a run or checkpoint)."""
    return ((path / "config.json").is_file() and (path / RUN_CONFIG).is_file()
            and not any((path / marker).exists() for marker in RUN_MARKERS))


def check_replaceable(out: Path, keep: list[Path], ours: Callable[[Path], bool] | None = None,
                      kind: str = "") -> None:
    """Refuse an ``out`` whose replacement would delete anything but an earlier export (one ``ours``
    recognises, ``kind`` in the message; by default a leaplm export)."""
    where = "pass another --out (or export.dir in a training config)"
    target = out.resolve()
    for path in keep:
        if target == path.resolve() or target in path.resolve().parents:
            raise ExportError(f"{out} is or holds {path}, which this export reads, and an export replaces its "
                              f"directory whole; {where}")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out} is a file, not an export directory; {where}")
    kind = kind or f"a leaplm export (one has config.json and {RUN_CONFIG}, and no {' or '.join(RUN_MARKERS)})"
    if any(out.iterdir()) and not (ours or looks_like_export)(out):
        raise ExportError(f"{out} is not empty and not {kind}; an export replaces its directory whole, so {where}, "
                          f"or empty {out} yourself")


def verify_export(path: Path) -> None:
    """Raise :class:`ExportError` unless ``path`` holds a whole export that loads.

    Checked: config.json with its ``leaplm`` section, the weights, every file the section lists,
    the adapter's config when there is an adapter, and that every safetensors file opens (its
    header covers the file, so a short write shows).
    """
    from safetensors import SafetensorError, safe_open

    def fail(what: str) -> ExportError:
        return ExportError(f"the export written to {path} is not whole: {what}. Nothing was replaced; "
                           "rerun the export (check free disk space)")

    try:
        section = json.loads((path / "config.json").read_text())[LEAPLM_KEY]
    except (OSError, ValueError, KeyError) as err:
        raise fail(f"config.json has no readable `{LEAPLM_KEY}` section ({type(err).__name__}: {err})") from err
    weights = ["model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():  # a model too large for one file: the shards its index names
        weights = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (path / ADAPTER_DIR).is_dir():
        weights.append(f"{ADAPTER_DIR}/adapter_config.json")
    missing = [name for name in weights + section["files"] if not (path / name).is_file()]
    if missing:
        raise fail(f"missing {', '.join(missing)}")
    for file in sorted(path.rglob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as opened:
                opened.keys()
        except (SafetensorError, OSError) as err:
            raise fail(f"{file.relative_to(path)} does not open ({err})") from err


@contextmanager
def replacing(out: Path, keep: list[Path], verify: Callable[[Path], None] = verify_export,
              ours: Callable[[Path], bool] | None = None, kind: str = "") -> Iterator[Path]:
    """A temporary sibling of ``out`` to write an export into; checked by ``verify``, then swapped in
    for ``out`` whole (an ``out`` that is not empty must be an earlier export: :func:`check_replaceable`).

    ``keep``: paths the export reads from, which must survive the replacement. The swap is two
    renames on one filesystem (old away, new in), so a crash before it leaves the earlier export
    under ``out``, and whatever fails removes the temporary directory. Only a kill leaves a
    ``.OUT.tmp-PID`` sibling behind, which can be deleted.
    """
    check_replaceable(out, keep, ours, kind)
    target = out.resolve()  # through a symlink: replace the directory it points to, keep the link
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    for leftover in (tmp, old):  # left by a killed process whose pid this one reuses
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        verify(tmp)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


# (model, tokenizer, cfg, directory) -> bench rows: measures the model and writes bench.json/.md/.png there
Bench = Callable[[Any, Any, Any, Path], list[dict[str, Any]]]


def export_model(model, tokenizer, cfg, out_dir: str | Path, rows: list[dict[str, Any]] | None = None,
                 command: str | None = None, *, export_settings: ExportSettings | None = None,
                 merge_lora: bool | None = None, bench: Bench | None = None, name: str | None = None,
                 keep: Sequence[Path] = (), steps: int | None = None, samples: int | None = None,
                 trained: str | None = None) -> Path:
    """Write ``model`` (plain or peft LoRA) with its tokenizer, settings and card to ``out_dir``.

    ``out_dir`` is replaced whole (it must be new, empty or an earlier export, and may not hold
    ``cfg.output_dir`` nor any of ``keep``; see :func:`replacing`). ``export_settings``: the
    recipe's hook (``Recipe.export_settings``). ``merge_lora`` (default ``cfg.export.merge_lora``):
    merge a LoRA adapter into standalone weights, or keep the base weights and write the adapter to
    ``adapter/``. ``bench``: measure the model into the export, whose rows and plot the card then
    shows instead of ``rows``. ``name`` is what the card's code loads (default: ``export.push_to``,
    else the directory's name). ``steps``: the optimizer steps the weights had, for the card (default
    ``train.max_steps``: a checkpoint taken earlier, or a preempted run, says its own); ``samples``
    and ``trained``: the run's training samples and what it trained (:func:`trained_parts`), for the
    card, which leaves out what is not given.
    """
    out = Path(out_dir)
    with replacing(out, [Path(cfg.output_dir), *keep]) as tmp:
        plot = None
        if bench is not None:
            rows, plot = bench(model, tokenizer, cfg, tmp), "bench.png"
        _write_export(model, tokenizer, cfg, tmp, rows, command, export_settings, merge_lora=merge_lora, plot=plot,
                      name=name or cfg.export.push_to or out.name, steps=steps, samples=samples, trained=trained)
    return out


def _write_export(model, tokenizer, cfg, out: Path, rows: list[dict[str, Any]] | None, command: str | None,
                  export_settings: ExportSettings | None, *, merge_lora: bool | None, plot: str | None,
                  name: str, steps: int | None, samples: int | None, trained: str | None) -> None:
    """Write the export's files into ``out``, a fresh directory that :func:`replacing` swaps in."""
    merge_lora = cfg.export.merge_lora if merge_lora is None else merge_lora
    adapter = hasattr(model, "merge_and_unload") and not merge_lora
    if adapter:
        model.save_pretrained(out / ADAPTER_DIR)
        # The hook and the card read the adapter-wrapped model; the weights saved are the base's.
        weights = copy.deepcopy(model).unload()
    elif hasattr(model, "merge_and_unload"):
        # A merged LoRA run is a standalone model: plain `from_pretrained` loads it without peft.
        model = weights = copy.deepcopy(model).merge_and_unload()
    else:
        weights = model
    dtype = None if cfg.export.dtype is None else DTYPES[cfg.export.dtype]
    if dtype is None:
        weights.save_pretrained(out, safe_serialization=True)
    else:  # cast a copy of the weights, not the live model, and say so in config.json
        weights.save_pretrained(out, safe_serialization=True,
                                state_dict={name: tensor.to(dtype) for name, tensor in weights.state_dict().items()})
        config = copy.deepcopy(weights.config)
        config.dtype = dtype
        config.save_pretrained(out)
    if weights.can_generate():  # not, e.g., Learn2PD's unmask filter
        _write_generation_config(weights, tokenizer, cfg, out)
    # draft heads and separate noisy weights go beside the base, in their own files
    side_files = save_addons(model, out, dtype)
    tokenizer.save_pretrained(out)
    section = leaplm_section(cfg, model, out, export_settings)
    section["files"] += side_files
    config_file = out / "config.json"
    config_json = json.loads(config_file.read_text())
    config_json[LEAPLM_KEY] = section
    config_file.write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    cfg.save(out / RUN_CONFIG)
    if rows:
        (out / "eval.json").write_text(json.dumps(rows, indent=2))
    command = command or cfg.origin or f"leaplm train <config> (recipe {cfg.recipe})"
    (out / "README.md").write_text(render_card(model, cfg, rows or [], command, section, name, plot=plot, steps=steps,
                                               samples=samples, trained=trained, adapter=adapter))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def push(out_dir: str | Path, repo_id: str) -> str:
    """Upload an export directory to the Hub repo ``repo_id`` (created if needed); returns its URL.

    The token comes from the environment (``HF_TOKEN``). Nothing local is removed, whatever happens.
    """
    out = Path(out_dir)
    retry = shlex.join(["leaplm", "export", str(out), "--push", repo_id])
    keep = f"The export in {out} is kept; push it later with `{retry}`."
    if not (out / "config.json").is_file():
        raise ExportError(f"{out} is not an export directory (no config.json); run `leaplm export` first")
    if _truthy("HF_HUB_OFFLINE"):
        raise ExportError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set (offline mode). Unset it. {keep}")
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        raise ExportError(f"cannot push to {repo_id}: no Hub token. Set HF_TOKEN to a write token "
                          f"(https://huggingface.co/settings/tokens). {keep}")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, exist_ok=True)
        commit = api.upload_folder(folder_path=str(out), repo_id=repo_id, commit_message="Upload leaplm export")
    except Exception as err:  # network, auth and permission errors all come here; the message says which
        raise ExportError(f"push to {repo_id} failed: {type(err).__name__}: {err}. {keep}") from err
    return str(getattr(commit, "commit_url", f"https://huggingface.co/{repo_id}"))


def find_checkpoint(source: str | Path) -> Path:
    """A checkpoint directory as given, or the newest finished one of a run directory; validated."""
    source = Path(source)
    if (source / ckpt.STATE_FILE).is_file() or (source / "state").is_dir():
        path = source
    else:
        # A recipe run in stages (Recipe.stages, e.g. jacobi_forcing's method.stages) trains stage k
        # in OUTPUT_DIR/stage_k: its model is the last stage's.
        stages = {int(p.name[len("stage_"):]): p for p in source.glob("stage_*") if p.name[len("stage_"):].isdigit()}
        if stages and not ckpt.list_checkpoints(source):
            source = stages[max(stages)]
        found = ckpt.list_checkpoints(source)
        if not found:
            raise ExportError(f"{source} is neither a checkpoint (with {ckpt.STATE_FILE}) nor a run directory "
                              "with finished checkpoints under checkpoints/; pass the output_dir of a training run")
        path = found[-1]
    ckpt.validate(path)
    return path
