"""Prompts built from the Python standard library: disjoint splits, determinism, valid code, loading."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from leaplm.config import DataConfig
from leaplm.data.prompts import KINDS, SOURCES, TEST_FRACTION, stdlib_prompts, write_prompt_file
from leaplm.data.sft import DataError, load_source
from leaplm.data.tasks import TASKS
from leaplm.models.zoo import load_tokenizer
from leaplm.train.rollouts import choose_prompts


@pytest.fixture(scope="module")
def every_row():
    """``every_row[kind, split, seed]``: all rows of a split; the library is read once per process."""
    return {(kind, split, seed): stdlib_prompts(kind, split, None, seed)
            for kind in KINDS for split in ("train", "test") for seed in (0, 1)}


def qualname(row: dict[str, str]) -> str:
    return row["id"].rsplit(":", 1)[0]


def code_block(text: str) -> str:
    match = re.search(r"```python\n(.*)\n```\Z", text, flags=re.S)
    assert match, text
    return match.group(1)


def test_every_kind_and_split_has_rows_with_unique_ids(every_row):
    for (kind, split, seed), rows in every_row.items():
        assert len(rows) >= (100 if split == "test" else 1000), (kind, split)
        assert all(row["task"] == kind and row["prompt"] and row["response"] for row in rows)
        assert len({row["id"] for row in rows}) == len(rows)
        assert kind not in TASKS  # no synthetic checker grades them


@pytest.mark.parametrize("seed", [0, 1])
def test_train_and_test_never_share_a_function_or_module(every_row, seed):
    train = {qualname(r) for kind in KINDS for s in (0, 1) for r in every_row[kind, "train", s]}
    test = {qualname(r) for kind in KINDS for r in every_row[kind, "test", seed]}
    assert not train & test
    share = len(test) / (len(train) + len(test))
    assert TEST_FRACTION / 2 < share < TEST_FRACTION * 2


def test_the_seed_orders_and_words_the_rows_but_keeps_the_split(every_row):
    for kind in KINDS:
        assert stdlib_prompts(kind, "train", 50, seed=0) == every_row[kind, "train", 0][:50]
        seed0, seed1 = every_row[kind, "train", 0], every_row[kind, "train", 1]
        assert [r["id"] for r in seed0] != [r["id"] for r in seed1]
        assert sorted(r["id"] for r in seed0) == sorted(r["id"] for r in seed1)


def test_every_code_answer_parses_under_its_signature(every_row):
    for split in ("train", "test"):
        for row in every_row["stdlib_code", split, 0]:
            head, body = code_block(row["prompt"]), code_block(row["response"])
            tree = ast.parse(f"{head}\n{body}")
            function = tree.body[0]
            assert isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)), row["id"]
            assert ast.get_docstring(function) and len(function.body) >= 2, row["id"]
            assert row["prompt"].startswith("Complete this ") and "Reply with the code only." in row["prompt"]


def test_chat_rows_mix_the_templates(every_row):
    rows = every_row["stdlib_chat", "train", 0]
    assert {r["id"].rsplit(":", 1)[1] for r in rows} == {"explain", "write", "module"}
    for row in rows:
        if row["id"].endswith(":write"):
            ast.parse(code_block(row["response"]))
        else:
            assert "```" not in row["response"] and "\n" not in row["response"]


def test_stdlib_interleaves_the_kinds_and_caps_each():
    rows = stdlib_prompts("stdlib", "test", 3, seed=2)
    assert [r["task"] for r in rows] == ["stdlib_code", "stdlib_chat"] * 3
    assert rows[::2] == stdlib_prompts("stdlib_code", "test", 3, seed=2)


@pytest.mark.parametrize("source", SOURCES)
def test_load_source_gives_prompt_response_rows(source):
    train = load_source(DataConfig(source=source, train_per_task=4, test_per_task=2, seed=5))
    test = load_source(DataConfig(source=source, train_per_task=4, test_per_task=2, seed=5), "test")
    kinds = 2 if source == "stdlib" else 1
    assert (len(train), len(test)) == (4 * kinds, 2 * kinds)
    assert set(train.column_names) == {"task", "id", "prompt", "response"}
    assert train.to_list() == stdlib_prompts(source, "train", 4, 5)
    assert not {qualname(r) for r in train} & {qualname(r) for r in test}


def test_rollouts_take_stdlib_prompts_with_no_checker():
    data = DataConfig(source="stdlib_chat", train_per_task=6, max_length=100_000)
    prompts = choose_prompts(data, load_tokenizer("tiny-teacher"), max_prompts=0, max_new_tokens=8, seed=0)
    assert len(prompts) == 6
    assert {p.task for p in prompts} == {""}
    assert sorted(p.reference for p in prompts) == sorted(r["response"] for r in stdlib_prompts("stdlib_chat", "train", 6))


def test_bad_stdlib_settings_name_the_fix():
    with pytest.raises(DataError, match="unknown data.source 'stdlib-code'.*stdlib, stdlib_code, stdlib_chat"):
        load_source(DataConfig(source="stdlib-code"))
    with pytest.raises(DataError, match="data.tasks picks synthetic tasks.*unset data.tasks"):
        load_source(DataConfig(source="stdlib", tasks=["copy"]))
    with pytest.raises(DataError, match="splits 'train' and 'test', not 'validation'"):
        load_source(DataConfig(source="stdlib_code", split="validation"))
    with pytest.raises(ValueError, match="unknown stdlib prompt kind 'code'"):
        stdlib_prompts("code", "train")


def test_write_prompt_file(tmp_path):
    path = write_prompt_file(tmp_path / "held_out" / "prompts.jsonl", "stdlib", "test", 2, seed=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    expected = stdlib_prompts("stdlib", "test", 2, seed=0)
    assert rows == [{"id": r["id"], "prompt": r["prompt"]} for r in expected]


def test_a_tokenizer_trained_from_scratch_learns_the_configured_data():
    """pretrain with model.init trains its tokenizer on the run's own data: code for a code source."""
    from leaplm.train.pretrain import build_model
    from leaplm.train.recipes import load_config

    line = "    return os.path.join(self.path, name)"
    sizes = {}
    for source in ("synth", "stdlib_code"):
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny_teacher.yaml",
                          [f"data.source={source}", "data.train_per_task=200", "output_dir=/tmp/unused"])
        _, tokenizer = build_model(cfg)
        sizes[source] = len(tokenizer(line)["input_ids"])
    assert sizes["stdlib_code"] < sizes["synth"], sizes
