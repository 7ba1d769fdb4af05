"""``leaplm.ship.load(DIR)``: an exported model with the fast decoder it was trained for.

``leaplm export`` (ship/export.py) writes the decoder's name and settings into the ``leaplm``
section of config.json; :func:`load` reads them back, applies a LoRA adapter kept beside the
base weights, and returns a :class:`FastDecoder` that decodes through the one engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from leaplm.data.sft import prompt_ids
from leaplm.inference.engine import DecoderError, Engine, GenerationOutput, check_decoder_settings
from leaplm.models.zoo import load_model
from leaplm.ship.export import ADAPTER_DIR, LEAPLM_KEY


@dataclass
class FastDecoder:
    model: Any
    tokenizer: Any
    decoder: str
    decoder_settings: dict[str, Any]
    max_new_tokens: int
    section: dict[str, Any]  # the whole `leaplm` section: recipe, block size, heads, ...
    engine: Engine = field(init=False)

    def __post_init__(self) -> None:
        self.engine = Engine(self.model, self.tokenizer)

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids as is; a string as a user turn in the chat template (plain text without one)."""
        if not isinstance(prompt, str):
            return list(prompt)
        if self.tokenizer.chat_template:
            return prompt_ids(self.tokenizer, [{"role": "user", "content": prompt}])
        return self.tokenizer(prompt)["input_ids"]

    def generate(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int | None = None,
                 **decoder_settings: Any) -> GenerationOutput:
        """Decode with the stored decoder; ``decoder_settings`` override the stored ones for this call."""
        return self.engine.generate([self.prompt_ids(p) for p in prompts], self.decoder,
                                    max_new_tokens or self.max_new_tokens, **{**self.decoder_settings, **decoder_settings})


def load(path: str | Path, device: str | None = None, dtype: str = "float32", decoder: str | None = None,
         **decoder_settings: Any) -> FastDecoder:
    """Load a ``leaplm export`` directory (or Hub id) as a :class:`FastDecoder`.

    ``decoder`` and ``decoder_settings`` override the stored ones; with ``decoder`` given, any causal LM
    loads (a model that was not exported by leaplm has no stored settings).
    """
    model, tokenizer = load_model(str(path), dtype, device=device)
    section = getattr(model.config, LEAPLM_KEY, None)
    if not isinstance(section, dict):
        if decoder is None:
            raise DecoderError(f"{path} has no `{LEAPLM_KEY}` section in config.json: it was not written by "
                               "`leaplm export`. Name the decoder (decoder=...), or load it with transformers")
        section = {"decoder": decoder, "decoder_settings": {}, "max_new_tokens": 256}
    name = decoder or section["decoder"]
    stored = section["decoder_settings"] if name == section["decoder"] else {}
    try:
        check_decoder_settings(name, {**stored, **decoder_settings})
    except DecoderError as err:
        raise DecoderError(f"{path} asks for decoder {name!r} with settings {stored}, which this leaplm (exported "
                           f"with {section.get('version', '?')}) does not accept: {err}") from err
    adapter = Path(path) / ADAPTER_DIR
    if adapter.is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return FastDecoder(model.eval(), tokenizer, name, {**stored, **decoder_settings}, section["max_new_tokens"], section)
