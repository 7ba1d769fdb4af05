"""Write a trained model in the Hub layout: safetensors, config, tokenizer and a model card
(and draft heads, when the model carries them, beside it: ``models/draft_heads.py``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jinja2

import leaplm
from leaplm.models.draft_heads import HEADS_ATTR, save_heads
from leaplm.models.zoo import DTYPES

CARD_TEMPLATE = jinja2.Template(
    """---
library_name: transformers
tags:
- leaplm
- {{ recipe }}
---
# {{ name }}

Trained with [leaplm](https://github.com/leaplm/leaplm) recipe `{{ recipe }}`
(leaplm {{ version }}). Loads with plain transformers:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{{ name }}")
tokenizer = AutoTokenizer.from_pretrained("{{ name }}")
```

## Model
- architecture: `{{ architecture }}`, {{ n_params }} parameters, vocabulary {{ vocab_size }}
- base: {{ base }}

## Training
- data: `{{ data_source }}`{% if tasks %} (tasks: {{ tasks }}){% endif %}
- steps: {{ steps }}, effective batch {{ batch }}, lr {{ lr }} ({{ schedule }})
- reproduce: `{{ command }}`

{% if rows %}## Evaluation
Greedy decoding with the `{{ rows[0].decoder }}` decoder on the held-out test split.

| task | n | accuracy | tokens/forward | tokens/s |
|---|---|---|---|---|
{% for r in rows %}| {{ r.task }} | {{ r.n }} | {{ "%.1f" % (100 * r.accuracy) }}% | {{ "%.2f" % r.tokens_per_forward }} | {{ "%.0f" % r.tokens_per_s }} |
{% endfor %}{% endif %}"""
)


def render_card(model, cfg, rows: list[dict[str, Any]], command: str) -> str:
    t = cfg.train
    return CARD_TEMPLATE.render(
        name=Path(cfg.export.dir or cfg.output_dir).name,
        recipe=cfg.recipe,
        version=leaplm.__version__,
        architecture=model.config.model_type,
        n_params=f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M",
        vocab_size=model.config.vocab_size,
        base=cfg.model.name_or_path if cfg.model.init is None else "random initialisation (pretrained from scratch)",
        data_source=cfg.data.source,
        tasks=", ".join(cfg.data.tasks or []) or None,
        steps=t.max_steps,
        batch=(f"{t.micro_batch_size * t.grad_accum} packed rows of {cfg.data.max_length} tokens" if cfg.data.packing
               else f"{t.micro_batch_size * t.grad_accum} samples"),
        lr=t.lr,
        schedule=t.lr_schedule,
        command=command,
        rows=rows,
    )


def export_model(model, tokenizer, cfg, out_dir: str | Path, rows: list[dict[str, Any]] | None = None,
                 command: str | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        # A LoRA run exports a standalone model (adapter merged into the weights), so plain
        # `from_pretrained` loads it without peft or the base checkpoint.
        model = model.merge_and_unload()
    if cfg.export.dtype is None:
        model.save_pretrained(out, safe_serialization=True)
    else:  # cast a copy of the weights, not the live model, and say so in config.json
        dtype = DTYPES[cfg.export.dtype]
        model.save_pretrained(out, safe_serialization=True,
                              state_dict={name: tensor.to(dtype) for name, tensor in model.state_dict().items()})
        config = copy.deepcopy(model.config)
        config.dtype = dtype
        config.save_pretrained(out)
    heads = getattr(model, HEADS_ATTR, None)
    if heads is not None:  # draft heads go beside the base, in their own files
        save_heads(heads, out)
    tokenizer.save_pretrained(out)
    cfg.save(out / "leaplm_config.yaml")
    if rows:
        (out / "eval.json").write_text(json.dumps(rows, indent=2))
    command = command or cfg.origin or f"leaplm train <config> (recipe {cfg.recipe})"
    (out / "README.md").write_text(render_card(model, cfg, rows or [], command))
    return out
