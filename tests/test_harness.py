"""lm-eval runs our decoders: `leaplm lm-eval --model leaplm` on a tiny custom task scores what
leaplm's own decode of the same prompts scores. Skipped without the `eval` extra (lm-eval)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")

from leaplm.cli import main  # noqa: E402
from leaplm.data.tasks import make_split  # noqa: E402
from leaplm.inference.engine import Engine  # noqa: E402
from leaplm.inference.evaluate import load_for_eval, task_prompts  # noqa: E402
from leaplm.models.zoo import EMBEDDED_TEACHER, EMBEDDED_TEACHER_DIR  # noqa: E402

# A generation task over local JSON lines, answers graded by exact match.
TASK = """task: leaplm_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: []
  max_gen_toks: 48
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_scores_the_jacobi_decoder_on_a_tiny_task(tmp_path):
    examples = make_split("copy", "test", 3, 0) + make_split("sort", "test", 3, 0)
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"prompt": ex.prompt, "answer": ex.answer}) + "\n" for ex in examples))
    (tmp_path / "tiny.yaml").write_text(TASK.format(data=data))
    main(["lm-eval", "--model", "leaplm", "--model_args",
          f"pretrained={EMBEDDED_TEACHER_DIR},decoder=jacobi,jacobi_block_size=8,dtype=float32", "--device", "cpu",
          "--tasks", "leaplm_tiny", "--include_path", str(tmp_path), "--apply_chat_template",
          "--batch_size", "4", "--output_path", str(tmp_path / "out"), "--log_samples"])
    (results,) = (tmp_path / "out").rglob("results_*.json")
    score = json.loads(results.read_text())["results"]["leaplm_tiny"]["exact_match,none"]

    model, tokenizer = load_for_eval(EMBEDDED_TEACHER, device="cpu")
    texts = Engine(model, tokenizer).generate(task_prompts(tokenizer, examples), "jacobi", 48, jacobi_block_size=8).texts
    expected = sum(text.strip() == ex.answer.strip() for text, ex in zip(texts, examples)) / len(examples)
    assert expected > 0.5 and score == pytest.approx(expected)


def test_log_likelihoods_equal_lm_evals_own_hf_model():
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from leaplm.ship.harness import LeapLM

    pairs = [("Copy: abc\nAnswer:", " abc"), ("Sort: 3 1 2\nAnswer:", " 1 2 3"), ("x", "y z")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    texts = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(["a b c", "Sort: 3 1 2"])]
    ours = LeapLM(str(EMBEDDED_TEACHER_DIR), decoder="ar", device="cpu")
    theirs = HFLM(pretrained=str(EMBEDDED_TEACHER_DIR), device="cpu", batch_size=1)
    for (a, greedy_a), (b, greedy_b) in zip(ours.loglikelihood(requests), theirs.loglikelihood(requests)):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
    assert ours.loglikelihood_rolling(texts) == pytest.approx(theirs.loglikelihood_rolling(texts), abs=1e-4)
