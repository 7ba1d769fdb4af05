"""The synthetic task suite: deterministic from a seed, disjoint splits, each task with a checker.

The families span how strongly answer tokens depend on each other, which is what limits
parallel decoding:

- ``copy``      repeat a span of words (each answer token is a lookup: lowest entropy)
- ``reverse``   reverse a list (lookups at a moving offset)
- ``sort``      sort a list of digits (each token depends on the whole list)
- ``arith``     multi-digit addition with carries and worked steps, ending ``#### <answer>``
                like GSM8K (each step depends on the previous one: a long dependency chain)
- ``word``      templated word problems with two operations, ending ``#### <answer>``
- ``story``     a templated short story (free text: long, fluent, locally predictable)

Every answer is a deterministic function of its prompt, so greedy accuracy can reach 100%
and a checker can be exact. Train and test are drawn from different seeds and the test
prompts are removed from train, so the splits are disjoint.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from typing import Callable

WORDS = (
    "apple river stone cloud tiger lamp green music paper window garden silver rocket candle "
    "forest mirror orange pencil planet bridge castle dragon engine feather guitar harbor island "
    "jacket kettle ladder magnet needle ocean pepper quilt rabbit saddle tunnel violin wagon "
    "yellow zebra anchor basket cactus dolphin"
).split()
NAMES = "Anna Ben Cara Dan Eva Finn Gina Hugo Iris Jack Kate Leo Mia Noah Olive Paul".split()
ANIMALS = "cat dog fox owl bear frog duck mouse horse goat".split()
PLACES = "the forest|a small village|the mountains|a quiet farm|the city|a sunny beach|an old castle|the desert".split("|")
THINGS = "a red ball|an old kite|a blue box|a tiny drum|a paper boat|a gold coin|a wooden flute|a green hat".split("|")
FEELINGS = "happy|brave|curious|kind|clever|shy|gentle|proud".split("|")
ITEMS = "apples|marbles|stickers|books|coins|shells|cards|pens".split("|")


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str  # the full reference response


@dataclass(frozen=True)
class Task:
    name: str
    generate: Callable[[random.Random], Example]
    check: Callable[[str, str], bool]  # (model response, reference response) -> correct
    description: str


def _final_answer(text: str) -> str | None:
    match = re.search(r"####\s*(-?\d+)", text)
    return match.group(1) if match else None


def check_exact(response: str, reference: str) -> bool:
    return response.strip() == reference.strip()


def check_final_number(response: str, reference: str) -> bool:
    """GSM8K-style: the number after ``####`` must match."""
    got = _final_answer(response)
    return got is not None and got == _final_answer(reference)


# ----- Generators ---------------------------------------------------------------------------


# Copy and reverse use at least 8 words so that, a word being at least one token, every task's
# answer has at least 8 tokens (tests/test_data.py checks this floor with the teacher tokenizer).
# Reverse lists are exactly 8 words: reversal is the hardest lookup pattern for a tiny model,
# and a fixed length keeps the task within what the embedded teacher learns in its budget.


def gen_copy(rng: random.Random) -> Example:
    span = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 10)))
    return Example("copy", f"Repeat exactly: {span}", span)


def gen_reverse(rng: random.Random) -> Example:
    items = [rng.choice(WORDS) for _ in range(8)]
    return Example("reverse", f"Reverse the list: {' '.join(items)}", " ".join(reversed(items)))


def gen_sort(rng: random.Random) -> Example:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(6, 10))]
    return Example(
        "sort", f"Sort the digits: {' '.join(map(str, digits))}", " ".join(map(str, sorted(digits)))
    )


def gen_arith(rng: random.Random) -> Example:
    """Addition worked digit by digit, least significant first.

    Each step writes ``x+y+c=s -> partial``: ``partial`` is the previous partial answer with the
    new digit prepended, so every token depends on a few nearby ones and the final answer is a
    copy of the last partial.
    """
    a = rng.randint(10, 999)
    b = rng.randint(10, 999)
    da, db = str(a)[::-1], str(b)[::-1]
    carry, partial, steps = 0, "", []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        partial = str(total % 10) + partial
        steps.append(f"{x}+{y}+{carry}={total} -> {partial}")
        carry = total // 10
    if carry:
        partial = "1" + partial
        steps.append(f"carry 1 -> {partial}")
    assert int(partial) == a + b
    return Example("arith", f"What is {a} + {b}?", "; ".join(steps) + f". #### {a + b}")


def gen_word(rng: random.Random) -> Example:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(2, 19)
    gained = rng.randint(2, 19)
    lost = rng.randint(1, start + gained - 1)
    mid, end = start + gained, start + gained - lost
    prompt = (
        f"{name} has {start} {item}. {name} gets {gained} more and then gives away {lost}. "
        f"How many {item} does {name} have now?"
    )
    answer = f"{name} has {start} + {gained} = {mid} {item}. Then {mid} - {lost} = {end}. #### {end}"
    return Example("word", prompt, answer)


def gen_story(rng: random.Random) -> Example:
    name, animal, place = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(PLACES)
    thing, feeling = rng.choice(THINGS), rng.choice(FEELINGS)
    prompt = f"Write a short story about a {feeling} {animal} named {name} who lives in {place} and finds {thing}."
    answer = (
        f"Once upon a time, there was a {feeling} {animal} named {name}. {name} lived in {place}. "
        f"One day, {name} found {thing}. {name} was very {feeling} and played with it all day. "
        f"The end."
    )
    return Example("story", prompt, answer)


def check_story(response: str, reference: str) -> bool:
    """Free text: every fact of the reference (names, places, things) appears, in order, and it ends."""
    facts = re.findall(r"named (\w+)|lived in ([^.]+)\.|found ([^.]+)\.", reference)
    pos = 0
    for group in facts:
        fact = next(g for g in group if g)
        pos = response.find(fact, pos)
        if pos < 0:
            return False
    return response.strip().endswith("The end.")


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("copy", gen_copy, check_exact, "repeat a span of 8-10 words"),
        Task("reverse", gen_reverse, check_exact, "reverse a list of 8 words"),
        Task("sort", gen_sort, check_exact, "sort 6-10 digits"),
        Task("arith", gen_arith, check_final_number, "add two 2-3 digit numbers with worked carries"),
        Task("word", gen_word, check_final_number, "two-step templated word problem"),
        Task("story", gen_story, check_story, "templated short story with given facts"),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown synthetic task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]


# Split seeds are offset so that train and test streams never share a generator state.
_SPLIT_OFFSET = {"train": 0, "test": 1_000_003}


def make_split(task: str, split: str, n: int, seed: int = 0) -> list[Example]:
    """``n`` distinct examples of ``task``; train excludes every prompt of the test split."""
    if split not in _SPLIT_OFFSET:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    if split == "test" and n > TEST_CAP:
        raise ValueError(f"the test split holds at most {TEST_CAP} examples per task, asked for {n}")
    gen = get_task(task).generate
    rng = random.Random(f"{task}:{seed + _SPLIT_OFFSET[split]}")
    excluded = _test_prompts(task, seed) if split == "train" else frozenset()
    seen: set[str] = set()
    out: list[Example] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"task {task!r} cannot produce {n} distinct {split} examples")
        ex = gen(rng)
        if ex.prompt in seen or ex.prompt in excluded:
            continue
        seen.add(ex.prompt)
        out.append(ex)
    return out


# Train excludes the first TEST_CAP test prompts, whatever test size a caller asks for, so a
# test split of any allowed size is disjoint from train.
TEST_CAP = 1000


@functools.lru_cache(maxsize=None)
def _test_prompts(task: str, seed: int) -> frozenset[str]:
    return frozenset(e.prompt for e in make_split(task, "test", TEST_CAP, seed))
