"""An lm-evaluation-harness model: our decoders on lm-eval's benchmarks (needs the ``eval`` extra).

    leaplm lm-eval --model leaplm --model_args pretrained=DIR,decoder=jacobi,jacobi_block_size=16 --tasks gsm8k

``pretrained`` is a ``leaplm export`` directory (its decoder and settings are the defaults), or any
causal LM with ``decoder=`` named. Other ``model_args`` besides ``dtype`` and ``device`` are decoder
settings. Generation (``generate_until``) runs through the engine with that decoder; the
log-likelihood requests score the model itself, which no decoder changes.

lm-eval 0.4.13 finds models only in its own registry, so ``leaplm lm-eval`` imports this module
(which registers ``leaplm``) and then runs lm-eval's command line with the arguments it was given.
pyproject.toml also declares the model under an ``lm_eval.models`` entry point, for lm-eval
versions that load model plugins (EleutherAI/lm-evaluation-harness#4013); 0.4.13 does not, and the
group name has not been checked against such a release.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from leaplm.inference.evaluate import batches, default_device
from leaplm.ship.load import load


@register_model("leaplm")
class LeapLM(LM):
    def __init__(self, pretrained: str, decoder: str | None = None, dtype: str = "float32", device: str | None = None,
                 batch_size: int | str = 16, max_batch_size: int | None = None, **decoder_settings: Any):
        # lm-eval passes batch_size ("auto" included) and max_batch_size to every model; a fixed
        # batch is used, since decoders' memory needs differ from the forward lm-eval would probe.
        super().__init__()
        self.fast = load(pretrained, device=device or default_device(), dtype=dtype, decoder=decoder, **decoder_settings)
        self.tokenizer = self.fast.tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" -> a fixed default

    # --- chat templates (lm_eval --apply_chat_template) ---

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # --- requests ---

    def _ids(self, text: str) -> list[int]:
        # Chat-formatted contexts already hold their special tokens; plain ones get none added either,
        # as training tokenizes prompts (data/sft.py).
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate_until(self, requests) -> list[str]:
        """Decode each context with the decoder; cut the text at the first of its ``until`` strings."""
        results: list[str] = [""] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            _, kwargs = request.args
            key = (tuple(kwargs.get("until") or []), int(kwargs.get("max_gen_toks", self.fast.max_new_tokens)))
            groups.setdefault(key, []).append(i)
        for (until, max_new_tokens), rows in groups.items():
            for idx in batches(rows, self.batch_size):
                out = self.fast.generate([self._ids(requests[i].args[0]) for i in idx], max_new_tokens)
                for i, text in zip(idx, out.texts):
                    for stop in until:
                        text = text.split(stop)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Sum of log p(continuation | context) and whether greedy decoding would produce it."""
        model, device = self.fast.model, self.fast.engine.device
        ids = torch.tensor([context + continuation], device=device)  # [1, c + n]
        with torch.inference_mode():
            # [n, v]: the logits at the last context token and at each continuation token but the last
            logits = model(input_ids=ids).logits[0, len(context) - 1:-1].float()
        logprobs = logits.log_softmax(-1)
        target = torch.tensor(continuation, device=device)  # [n]
        return float(logprobs.gather(1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all())

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for request in requests:
            context, continuation = request.args
            whole, head = self._ids(context + continuation), self._ids(context)
            # Tokenize the joined text and split where the context ends, so the boundary token is the
            # one the model would see (as lm-eval's HF model does).
            split = len(head) if whole[: len(head)] == head else len(head) - 1
            context_ids = whole[:split] or [self.fast.engine.stop_token_ids[0]]
            result = self._score(context_ids, whole[split:])
            self.cache_hook.add_partial("loglikelihood", request.args, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Log-likelihood of a whole text: every token scored after the stop token as a start marker.

        One window: a text longer than the model's positions is an error, not silently truncated.
        """
        out = []
        for request in requests:
            ids = self._ids(request.args[0])
            limit = self.fast.engine.max_positions
            if limit is not None and len(ids) + 1 > limit:
                raise ValueError(f"a rolling log-likelihood text has {len(ids)} tokens; the model takes {limit - 1}")
            score, _ = self._score([self.fast.engine.stop_token_ids[0]], ids)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, score)
            out.append(score)
        return out


def run_lm_eval(argv: list[str]) -> None:
    """lm-eval's command line, with ``leaplm`` registered (this module's import did that)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
