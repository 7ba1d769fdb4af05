"""``hf_prompt_lookup``: Hugging Face's training-free prompt lookup decoding, the peer every
``--prompts`` bench runs beside ``hf_generate`` (``bench/decoders.py``)."""

from __future__ import annotations

from numbers import Integral

import torch

from leaplm.inference.cost import record_forwards
from leaplm.inference.engine import DecoderError, DecodeResult, Engine, PromptBatch, register_decoder

PROMPT_LOOKUP = "hf_prompt_lookup"


def _check_prompt_lookup(prompt_lookup_num_tokens: int = 10) -> None:
    if (isinstance(prompt_lookup_num_tokens, bool) or not isinstance(prompt_lookup_num_tokens, Integral)
            or prompt_lookup_num_tokens < 1):
        raise DecoderError("prompt_lookup_num_tokens must be an integer >= 1 (the most tokens copied from the "
                           f"context per step), got {prompt_lookup_num_tokens!r}")


@register_decoder(PROMPT_LOOKUP, checks=(_check_prompt_lookup,))
def hf_prompt_lookup(engine: Engine, batch: PromptBatch, max_new_tokens: int, *,
                     prompt_lookup_num_tokens: int = 10) -> DecodeResult:
    """Hugging Face prompt lookup decoding: ``model.generate(do_sample=False, prompt_lookup_num_tokens=N)``.

    Each step copies up to N tokens that followed an earlier occurrence of the newest n-gram in
    the prompt or the answer so far, and verifies them in one forward: no training, no draft
    model, greedy output equal to ``generate``'s. Hugging Face decodes only one prompt at a time
    this way, so a batch is decoded prompt by prompt (each without padding) and its forwards are
    counted as the model calls made (``record_forwards``).
    """
    _check_prompt_lookup(prompt_lookup_num_tokens)
    b, device = batch.size, engine.device
    tokens = torch.full((b, max_new_tokens), engine.pad_token_id, dtype=torch.long, device=device)  # [b, n]
    lengths = torch.zeros(b, dtype=torch.long, device=device)  # [b]
    forwards = torch.zeros(b, dtype=torch.long, device=device)  # [b]
    for row in range(b):
        prompt = batch.input_ids[row, batch.attention_mask[row].bool()][None]  # [1, p] without the padding
        with record_forwards(engine.model) as calls:
            output = engine.model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                prompt_lookup_num_tokens=prompt_lookup_num_tokens,
                eos_token_id=engine.stop_token_ids,
                pad_token_id=engine.pad_token_id,
            )
        new = output[0, prompt.shape[1]:]  # [m]
        stops = engine.is_stop(new)  # [m]
        length = int(stops.int().argmax()) + 1 if bool(stops.any()) else new.shape[0]
        tokens[row, :length] = new[:length]
        lengths[row] = length
        forwards[row] = len(calls)
    return DecodeResult(tokens, lengths, int(forwards.sum()), row_forwards=forwards)
