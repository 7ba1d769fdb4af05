"""Export a training run: find its checkpoint, rebuild the model its recipe trained, and write it in
the Hub layout with the recipe's own settings (``ship/export.py``). The ``leaplm export`` command."""

from __future__ import annotations

import json
from pathlib import Path

from leaplm.models.addons import attach_addons
from leaplm.models.unmask_filter import UnmaskFilter, UnmaskFilterConfig
from leaplm.models.zoo import load_model, load_tokenizer
from leaplm.ship import checkpoint as ckpt
from leaplm.ship.export import Bench, check_replaceable, export_model, find_checkpoint
from leaplm.train.recipes import get_recipe, load_config


def load_checkpoint(path: Path):
    """(model, tokenizer, cfg) of a checkpoint; a LoRA checkpoint comes back as the peft model.

    A checkpoint of the trained parts (``ship/checkpoint.py``) is applied to the recipe's model rebuilt
    from ``model.name_or_path``, whose frozen weights must be the recorded ones.
    """
    cfg = load_config(path / "config.yaml")
    model_dir = path / "model"
    base_file = path / ckpt.BASE_FILE
    if (model_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        base, _ = get_recipe(cfg.recipe).build_model(cfg)  # the recipe's base: conversions (mask token) included
        model, tokenizer = PeftModel.from_pretrained(base, model_dir), load_tokenizer(str(model_dir))
        attach_addons(model.get_base_model(), model_dir)  # heads trained in full sit beside the adapter
        if base_file.is_file():
            ckpt.check_base(model, json.loads(base_file.read_text()), path)
    elif (model_dir / ckpt.TRAINED_FILE).is_file():
        from safetensors.torch import load_file

        model, _ = get_recipe(cfg.recipe).build_model(cfg)
        record = json.loads(base_file.read_text())
        ckpt.check_base(model, record, path)
        trained = load_file(str(model_dir / ckpt.TRAINED_FILE))
        missing, unexpected = model.load_state_dict(trained, strict=False)
        if unexpected or set(missing) != set(record["frozen"]):
            raise ckpt.CheckpointError(
                f"checkpoint {path}: {ckpt.TRAINED_FILE} does not fit the model its recipe builds (unexpected "
                f"{unexpected[:3]}, not restored {sorted(set(missing) - set(record['frozen']))[:3]}); it was written "
                "by another version of the recipe. Export it with that version."
            )
        tokenizer = load_tokenizer(str(model_dir))
    elif json.loads((model_dir / "config.json").read_text()).get("model_type") == UnmaskFilterConfig.model_type:
        # Learn2PD's checkpoint is its filter, not a causal LM
        model, tokenizer = UnmaskFilter.from_pretrained(model_dir), load_tokenizer(str(model_dir))
    else:
        model, tokenizer = load_model(str(model_dir), cfg.model.dtype, cfg.model.attn_implementation)
    return model.eval(), tokenizer, cfg


def export_run(source: str | Path, out_dir: str | Path, merge_lora: bool | None = None, bench: Bench | None = None,
               name: str | None = None) -> Path:
    """Export a run's newest checkpoint (or a given one) with its eval rows, or with ``bench``'s rows."""
    path = find_checkpoint(source)
    check_replaceable(Path(out_dir), [path])  # before the model loads and a bench runs, so a refusal costs nothing
    model, tokenizer, cfg = load_checkpoint(path)
    state = json.loads((path / ckpt.STATE_FILE).read_text())
    step = state["step"]
    eval_file = path.parent.parent / f"eval-step-{step:06d}.json"
    rows = json.loads(eval_file.read_text()) if eval_file.is_file() else []
    return export_model(model, tokenizer, cfg, out_dir, rows, cfg.origin,
                        export_settings=get_recipe(cfg.recipe).export_settings, merge_lora=merge_lora, bench=bench,
                        name=name, keep=[path], steps=step, samples=state.get("samples"),
                        trained=state.get("trained"))  # absent from checkpoints of earlier leaplm versions
