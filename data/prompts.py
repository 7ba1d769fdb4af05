"""Real prompts built offline from the Python standard library: no download, deterministic.

Three sources (``data.source``):

- ``stdlib_code``  complete a function or method: the prompt shows its signature and docstring,
                   the response is its real body in a code block
- ``stdlib_chat``  instructions: explain a function (answer: its docstring's first paragraph),
                   say what a module provides (the module docstring's first paragraph), or write
                   a function from the first sentence of its docstring (answer: its source)
- ``stdlib``       both, interleaved

The library is read from the interpreter's own source files with ``ast``, never imported: building
has no side effects and does not depend on which C extensions this install has. It takes about a
second and is kept in memory for the rest of the process.

A function, method or module is in the test split when a SHA-256 hash of its qualified name falls
in the first ``TEST_FRACTION`` of the range, so the splits never share one, whatever the seed; the
seed only orders and subsamples the rows (and picks each chat prompt's wording). The rows follow
the Python version: the library's code changes between releases.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import random
import re
import sys
import sysconfig
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

KINDS = ("stdlib_code", "stdlib_chat")
SOURCES = ("stdlib", *KINDS)
TEST_FRACTION = 0.1

# Tests, GUIs and demos, deprecated packages, bundled wheels, generated data and jokes: none of it
# is library code worth imitating.
_SKIPPED = frozenset({"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "distutils", "ensurepip",
                      "pydoc_data", "this", "antigravity"})
_BODY_LINES = (3, 40)  # a body shorter is trivial, a longer one makes samples too long to train on
_MAX_HEAD_LINES = 30  # decorators, signature and docstring: the prompt
_PARAGRAPH_CHARS = (20, 500)  # a docstring paragraph that answers a question


@dataclass(frozen=True)
class _Function:
    module: str
    owner: str  # the class of a method; "" for a function
    name: str
    signature: str  # name(args)
    head: str  # decorators, signature and docstring as written, dedented to column 0
    body: str  # the rest of the source, in the same indentation
    summary: str  # the docstring's first paragraph as one line; "" when it does not read as an answer

    @property
    def qualname(self) -> str:
        return ".".join(p for p in (self.module, self.owner, self.name) if p)


@dataclass(frozen=True)
class _Module:
    name: str
    summary: str


def stdlib_prompts(kind: str, split: str, n: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """Up to ``n`` rows (``None``: all) of one split of ``kind`` in a seeded order.

    Each row holds ``task`` (the kind), ``id`` (qualified name and template, stable across seeds),
    ``prompt`` (a chat user turn) and ``response``. For ``kind="stdlib"``, ``n`` applies to each
    kind and the rows alternate between them.
    """
    if kind not in SOURCES:
        raise ValueError(f"unknown stdlib prompt kind {kind!r}; use one of {', '.join(SOURCES)}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    if n is not None and n < 0:
        raise ValueError(f"the number of rows must be >= 0 (or None for all), got {n}")
    if kind == "stdlib":
        code, chat = (stdlib_prompts(k, split, n, seed) for k in KINDS)
        pairs = zip(code, chat)
        longer = code[len(chat):] or chat[len(code):]
        return [row for pair in pairs for row in pair] + longer
    rows = [row for qualname, row in _rows(kind, seed) if in_test_split(qualname) == (split == "test")]
    random.Random(f"{kind}:{split}:{seed}").shuffle(rows)
    return rows[:n]


def in_test_split(qualname: str) -> bool:
    """Whether the function, method or module ``qualname`` (e.g. ``json.dumps``) belongs to test."""
    digest = hashlib.sha256(qualname.encode()).digest()
    return int.from_bytes(digest[:8], "big") < TEST_FRACTION * 2**64


def write_prompt_file(path: str | Path, kind: str, split: str, n: int | None = None, seed: int = 0) -> Path:
    """Write ``stdlib_prompts(kind, split, n, seed)`` as JSON lines ``{"id", "prompt"}``, the
    prompt a chat user turn (a prompt file to benchmark decoders on); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in stdlib_prompts(kind, split, n, seed):
            f.write(json.dumps({"id": row["id"], "prompt": row["prompt"]}) + "\n")
    return path


# ----- Rows -----------------------------------------------------------------------------------


def _rows(kind: str, seed: int) -> list[tuple[str, dict[str, str]]]:
    """(qualified name, row) for every candidate of ``kind``, sorted by id."""
    functions, modules = _library()
    out: list[tuple[str, dict[str, str]]] = []

    def add(qualname: str, template: str, prompt: str, response: str) -> None:
        out.append((qualname, {"task": kind, "id": f"{qualname}:{template}", "prompt": prompt,
                               "response": response}))

    for f in functions:
        if kind == "stdlib_code":
            what = f"method of the class `{f.owner}`" if f.owner else "function"
            add(f.qualname, "complete",
                f"Complete this {what} from the Python module `{f.module}`. Reply with the code only.\n\n"
                f"{_code_block(f.head)}", _code_block(f.body))
        elif f.summary:
            # The wording is drawn per row and seed, so a model does not learn one phrasing.
            rng = random.Random(f"{seed}:{f.qualname}")
            noun = "method" if f.owner else "function"
            explain = rng.choice((f"Explain what the Python {noun} `{f.qualname}` does.",
                                  f"What does the {noun} `{f.qualname}` do in Python?"))
            add(f.qualname, "explain", explain, f.summary)
            sentence = _first_sentence(f.summary)
            if sentence:
                where = f"a method `{f.signature}` of the Python class `{f.owner}`" if f.owner \
                    else f"a Python function `{f.signature}`"
                write = rng.choice((f"Write {where} that does the following: {sentence}",
                                    f"Implement {where}. {sentence}"))
                add(f.qualname, "write", write, _code_block(f"{f.head}\n{f.body}"))
    if kind == "stdlib_chat":
        for m in modules:
            rng = random.Random(f"{seed}:{m.name}")
            add(m.name, "module", rng.choice((f"What does the Python module `{m.name}` provide?",
                                             f"Give a short overview of the Python module `{m.name}`.")),
                m.summary)
    return sorted(out, key=lambda pair: pair[1]["id"])


def _code_block(code: str) -> str:
    return f"```python\n{code}\n```"


def _summary(doc: str, name: str) -> str:
    """The first paragraph of a docstring as one line, or "" when it is no answer: too short or
    long, a signature (C-style docstrings start with one) or a doctest."""
    text = " ".join(doc.split("\n\n", 1)[0].split())
    low, high = _PARAGRAPH_CHARS
    if not low <= len(text) <= high or not text[0].isalpha() or text.startswith(f"{name}(") or ">>>" in text:
        return ""
    return text


def _first_sentence(summary: str) -> str:
    """The summary's first sentence, if it is one of at least three words."""
    sentence = re.split(r"(?<=[.!?])\s", summary, maxsplit=1)[0]
    return sentence if sentence[-1] in ".!?" and sentence[0].isupper() and len(sentence.split()) >= 3 else ""


# ----- Reading the library --------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _library() -> tuple[tuple[_Function, ...], tuple[_Module, ...]]:
    """Every usable function, method and module of the standard library, each qualified name once."""
    functions: dict[str, _Function] = {}
    modules: dict[str, _Module] = {}
    for module, path in _module_files():
        try:
            with tokenize.open(path) as f:  # honours a coding cookie; newlines become "\n"
                source = f.read()
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError):
            continue  # distributions ship stray files (e.g. Python 2 samples) that are no library code
        doc = ast.get_docstring(tree)
        summary = _summary(doc, module) if doc else ""
        if summary:
            modules.setdefault(module, _Module(module, summary))
        lines = source.split("\n")  # not splitlines(): ast counts lines at "\n" only, not at form feeds
        for owner, node in _definitions(tree):
            f = _function(module, owner, node, lines)
            if f is not None:
                functions.setdefault(f.qualname, f)  # a name defined twice: the first definition
    return tuple(functions.values()), tuple(modules.values())


def _module_files() -> Iterator[tuple[str, Path]]:
    """(dotted name, file) of every public pure-Python module of the standard library, in order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in _SKIPPED:
            continue
        if (root / f"{top}.py").is_file():
            yield top, root / f"{top}.py"
            continue
        for path in sorted((root / top).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            if (path.parent / "__init__.py").is_file() and not any(p.startswith(("_", "test")) for p in parts):
                yield ".".join(parts), path


def _definitions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(class name or "", definition) of the module's functions and its public classes' methods."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield "", node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield node.name, item


def _function(module: str, owner: str, node: ast.FunctionDef | ast.AsyncFunctionDef,
              lines: list[str]) -> _Function | None:
    """The public, documented definition ``node`` split into head and body, if its size fits."""
    doc = ast.get_docstring(node)
    if node.name.startswith("_") or not doc or len(node.body) < 2:
        return None
    doc_end = node.body[0].end_lineno
    if node.body[1].lineno == doc_end:
        return None  # code on the docstring's line: no clean cut between prompt and answer
    start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    head, body = lines[start - 1:doc_end], lines[doc_end:node.end_lineno]
    while not body[0].strip():
        body.pop(0)
    if not _BODY_LINES[0] <= len(body) <= _BODY_LINES[1] or len(head) > _MAX_HEAD_LINES:
        return None
    indent = lines[node.lineno - 1][:node.col_offset]
    dedented = []
    for line in head + body:
        if not line.startswith(indent) and line.strip():
            return None  # a string literal's line left of the definition: dedenting would change it
        dedented.append(line[len(indent):] if line.startswith(indent) else "")
    return _Function(module, owner, node.name, f"{node.name}({ast.unparse(node.args)})",
                     "\n".join(dedented[:len(head)]), "\n".join(dedented[len(head):]), _summary(doc, node.name))
