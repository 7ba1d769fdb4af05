"""`leaplm bench` / `leaplm eval` on a user's prompts file: reading it, and scoring decoders
against the greedy reference (exact match, token agreement), with hf_prompt_lookup beside
hf_generate. Speed is never asserted."""

from __future__ import annotations

import json

import pytest

from leaplm.bench.decoders import run_bench
from leaplm.cli import main
from leaplm.data.sft import prompt_ids
from leaplm.inference.cost import COST_WIDTHS
from leaplm.inference.engine import DECODERS, DecoderError, Engine, GenerationOutput
from leaplm.inference.evaluate import (
    ROW_KEYS,
    PromptFileError,
    TaskScore,
    evaluate_prompts,
    plain_prompt_ids,
    read_prompts,
)
from leaplm.models.zoo import EMBEDDED_BLOCK_DIFFUSION, EMBEDDED_TEACHER, load_model

ROWS = [
    {"id": "chat", "prompt": "Copy: garden pencil island tiger lamp"},
    {"messages": [{"role": "user", "content": "Copy: red blue"}, {"role": "assistant", "content": "red blue"},
                  {"role": "user", "content": "Sort: 5 3 9 1"}]},
    {"id": 7, "text": "once upon a time there was a"},
]


def write_prompts(path, rows=ROWS, blank_line=True):
    lines = [json.dumps(r) for r in rows]
    if blank_line:
        lines.insert(1, "")  # blank lines are skipped; line numbers still count them
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def teacher():
    model, tokenizer = load_model(EMBEDDED_TEACHER)
    return model.eval(), tokenizer


def test_read_prompts_formats_each_row_kind(tmp_path, teacher):
    _, tokenizer = teacher
    prompts = read_prompts(write_prompts(tmp_path / "p.jsonl"), tokenizer)
    assert [p.id for p in prompts] == ["chat", 3, 7]  # a row without an id is named by its line
    assert prompts[0].tokens == prompt_ids(tokenizer, [{"role": "user", "content": ROWS[0]["prompt"]}])
    assert prompts[1].tokens == prompt_ids(tokenizer, ROWS[1]["messages"])
    assert prompts[2].tokens == tokenizer(ROWS[2]["text"], add_special_tokens=False)["input_ids"]
    assert len(read_prompts(tmp_path / "p.jsonl", tokenizer, n=2)) == 2


class SpecialTokenizer:
    """Adds BOS and EOS by default, as some tokenizers do."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=True):
        ids = [10 + ord(c) for c in text]
        return {"input_ids": [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids}


def test_a_plain_text_prompt_keeps_the_default_bos_but_never_an_eos():
    assert plain_prompt_ids(SpecialTokenizer(), "ab") == [1, 10 + ord("a"), 10 + ord("b")]


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"prompt": "a", "text": "b"}', "exactly one of 'prompt', 'messages' or 'text'"),
    ('{"question": "a"}', r"unknown field\(s\) \['question'\]"),
    ('{"prompt": ""}', '"prompt" must be a non-empty string'),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     "must end with a user turn"),
    ('{"messages": [{"role": "user"}]}', r'\{"role": str, "content": str\}'),
    ('{"id": "chat", "prompt": "again"}', "id 'chat' is already used on line 1"),
    ('{"id": [1], "prompt": "a"}', '"id" must be a string or an integer'),
])
def test_bad_rows_name_the_file_line_and_fix(tmp_path, teacher, line, message):
    _, tokenizer = teacher
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
    with pytest.raises(PromptFileError, match=message) as err:
        read_prompts(path, tokenizer)
    assert f"{path}:2:" in str(err.value)


def test_missing_empty_and_too_long_prompt_files(tmp_path, teacher):
    _, tokenizer = teacher
    with pytest.raises(PromptFileError, match="does not exist"):
        read_prompts(tmp_path / "none.jsonl", tokenizer)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PromptFileError, match="has no rows"):
        read_prompts(tmp_path / "empty.jsonl", tokenizer)
    with pytest.raises(PromptFileError, match=r"p.jsonl:1: .*lower --max-new-tokens"):
        read_prompts(write_prompts(tmp_path / "p.jsonl"), tokenizer, max_tokens=5)


def test_chat_rows_need_a_chat_template(tmp_path, tiny):
    _, tokenizer = tiny("llama")
    path = write_prompts(tmp_path / "p.jsonl", ROWS[:1], blank_line=False)
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(PromptFileError, match=r'p.jsonl:1: .*has no chat template.*\{"text": \.\.\.\}'):
            read_prompts(path, tokenizer)
    finally:
        tokenizer.chat_template = template


def test_score_compares_with_the_reference_token_by_token():
    score = TaskScore()
    reference = [[5, 6, 7, 4], [8, 9, 4]]
    score.add(GenerationOutput([[5, 6, 7, 4], [8, 1, 4]], ["", ""]), reference=reference, widths=[1, 3, 3])
    assert score.exact_match == 0.5 and score.reproduces_greedy is False
    assert score.token_agreement == (4 + 1) / 7  # the second answer agrees up to its second token
    assert score.forward_width == pytest.approx(7 / 3)
    assert score.forward_cost({1: 1.0, 3: 1.5}) == pytest.approx(4 / 3)
    assert score.accuracy is None  # no checker graded these


def test_bench_on_a_prompts_file(tmp_path, teacher, monkeypatch):
    model, tokenizer = teacher

    def off_by_one(engine, batch, max_new_tokens):
        """ar's answer with its second token changed: a decoder that is lossy on every prompt."""
        result = DECODERS["ar"](engine, batch, max_new_tokens)
        result.tokens[:, 1] = (result.tokens[:, 1] + 1) % model.config.vocab_size
        return result

    monkeypatch.setitem(DECODERS, "off_by_one", off_by_one)
    path = write_prompts(tmp_path / "mine.jsonl")
    out = tmp_path / "bench"
    jacobi = {"decoder": "jacobi", "decoder_settings": {"jacobi_block_size": 4}}
    rows = run_bench(EMBEDDED_TEACHER, ["ar", "off_by_one", jacobi], prompts=path, n=None, batch_size=2,
                     max_new_tokens=24, out_dir=out, model=model, tokenizer=tokenizer)
    by = {r["decoder"]: r for r in rows}
    assert [r["decoder"] for r in rows] == ["hf_generate", "hf_prompt_lookup", "ar", "off_by_one", "jacobi"]
    for row in rows:
        assert tuple(row) == ROW_KEYS
        assert row["task"] == "mine.jsonl" and row["n"] == 3 and row["accuracy"] is None
        assert row["forward_cost"] is None or row["forward_cost"] > 0
    for lossless in ("hf_generate", "hf_prompt_lookup", "ar", "jacobi"):
        assert by[lossless]["exact_match"] == 1.0 and by[lossless]["reproduces_greedy"] is True
        assert by[lossless]["token_agreement"] == 1.0
    assert by["off_by_one"]["exact_match"] == 0.0 and by["off_by_one"]["reproduces_greedy"] is False
    assert 0 < by["off_by_one"]["token_agreement"] < 1  # the first token of every answer still agrees
    assert by["ar"]["forward_width"] == 1.0 and by["ar"]["forward_cost"] == 1.0
    assert 1 < by["jacobi"]["forward_width"] <= 5  # a block of 4 guesses after the newest committed token
    assert by["hf_prompt_lookup"]["speedup_vs_prompt_lookup"] == 1.0
    assert by["hf_generate"]["speedup_vs_generate"] == 1.0

    assert json.loads((out / "bench.json").read_text()) == rows
    outputs = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    assert [o["id"] for o in outputs] == ["chat", 3, 7]
    assert outputs[0]["outputs"]["ar"] == outputs[0]["outputs"]["hf_generate"]
    md = (out / "bench.md").read_text()
    assert "| exact match | token agreement | reproduces greedy |" in md and "| accuracy |" not in md
    assert "## Cost of a k-token forward relative to 1 token" in md
    assert "| batch | " + " | ".join(f"k={k}" for k in COST_WIDTHS) + " |" in md
    assert "| 1 | 1 |" in md and "| 2 | 1 |" in md  # prompt lookup ran at batch 1, the others at batch 2
    assert "prompts='" in md  # the Python call that reproduces it


def test_unverified_block_diffusion_is_measured_against_greedy(tmp_path):
    model, tokenizer = load_model(EMBEDDED_BLOCK_DIFFUSION)
    path = write_prompts(tmp_path / "p.jsonl")
    unverified = {"decoder": "block_diffusion", "decoder_settings": {"threshold": 0.5}}
    rows = run_bench(EMBEDDED_BLOCK_DIFFUSION, [unverified], prompts=path, n=2, batch_size=1, max_new_tokens=16,
                     out_dir=tmp_path / "bd", model=model.eval(), tokenizer=tokenizer)
    bd = rows[-1]
    assert bd["decoder"] == "block_diffusion" and bd["n"] == 2
    assert 0 <= bd["exact_match"] <= 1 and 0 <= bd["token_agreement"] <= 1  # lossy: measured, not asserted equal
    assert isinstance(bd["reproduces_greedy"], bool) and bd["forward_width"] > 1


def test_prompt_lookup_equals_generate_on_a_padded_batch(lively_tiny):
    model, tokenizer = lively_tiny("llama", 3.0)
    engine = Engine(model, tokenizer)
    prompts = [[5, 6, 7, 8, 5, 6, 7], [9, 10, 11, 9, 10, 11, 9, 10, 11, 9], [12, 13]]
    reference = engine.generate(prompts, "hf_generate", 12)
    for n in (1, 3, 10):
        out = engine.generate(prompts, "hf_prompt_lookup", 12, prompt_lookup_num_tokens=n)
        assert out.sequences == reference.sequences
        assert out.stats.forward_passes == out.stats.sequence_forwards  # one prompt at a time
        assert out.stats.tokens_per_forward >= 1.0
    with pytest.raises(DecoderError, match="prompt_lookup_num_tokens must be an integer >= 1"):
        engine.generate(prompts, "hf_prompt_lookup", 4, prompt_lookup_num_tokens=0)


def test_eval_on_a_prompts_file(tmp_path, tiny):
    model, tokenizer = tiny("llama")
    rows, outputs = evaluate_prompts(model, tokenizer, write_prompts(tmp_path / "p.jsonl"), decoder="ar",
                                     max_new_tokens=8, batch_size=2, model_name="tiny-llama")
    assert tuple(rows[0]) == ROW_KEYS
    assert rows[0]["exact_match"] == 1.0 and rows[0]["reproduces_greedy"] is True and rows[0]["n"] == 3
    assert rows[0]["forward_width"] == 1.0 and rows[0]["forward_cost"] is None  # only a bench measures cost
    assert [json.loads(line)["id"] for line in outputs.splitlines()] == ["chat", 3, 7]


def test_cli_prompts(tiny_model_dir, tmp_path, capsys):
    path = write_prompts(tmp_path / "p.jsonl")
    main(["eval", str(tiny_model_dir), "--prompts", str(path), "--decoder", "jacobi", "--n", "2",
          "--max-new-tokens", "6", "--out", str(tmp_path / "eval")])
    printed = capsys.readouterr().out
    assert "| prompts | n | exact match |" in printed and "| p.jsonl | 2 | 1 |" in printed
    assert len((tmp_path / "eval" / "outputs.jsonl").read_text().splitlines()) == 2

    main(["bench", str(tiny_model_dir), "--prompts", str(path), "--decoders",
          "ar,hf_prompt_lookup:prompt_lookup_num_tokens=3", "--batch-size", "1", "--max-new-tokens", "6",
          "--out", str(tmp_path / "bench")])
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())
    # a listed prompt lookup replaces the default one
    assert [(r["decoder"], r["decoder_settings"]) for r in rows] == [
        ("hf_generate", {}), ("ar", {}), ("hf_prompt_lookup", {"prompt_lookup_num_tokens": 3})]
    assert all(r["n"] == 3 for r in rows)  # --n defaults to every row of the file
    command = (tmp_path / "bench" / "bench.md").read_text()
    assert f"--prompts {path}" in command and "--tasks" not in command and "--seed" not in command

    reference = tmp_path / "bench" / "outputs.jsonl"
    main(["bench", str(tiny_model_dir), "--prompts", str(path), "--reference", str(reference), "--batch-size", "1",
          "--max-new-tokens", "6", "--out", str(tmp_path / "vs")])
    assert "| exact match vs reference |" in capsys.readouterr().out
    assert all(r["exact_match_vs_reference"] == 1.0 for r in json.loads((tmp_path / "vs" / "bench.json").read_text()))
    assert f"--reference {reference}" in (tmp_path / "vs" / "bench.md").read_text()

    with pytest.raises(SystemExit):
        main(["bench", str(tiny_model_dir), "--prompts", str(path), "--tasks", "copy", "--out", str(tmp_path / "x")])
    assert "not allowed with argument" in capsys.readouterr().err


def test_bench_refuses_tasks_and_prompts_together(tmp_path, tiny):
    model, tokenizer = tiny("llama")
    with pytest.raises(ValueError, match="either tasks .* or prompts"):
        run_bench("m", ["ar"], ["copy"], prompts=write_prompts(tmp_path / "p.jsonl"), out_dir=tmp_path,
                  model=model, tokenizer=tokenizer)


def test_synthetic_task_rows_compare_with_generate_too(tmp_path, tiny):
    model, tokenizer = tiny("llama")
    rows = run_bench("tiny-llama", ["ar"], ["copy"], n=2, batch_size=2, max_new_tokens=6, out_dir=tmp_path,
                     model=model, tokenizer=tokenizer)
    assert [r["decoder"] for r in rows] == ["hf_generate", "ar"]  # prompt lookup joins prompts-file benches only
    assert all(r["exact_match"] == 1.0 and r["accuracy"] is not None for r in rows)
    assert all(r["speedup_vs_prompt_lookup"] is None for r in rows)
    assert rows[1]["forward_width"] == 1.0 and rows[1]["forward_cost"] == 1.0


def test_bench_against_an_earlier_runs_outputs(tmp_path, teacher):
    """--reference: a first bench's outputs.jsonl as the references of a second; the same model, so
    the lossless decoders match it exactly, and a doctored reference text lowers that prompt only."""
    model, tokenizer = teacher
    path = write_prompts(tmp_path / "p.jsonl", ROWS[:2], blank_line=False)
    common = dict(prompts=path, n=None, batch_size=2, max_new_tokens=8, model=model, tokenizer=tokenizer)
    rows = run_bench(EMBEDDED_TEACHER, ["ar"], out_dir=tmp_path / "base", **common)
    assert all(r["exact_match_vs_reference"] is None and r["token_agreement_vs_reference"] is None for r in rows)
    assert "vs reference" not in (tmp_path / "base" / "bench.md").read_text()
    base = tmp_path / "base" / "outputs.jsonl"

    rows = run_bench(EMBEDDED_TEACHER, ["ar"], reference=base, out_dir=tmp_path / "again", **common)
    for row in rows:
        assert tuple(row) == ROW_KEYS
        assert row["exact_match_vs_reference"] == 1.0 and row["token_agreement_vs_reference"] == 1.0
    md = (tmp_path / "again" / "bench.md").read_text()
    assert "| exact match vs reference | token agreement vs reference |" in md and f"reference='{base}'" in md

    lines = [json.loads(line) for line in base.read_text().splitlines()]
    lines[1]["outputs"]["hf_generate"] += " and more"
    doctored = tmp_path / "doctored.jsonl"
    doctored.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = run_bench(EMBEDDED_TEACHER, ["ar"], reference=doctored, out_dir=tmp_path / "doctored", **common)
    for row in rows:
        assert row["exact_match_vs_reference"] == 0.5  # the second prompt no longer matches
        assert 0 < row["token_agreement_vs_reference"] < 1  # its answer agrees up to the added words


def test_a_reference_for_other_prompts_is_refused_before_decoding(tmp_path, teacher, monkeypatch):
    model, tokenizer = teacher
    path = write_prompts(tmp_path / "p.jsonl")  # ids "chat", 3, 7
    monkeypatch.setattr(Engine, "generate", lambda *a, **k: pytest.fail("decoded before checking the reference"))

    def refused(lines, message, n=None):
        reference = tmp_path / "reference.jsonl"
        reference.write_text("".join(json.dumps(line) + "\n" for line in lines))
        with pytest.raises(ValueError, match=message):
            run_bench(EMBEDDED_TEACHER, ["ar"], prompts=path, reference=reference, n=n, out_dir=tmp_path / "out",
                      model=model, tokenizer=tokenizer)

    def row(i, text="x"):
        return {"id": i, "outputs": {"hf_generate": text, "ar": text}}

    refused([row("chat"), row(3), row(7)], "has 3 prompts, the bench 2", n=2)
    refused([row("chat"), row(4), row(7)], "prompt 2 has id 4, the prompts file's 3")
    refused([row("chat"), row(7), row(3)], r"prompt 2 has id 7, the prompts file's 3 \(the same ids in another order\)")
    refused([row("chat"), {"id": 3, "outputs": {"ar": "x"}}, row(7)], "reference.jsonl:2: no hf_generate text")
    with pytest.raises(ValueError, match="does not exist"):
        run_bench(EMBEDDED_TEACHER, ["ar"], prompts=path, reference=tmp_path / "none.jsonl", out_dir=tmp_path,
                  model=model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="pass prompts too"):
        run_bench(EMBEDDED_TEACHER, ["ar"], ["copy"], reference=tmp_path / "none.jsonl", out_dir=tmp_path,
                  model=model, tokenizer=tokenizer)
