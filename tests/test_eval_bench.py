"""evaluate_model, run_bench and the eval / bench / quickstart commands."""

from __future__ import annotations

import json

import pytest
import torch

from leaplm.bench.decoders import run_bench
from leaplm.cli import main
from leaplm.config import EvalConfig
from leaplm.data.tasks import TASKS, make_split
from leaplm.inference.engine import DECODERS, DecoderError, DecodeResult
from leaplm.inference.evaluate import ROW_KEYS, evaluate_model, load_for_eval, task_prompts
from leaplm.models import zoo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def oracle_decoder(tokenizer, tasks, n):
    """A decoder that answers every test prompt with its reference answer (+ EOS)."""
    answers = {}
    for task in tasks:
        examples = make_split(task, "test", n)
        for prompt, ex in zip(task_prompts(tokenizer, examples), examples):
            answer = tokenizer(ex.answer, add_special_tokens=False)["input_ids"]
            answers[tuple(prompt)] = answer + [tokenizer.eos_token_id]

    def decode(engine, batch, max_new_tokens):
        rows = [answers[tuple(ids[mask.bool()].tolist())] for ids, mask in zip(batch.input_ids, batch.attention_mask)]
        width = max(len(r) for r in rows)
        tokens = torch.tensor([r + [engine.pad_token_id] * (width - len(r)) for r in rows])  # [b, n]
        lengths = torch.tensor([len(r) for r in rows])
        return DecodeResult(tokens, lengths, forward_passes=width, row_forwards=(lengths + 1) // 2)

    return decode


def test_evaluate_rows_and_grading(tiny, monkeypatch):
    model, tokenizer = tiny("llama")
    tasks = ["copy", "arith", "story"]
    monkeypatch.setitem(DECODERS, "oracle", oracle_decoder(tokenizer, tasks, 5))
    rows = evaluate_model(model, tokenizer, tasks=tasks, n=5, decoder="oracle", max_new_tokens=200,
                          batch_size=2, model_name="tiny-llama")
    assert [r["task"] for r in rows] == tasks
    for row in rows:
        assert tuple(row) == ROW_KEYS
        assert row["accuracy"] == 1.0  # every checker accepts its own reference answer
        assert row["n"] == 5 and row["model"] == "tiny-llama" and row["decoder"] == "oracle"
        assert row["tokens_per_forward"] == pytest.approx(2.0, rel=0.1)  # the oracle claims ~2 tokens per step
        assert row["speedup_vs_generate"] is None
        assert row["tokens_per_s"] > 0 and row["peak_mem_mb"] > 0
    json.dumps(rows)  # rows go straight into eval.json

    real = evaluate_model(model, tokenizer, tasks=["sort"], n=3, decoder="ar", decoder_settings={"temperature": 0.0},
                          max_new_tokens=8, batch_size=2)
    assert real[0]["accuracy"] == 0.0  # a random model cannot sort
    assert real[0]["tokens_per_forward"] == 1.0
    assert real[0]["decoder_settings"] == {"temperature": 0.0}


def test_evaluate_accepts_the_trainer_call(tiny):
    """The trainer passes exactly these keywords, straight from EvalConfig."""
    model, tokenizer = tiny("llama")
    e = EvalConfig(tasks=["copy", "word"], n=2, decoder="ar", max_new_tokens=4, batch_size=2)  # load_config fills decoder in
    rows = evaluate_model(model, tokenizer, tasks=e.tasks, n=e.n, decoder=e.decoder, decoder_settings=e.decoder_settings,
                          max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, seed=3, model_name="runs/x")
    assert [(r["task"], r["n"], r["model"]) for r in rows] == [("copy", 2, "runs/x"), ("word", 2, "runs/x")]
    assert all(r["accuracy"] == 0.0 for r in rows)  # random weights


def test_evaluate_rejects_bad_tasks_and_decoders(tiny):
    model, tokenizer = tiny("llama")
    with pytest.raises(KeyError, match="unknown synthetic task 'sorting'"):
        evaluate_model(model, tokenizer, tasks=["sorting"], n=2)
    with pytest.raises(DecoderError, match="available"):
        evaluate_model(model, tokenizer, tasks=["sort"], n=2, decoder="jacobi-typo")


def test_load_for_eval_explains_missing_teacher_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "EMBEDDED_TEACHER_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="leaplm train configs/pretrain/tiny_teacher.yaml"):
        load_for_eval("tiny-teacher")


def test_bench_interleaves_and_writes_results(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny("llama")
    calls = []

    def recording(name):
        inner = DECODERS[name]

        def decode(engine, batch, max_new_tokens, **settings):
            calls.append((name, batch.input_ids[0].tolist(), max_new_tokens))
            return inner(engine, batch, max_new_tokens, **settings)

        return decode

    monkeypatch.setitem(DECODERS, "hf_generate", recording("hf_generate"))
    monkeypatch.setitem(DECODERS, "ar", recording("ar"))
    specs = ["ar", {"decoder": "ar", "decoder_settings": {"temperature": 0.8, "seed": 1}}]
    rows = run_bench("tiny-llama", specs, ["copy", "sort"], n=4, batch_size=2, max_new_tokens=20, out_dir=tmp_path,
                     model=model, tokenizer=tokenizer)

    # One short warm-up call per decoder, then per batch every decoder before the next batch.
    timed = [c for c in calls if c[2] == 20]
    assert sorted(c[0] for c in calls[:3]) == ["ar", "ar", "hf_generate"] and len(calls) - len(timed) == 3
    assert len(timed) == 2 * 2 * 3  # tasks x batches x decoders
    for k in range(0, len(timed), 3):
        group = timed[k:k + 3]
        assert len({tuple(c[1]) for c in group}) == 1, "all decoders decode a batch before the next batch starts"
    assert timed[0][0] != timed[3][0], "the order rotates from batch to batch"

    expected = [(d, t) for t in ("copy", "sort") for d in ("hf_generate", "ar", "ar")]
    assert [(r["decoder"], r["task"]) for r in rows] == expected
    for row in rows:
        assert tuple(row) == ROW_KEYS
    reference = {r["task"]: r for r in rows if r["decoder"] == "hf_generate"}
    for row in rows:
        assert row["speedup_vs_generate"] == pytest.approx(row["tokens_per_s"] / reference[row["task"]]["tokens_per_s"])
    assert all(r["speedup_vs_generate"] == 1.0 for r in reference.values())
    assert rows[2]["decoder_settings"] == {"temperature": 0.8, "seed": 1}

    assert json.loads((tmp_path / "bench.json").read_text()) == rows
    md = (tmp_path / "bench.md").read_text()
    assert "| decoder | settings | task |" in md and "hf_generate" in md and "run_bench('tiny-llama'" in md
    assert f"torch: {torch.__version__}" in md and "torch_threads" in md and "cpu:" in md
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_MAGIC


def test_bench_repeats_time_each_batch_by_its_fastest_run(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny("llama")
    from leaplm.bench import decoders as bench

    seconds = {"hf_generate": iter([4.0, 2.0, 3.0, 2.0, 8.0, 6.0]), "ar": iter([1.0, 5.0, 3.0, 9.0, 4.0, 7.0])}
    real = bench.decode_recorded

    def timed(engine, prompts, name, max_new_tokens, settings):
        out, widths = real(engine, prompts, name, max_new_tokens, settings)
        if max_new_tokens == 12:  # not the warm-up
            out.stats.wall_time_s = next(seconds[name])
        return out, widths

    monkeypatch.setattr(bench, "decode_recorded", timed)
    rows = run_bench("tiny-llama", ["ar"], ["copy"], n=4, batch_size=2, max_new_tokens=12, out_dir=tmp_path,
                     model=model, tokenizer=tokenizer, repeats=3)
    by = {r["decoder"]: r for r in rows}
    # two batches, three runs each: generate's fastest 2.0 + 2.0, ar's 1.0 + 4.0
    assert by["ar"]["tokens_per_s"] / by["hf_generate"]["tokens_per_s"] == pytest.approx(4.0 / 5.0, rel=1e-3)
    assert by["ar"]["speedup_vs_generate"] == pytest.approx(0.8, rel=1e-3)
    assert next(seconds["ar"], None) is None and next(seconds["hf_generate"], None) is None
    assert "every batch 3 times" in (tmp_path / "bench.md").read_text()
    with pytest.raises(ValueError, match="repeats"):
        run_bench("m", ["ar"], ["copy"], 2, 2, 4, tmp_path, model=model, tokenizer=tokenizer, repeats=0)


def test_bench_rejects_bad_specs(tiny, tmp_path):
    model, tokenizer = tiny("llama")
    with pytest.raises(ValueError, match="cannot read decoder spec"):
        run_bench("m", [{"name": "ar"}], ["copy"], 2, 2, 4, tmp_path, model=model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="repeat"):
        run_bench("m", ["ar", "ar"], ["copy"], 2, 2, 4, tmp_path, model=model, tokenizer=tokenizer)


def test_cli_eval_on_a_saved_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    main(["eval", str(tiny_model_dir), "--tasks", "copy,sort", "--decoder", "ar",
          "--decoder-settings", '{"top_k": 1, "temperature": 1.0}',
          "--n", "3", "--batch-size", "2", "--max-new-tokens", "6", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| task | n | accuracy | tokens/forward | tokens/s |" in printed and "| copy | 3 |" in printed
    rows = json.loads((out / "eval.json").read_text())
    assert [r["task"] for r in rows] == ["copy", "sort"]
    assert rows[0]["decoder_settings"] == {"top_k": 1, "temperature": 1.0} and rows[0]["model"] == str(tiny_model_dir)


def test_cli_rejects_bad_decoder_settings(tiny_model_dir, capsys):
    with pytest.raises(SystemExit):
        main(["eval", str(tiny_model_dir), "--decoder-settings", "{temperature: 1}"])
    assert "not valid JSON" in capsys.readouterr().err


def test_cli_bench_and_quickstart(tiny_model_dir, tmp_path, capsys):
    bench_dir = tmp_path / "bench"
    main(["bench", str(tiny_model_dir), "--decoders", "ar", "--tasks", "copy", "--n", "2", "--max-new-tokens", "4",
          "--dtype", "bfloat16", "--out", str(bench_dir)])
    rows = json.loads((bench_dir / "bench.json").read_text())
    assert [r["decoder"] for r in rows] == ["hf_generate", "ar"]
    command = (bench_dir / "bench.md").read_text()
    assert f"leaplm bench {tiny_model_dir} --decoders ar --tasks copy --n 2" in command
    assert "--dtype bfloat16" in command  # the run reproduces in the dtype it was measured in

    quick = tmp_path / "quick"
    main(["quickstart", "--out", str(quick), "--n", "2", "--max-new-tokens", "4", "--model", str(tiny_model_dir)])
    printed = capsys.readouterr().out
    assert f"results in {quick}" in printed
    assert len(json.loads((quick / "eval.json").read_text())) == len(TASKS)
    assert {r["decoder"] for r in json.loads((quick / "bench.json").read_text())} == {"hf_generate", "ar"}
    assert (quick / "bench.png").read_bytes()[:8] == PNG_MAGIC and (quick / "bench.md").is_file()


def test_decoder_specs_sweep_settings():
    import argparse

    from leaplm.bench.commands import _decoder_specs

    assert _decoder_specs("ar, block_diffusion:threshold=0.5|0.9:sub_block_size=8") == [
        "ar",
        {"decoder": "block_diffusion", "decoder_settings": {"threshold": 0.5, "sub_block_size": 8}},
        {"decoder": "block_diffusion", "decoder_settings": {"threshold": 0.9, "sub_block_size": 8}},
    ]
    with pytest.raises(argparse.ArgumentTypeError, match="key=value"):
        _decoder_specs("block_diffusion:threshold")


def test_a_decoder_spec_with_the_old_settings_key_names_the_new_one():
    from leaplm.bench.decoders import parse_spec

    assert parse_spec({"decoder": "ar", "decoder_settings": {"seed": 1}}) == ("ar", {"seed": 1})
    with pytest.raises(ValueError, match="the key 'settings' was renamed to 'decoder_settings'"):
        parse_spec({"decoder": "ar", "settings": {"seed": 1}})


def test_quickstart_on_the_embedded_models(tmp_path, capsys):
    """With no --model, quickstart runs the embedded teacher and benches the embedded
    block-diffusion model one prompt at a time (Jacobi Forcing skipped: its test trains a tiny run)."""
    quick = tmp_path / "quick"
    main(["quickstart", "--out", str(quick), "--n", "1", "--max-new-tokens", "8", "--skip-jacobi-forcing"])
    printed = capsys.readouterr().out
    assert "3/4 bench: tiny-teacher-bd" in printed
    rows = json.loads((quick / "block_diffusion" / "bench.json").read_text())
    assert {r["decoder"] for r in rows} == {"hf_generate", "block_diffusion"}
    verified = [r for r in rows if r["decoder_settings"].get("verify")]
    assert len(verified) == 6 and all(r["accuracy"] == generate["accuracy"] for r in verified
                                      for generate in rows if generate["decoder"] == "hf_generate"
                                      and generate["task"] == r["task"])
    assert {r["model"] for r in rows} == {zoo.EMBEDDED_BLOCK_DIFFUSION}
    assert all(r["tokens_per_forward"] >= 1 for r in rows)
