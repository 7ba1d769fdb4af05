"""Synthetic tasks, chat tokenization and masking, dataset loaders, packing and collation."""

from __future__ import annotations

import copy
import json
import re
from itertools import chain
from pathlib import Path

import datasets
import pytest
import torch

from leaplm.config import DataConfig
from leaplm.data import tasks
from leaplm.data.sft import (
    IGNORE_INDEX,
    DataError,
    PadCollator,
    load_source,
    model_inputs,
    pack,
    prompt_ids,
    to_messages,
    tokenize_chat,
    tokenize_dataset,
)
from leaplm.data.tasks import NAMES, TASKS, TEST_CAP, make_split
from leaplm.models.zoo import load_tokenizer
from leaplm.train.rollouts import choose_prompts

TASK_NAMES = list(TASKS)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-teacher")


def chat(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


# ----- Synthetic tasks ------------------------------------------------------------------------


def test_the_six_task_families_exist():
    assert TASK_NAMES == ["copy", "reverse", "sort", "arith", "word", "story"]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_tasks_are_deterministic_from_the_seed(task):
    assert make_split(task, "train", 50, seed=3) == make_split(task, "train", 50, seed=3)
    assert make_split(task, "train", 50, seed=3) != make_split(task, "train", 50, seed=4)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_train_and_test_are_disjoint_and_distinct(task):
    train = [e.prompt for e in make_split(task, "train", 2000)]
    # Train excludes every prompt of the largest test split, so any allowed test size is disjoint.
    test = [e.prompt for e in make_split(task, "test", TEST_CAP)]
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)


def test_split_errors_name_the_limits():
    with pytest.raises(ValueError, match=f"at most {TEST_CAP}"):
        make_split("copy", "test", TEST_CAP + 1)
    with pytest.raises(ValueError, match="use 'train' or 'test'"):
        make_split("copy", "validation", 1)
    with pytest.raises(KeyError, match="available: copy, reverse, sort, arith, word, story"):
        tasks.get_task("division")


def _drop_last_word(answer: str) -> str:
    return answer.rsplit(" ", 1)[0]


def _append_word(answer: str) -> str:
    return answer + " " + answer.split()[0]


def _wrong_final_number(answer: str) -> str:
    return re.sub(r"#### (\d+)$", lambda m: f"#### {int(m.group(1)) + 1}", answer)


def _no_final_number(answer: str) -> str:
    return answer.split("####")[0]


def _other_name(answer: str) -> str:
    name = re.search(r"named (\w+)", answer).group(1)
    return answer.replace(name, next(n for n in NAMES if n != name))


def _missing_thing(answer: str) -> str:
    return re.sub(r"found [^.]+\.", "found nothing.", answer)


def _unfinished(answer: str) -> str:
    return answer.removesuffix(" The end.")


EXACT = [_drop_last_word, _append_word]
FINAL_NUMBER = [_wrong_final_number, _no_final_number]
CORRUPTIONS = {
    "copy": EXACT,
    "reverse": [*EXACT, lambda a: " ".join(reversed(a.split()))],
    "sort": EXACT,
    "arith": FINAL_NUMBER,
    "word": FINAL_NUMBER,
    "story": [_other_name, _missing_thing, _unfinished],
}


@pytest.mark.parametrize("task", TASK_NAMES)
def test_checker_accepts_the_reference_and_rejects_corruptions(task):
    check = TASKS[task].check
    for ex in make_split(task, "test", 30):
        assert check(ex.answer, ex.answer)
        assert check("  " + ex.answer + "\n", ex.answer)  # surrounding whitespace is not an error
        for corrupt in CORRUPTIONS[task]:
            bad = corrupt(ex.answer)
            if bad.split() == ex.answer.split():  # e.g. reversing a palindromic list
                continue
            assert not check(bad, ex.answer), (corrupt.__name__, bad)


def test_final_number_checker_grades_only_the_final_number():
    ex = make_split("arith", "test", 1)[0]
    final = ex.answer.rsplit("#### ", 1)[1]
    assert TASKS["arith"].check(f"different working. #### {final}", ex.answer)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_every_answer_has_at_least_8_teacher_tokens(task, tokenizer):
    examples = make_split(task, "train", 500) + make_split(task, "test", TEST_CAP)
    lengths = [len(tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in examples]
    shortest = examples[lengths.index(min(lengths))].answer
    assert min(lengths) >= 8, f"{task}: {shortest!r} is {min(lengths)} tokens"


# ----- Chat tokenization ------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASK_NAMES)
def test_tokenize_chat_masks_exactly_the_prompt(task, tokenizer):
    ex = make_split(task, "test", 1)[0]
    messages = chat(ex.prompt, ex.answer)
    sample = tokenize_chat(tokenizer, messages)
    prompt = prompt_ids(tokenizer, messages[:1])
    n = len(prompt)
    assert sample["input_ids"][:n] == prompt  # training sees exactly what a decoder is given
    assert sample["labels"][:n] == [IGNORE_INDEX] * n
    assert sample["labels"][n:] == sample["input_ids"][n:]
    assert sample["labels"][-1] == tokenizer.eos_token_id  # the model learns to stop
    assert tokenizer.decode(sample["input_ids"][n:-1]) == ex.answer


def test_chat_needs_an_assistant_turn_last(tokenizer):
    with pytest.raises(DataError, match="must end with an assistant message"):
        tokenize_chat(tokenizer, [{"role": "user", "content": "hi"}])


def test_tokenizer_without_chat_template_is_rejected_with_the_fix(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    for call in (lambda: tokenize_chat(plain, chat("hi", "hello")), lambda: prompt_ids(plain, chat("hi", "x")[:1])):
        with pytest.raises(DataError, match="has no chat template.*set tokenizer.chat_template"):
            call()


# ----- Loading sources ------------------------------------------------------------------------

PAIRS = [{"prompt": f"Repeat exactly: apple {i}", "response": f"apple {i}"} for i in range(4)]
MESSAGES = [{"messages": chat(r["prompt"], r["response"])} for r in PAIRS]


def write_rows(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
@pytest.mark.parametrize("rows", [PAIRS, MESSAGES], ids=["prompt-response", "messages"])
def test_files_load_and_tokenize_like_the_chat_they_hold(tmp_path, tokenizer, suffix, rows):
    cfg = DataConfig(source=str(write_rows(tmp_path / f"data{suffix}", rows)))
    ds = load_source(cfg)
    assert len(ds) == len(PAIRS)
    got = tokenize_dataset(ds, tokenizer, cfg)
    assert got.samples == [tokenize_chat(tokenizer, chat(r["prompt"], r["response"])) for r in PAIRS]
    assert (got.n_dropped, got.n_truncated) == (0, 0)


def test_column_names_are_configurable(tmp_path, tokenizer):
    rows = [{"question": r["prompt"], "answer": r["response"]} for r in PAIRS]
    cfg = DataConfig(source=str(write_rows(tmp_path / "qa.jsonl", rows)), prompt_column="question",
                     response_column="answer")
    samples = tokenize_dataset(load_source(cfg), tokenizer, cfg).samples
    assert samples[0] == tokenize_chat(tokenizer, chat(PAIRS[0]["prompt"], PAIRS[0]["response"]))


def test_missing_columns_error_names_them_and_the_fix(tmp_path):
    path = write_rows(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as err:
        load_source(DataConfig(source=str(path)))
    message = str(err.value)
    for part in ("'prompt'", "'response'", "'messages'", "['question', 'answer']", "data.prompt_column",
                 "data.response_column", "data.messages_column"):
        assert part in message


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.json", "blank.jsonl", "empty.parquet"])
def test_empty_file_is_an_error(tmp_path, name):
    path = tmp_path / name
    if name.endswith("parquet"):
        datasets.Dataset.from_dict({"prompt": [], "response": []}).to_parquet(str(path))
    else:
        path.write_text("\n\n" if name.startswith("blank") else "")
    with pytest.raises(DataError, match="holds no rows"):
        load_source(DataConfig(source=str(path)))


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_source(DataConfig(source=str(tmp_path / "absent.jsonl")))


def test_broken_json_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n\n" + '{"prompt": "Repeat exactly: apple", "respo\n'
                    + json.dumps(PAIRS[1]) + "\n")
    with pytest.raises(DataError) as err:
        load_source(DataConfig(source=str(path)))
    message = str(err.value)
    assert f"{path} line 3 column 37: not valid JSON (Unterminated string" in message
    assert "data.bad_rows=skip" in message
    assert "column type" not in message and err.value.__cause__ is None  # no misleading chained error


BAD_ROWS = [
    ({"prompt": "Repeat exactly: pear"}, "field 'response' is missing"),
    ({"prompt": "Repeat exactly: 42", "response": 42}, "field 'response' must be a string, got int 42"),
    ({"response": "pear"}, "field 'prompt' is missing"),
    ({"messages": [{"role": "user", "content": "Repeat exactly: pear"}, {"role": "assistant"}]},
     "field 'messages' item 1 must hold string 'role' and 'content', got {'role': 'assistant'"),
    ({"messages": chat("Repeat exactly: pear", "pear")[:1]},
     "field 'messages' must end with the assistant's answer, its last role is 'user'"),
]


@pytest.mark.parametrize("suffix,where", [(".jsonl", "line 3"), (".json", "row 2")])
@pytest.mark.parametrize("row,problem", BAD_ROWS, ids=["no-response", "int-response", "no-prompt",
                                                      "message-without-content", "no-answer-turn"])
def test_bad_row_names_the_file_the_row_and_the_field(tmp_path, suffix, where, row, problem):
    path = write_rows(tmp_path / f"data{suffix}", [PAIRS[0], row, PAIRS[1]])
    if suffix == ".jsonl":  # a blank line: rows and lines differ
        path.write_text(path.read_text().replace("\n", "\n\n", 1))
    with pytest.raises(DataError) as err:
        load_source(DataConfig(source=str(path)))
    assert str(err.value).startswith(f"{path} {where}: {problem}")
    assert "set data.bad_rows=skip" in str(err.value)


def test_bad_rows_skip_leaves_them_out_and_logs_the_count(tmp_path, tokenizer, caplog):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(PAIRS[0]), '{"prompt": "Repeat exactly: apple", "respo'] + [json.dumps(r) for r, _ in BAD_ROWS]
    path.write_text("\n".join(lines + [json.dumps(PAIRS[1])]) + "\n")
    cfg = DataConfig(source=str(path), bad_rows="skip")
    with caplog.at_level("WARNING", logger="leaplm.data.sft"):
        ds = load_source(cfg)
    assert tokenize_dataset(ds, tokenizer, cfg).samples == [tokenize_chat(tokenizer, chat(r["prompt"], r["response"]))
                                                           for r in PAIRS[:2]]
    assert f"skipped {1 + len(BAD_ROWS)} bad rows of {path} (data.bad_rows=skip), kept 2; the first: {path} line 2" \
        in caplog.text
    parquet = write_rows(tmp_path / "data.parquet", [PAIRS[0], {"prompt": "Repeat exactly: pear", "response": None},
                                                      PAIRS[1]])  # loads through datasets; the row check skips
    with caplog.at_level("WARNING", logger="leaplm.data.sft"):
        assert load_source(DataConfig(source=str(parquet), bad_rows="skip")).to_list() == PAIRS[:2]
    assert f"skipped 1 bad rows of {parquet} (data.bad_rows=skip), kept 2; the first: {parquet} row 2: field " \
        "'response' is missing" in caplog.text


def test_prompt_only_rows_load_for_callers_that_make_the_answers(tmp_path, tokenizer):
    rows = [{"prompt": r["prompt"]} for r in PAIRS[:2]] + [{"prompt": PAIRS[2]["prompt"], "response": 3}]
    cfg = DataConfig(source=str(write_rows(tmp_path / "prompts.jsonl", rows[:2])))
    with pytest.raises(DataError, match="needs columns 'prompt' and 'response'"):
        load_source(cfg)  # training needs the answers
    assert [to_messages(row, cfg) for row in load_source(cfg, require_response=False)] == [
        chat(r["prompt"], "")[:1] for r in PAIRS[:2]]
    prompts = choose_prompts(cfg, tokenizer, 0, max_new_tokens=16, seed=0)  # rollouts make the answers
    assert sorted(p.ids for p in prompts) == sorted(prompt_ids(tokenizer, chat(r["prompt"], "")[:1]) for r in PAIRS[:2])
    bad = DataConfig(source=str(write_rows(tmp_path / "mixed.jsonl", rows)))
    with pytest.raises(DataError, match="line 3: field 'response' must be a string, got int 3"):
        load_source(bad, require_response=False)  # a response that is there is still checked


def test_synthetic_source_and_unknown_task(tokenizer):
    ds = load_source(DataConfig(tasks=["copy", "arith"], train_per_task=5))
    assert ds["task"] == ["copy"] * 5 + ["arith"] * 5
    assert ds["response"][:5] == [e.answer for e in make_split("copy", "train", 5)]
    with pytest.raises(DataError, match="unknown synthetic task 'division'.*available: copy, reverse"):
        load_source(DataConfig(tasks=["copy", "division"]))


# ----- Overlong samples -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def overlong_rows(tokenizer):
    """A sample that fits, one with a long response, one whose prompt alone is too long; and the
    max_length that only the first fits."""
    rows = [
        {"prompt": "Repeat exactly: apple", "response": "apple"},
        {"prompt": "Repeat exactly: apple", "response": "apple " * 40},
        {"prompt": "stone " * 60, "response": "stone"},
    ]
    max_length = len(tokenize_chat(tokenizer, chat(rows[0]["prompt"], rows[0]["response"]))["input_ids"])
    return datasets.Dataset.from_list(rows), max_length


def test_overlong_drop_counts_the_dropped(tokenizer, overlong_rows):
    ds, max_length = overlong_rows
    got = tokenize_dataset(ds, tokenizer, DataConfig(max_length=max_length, overlong="drop"))
    assert len(got.samples) == 1 and (got.n_dropped, got.n_truncated) == (2, 0)


def test_overlong_truncate_keeps_the_head_and_drops_what_has_no_target(tokenizer, overlong_rows):
    ds, max_length = overlong_rows
    got = tokenize_dataset(ds, tokenizer, DataConfig(max_length=max_length, overlong="truncate"))
    full = tokenize_chat(tokenizer, chat(ds[1]["prompt"], ds[1]["response"]))
    assert got.samples[1] == {k: v[:max_length] for k, v in full.items()}
    # The third sample's prompt fills max_length: no target is left, so it is dropped (once).
    assert len(got.samples) == 2 and (got.n_dropped, got.n_truncated) == (1, 1)


def test_overlong_error_names_the_sample_and_the_options(tokenizer, overlong_rows):
    ds, max_length = overlong_rows
    with pytest.raises(DataError, match=rf"sample 1 has \d+ tokens > data.max_length={max_length}.*data.overlong"):
        tokenize_dataset(ds, tokenizer, DataConfig(max_length=max_length, overlong="error"))


def test_nothing_fits_is_an_error(tokenizer, overlong_rows):
    ds, max_length = overlong_rows
    with pytest.raises(DataError, match=f"no sample fits data.max_length={max_length}"):
        tokenize_dataset(ds.select([1, 2]), tokenizer, DataConfig(max_length=max_length, overlong="drop"))


# ----- Packing and collation --------------------------------------------------------------------


def sample_lengths(row: dict[str, list[int]]) -> list[int]:
    """Lengths of the samples packed in a row: each starts where its position ids restart at 0."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    return [b - a for a, b in zip(starts, starts[1:])]


def test_packing_is_greedy_lossless_and_bounded(tokenizer):
    samples = [tokenize_chat(tokenizer, chat(e.prompt, e.answer)) for t in TASK_NAMES for e in make_split(t, "train", 4)]
    rows = pack(samples, max_length=128)
    for key in ("input_ids", "labels"):  # in order, nothing lost or added
        assert list(chain.from_iterable(r[key] for r in rows)) == list(chain.from_iterable(s[key] for s in samples))
    assert [n for r in rows for n in sample_lengths(r)] == [len(s["input_ids"]) for s in samples]  # none split
    assert all(len(r["input_ids"]) <= 128 for r in rows)
    # Greedy: a row was closed only because the next sample did not fit in it.
    assert all(len(row["input_ids"]) + sample_lengths(nxt)[0] > 128 for row, nxt in zip(rows, rows[1:]))


def test_pad_collator_shapes_padding_and_target_count():
    samples = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8, 9, 10, 11, 12], "labels": [8, IGNORE_INDEX, IGNORE_INDEX, 11, 12]},
    ]
    batch = PadCollator(pad_token_id=0)(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX], samples[1]["labels"]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    # Targets are labels[:, 1:]: the first token of a row is never predicted, so 2 + 2, not 2 + 3.
    assert batch["n_targets"].item() == 4
    assert "position_ids" not in batch
    inputs = model_inputs(batch)
    assert inputs.keys() == {"input_ids", "attention_mask"} and inputs["attention_mask"] is batch["attention_mask"]


def test_pad_collator_on_packed_rows_gives_the_padding_its_own_positions():
    rows = pack([{"input_ids": [1, 2], "labels": [IGNORE_INDEX, 2]},
                 {"input_ids": [3, 4, 5], "labels": [IGNORE_INDEX, 4, 5]},
                 {"input_ids": [6, 7], "labels": [IGNORE_INDEX, 7]}], max_length=5)
    batch = PadCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].shape == batch["position_ids"].shape == (2, 5)
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 0, 1, 2]]  # row 2: sample, then pad block
    assert batch["n_targets"].item() == 4
    inputs = model_inputs(batch)
    assert inputs["attention_mask"] is None and torch.equal(inputs["position_ids"], batch["position_ids"])
