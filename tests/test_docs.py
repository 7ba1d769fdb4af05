"""Docs are tests: the config reference names every field, the README keeps two set-up commands."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from leaplm.config import Config

REPO = Path(__file__).resolve().parents[1]


def _field_paths(cls, prefix=""):
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _field_paths(type(default), f"{path}.")
        else:
            yield path


def test_config_reference_documents_every_field():
    text = (REPO / "docs" / "config.md").read_text()
    missing = []
    for path in _field_paths(Config):
        section, _, key = path.rpartition(".")
        # Fields appear in their section's table as `key`, or as `lora.r` for nested ones.
        short = path.split(".", 1)[1] if "." in path else path
        if f"`{short}`" not in text and f"`{key}`" not in text:
            missing.append(path)
    assert not missing, f"docs/config.md does not document: {missing}"


def test_readme_has_exactly_two_setup_commands():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme.split("## ", 2)[1], flags=re.S)
    commands = [line for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    assert "leaplm quickstart" in commands[0] and "pytest" in commands[1]
    assert all("pip install torch==2.13.0" in c for c in commands)


# ----- recipe pages, decoder reference, links -----------------------------------------------------

DOCS = REPO / "docs"


def _render(value) -> str:
    """A default as the docs write it: YAML spelling inside backticks."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    return str(value)


def _default(field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _has_row(text: str, key: str, default) -> bool:
    """A table row `| `key` | `default` | ...` (a `\\|` inside a cell reads as `|`)."""
    rows = text.replace("\\|", "|")
    return f"| `{key}` | `{_render(default)}` |" in rows


def test_every_recipe_has_a_page_documenting_its_method_settings():
    from leaplm.train.recipes import RECIPE_MODULES, get_recipe

    problems = []
    for name in RECIPE_MODULES:
        page = DOCS / "recipes" / f"{name}.md"
        if not page.is_file():
            problems.append(f"{name}: no docs/recipes/{name}.md")
            continue
        text = page.read_text()
        for section in ("## Files", "## Method settings (`method:`)", "## Results", "## Where it differs"):
            if section not in text:
                problems.append(f"{name}: no section {section!r}")
        for f in dataclasses.fields(get_recipe(name).method_config):
            if not _has_row(text, f.name, _default(f)):
                problems.append(f"{name}: method.{f.name} (default {_render(_default(f))})")
    assert not problems, "recipe pages are missing: " + "; ".join(problems)


def _decoder_sections(text: str) -> dict[str, str]:
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    return {s.splitlines()[0]: s for s in sections}


def test_decoder_reference_documents_every_decoder_and_setting():
    import inspect

    from leaplm.inference.engine import DECODERS, decoder_setting_names

    sections = _decoder_sections((DOCS / "decoders.md").read_text())
    problems = []
    for name, fn in DECODERS.items():
        found = [body for heading, body in sections.items() if f"`{name}`" in heading]
        if not found:
            problems.append(f"{name}: no '## `{name}`' section")
            continue
        params = inspect.signature(fn).parameters
        for setting in decoder_setting_names(name) or []:
            if not _has_row(found[0], setting, params[setting].default):
                problems.append(f"{name}.{setting} (default {_render(params[setting].default)})")
    assert not problems, "docs/decoders.md is missing: " + "; ".join(problems)


def _markdown_files():
    return [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]


def test_docs_links_resolve():
    broken = []
    for page in _markdown_files():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_every_page_is_reachable_from_the_index():
    index = (DOCS / "index.md").read_text()
    linked = {(DOCS / t.split("#", 1)[0]).resolve() for t in re.findall(r"\]\(([^)\s#]+)", index)}
    pages = [p for p in DOCS.glob("*.md") if p.name != "index.md"] + list((DOCS / "recipes").glob("*.md"))
    missing = [str(p.relative_to(REPO)) for p in pages if p.resolve() not in linked]
    assert not missing, f"docs/index.md does not link: {missing}"


def test_docs_name_only_code_files_that_exist():
    """Paths such as `train/ar2bd.py` or `configs/ar2bd/tiny_teacher.yaml` in the docs exist."""
    missing = set()
    for page in _markdown_files():
        text = re.sub(r"<!-- bench-report:start -->.*<!-- bench-report:end -->", "", page.read_text(), flags=re.S)
        code_path = r"`((?:train|losses|models|inference|data|bench|ship|configs|launch)/[\w/.-]+\.(?:py|yaml))"
        for path in re.findall(code_path, text):
            if not (REPO / path).is_file():
                missing.add(f"{page.relative_to(REPO)}: {path}")
    assert not missing, sorted(missing)


def test_docs_cite_papers_not_private_notes():
    bad = []
    for page in _markdown_files():
        for n, line in enumerate(page.read_text().splitlines(), 1):
            if re.search(r"(?<![\w/])shared/|\bissue\b|\bsession\b|the bar\b", line, flags=re.I):
                bad.append(f"{page.relative_to(REPO)}:{n}: {line.strip()[:80]}")
    assert not bad, bad


def test_benchmarks_keep_the_generated_section_markers():
    text = (DOCS / "benchmarks.md").read_text()
    assert text.count("<!-- bench-report:start -->") == 1 and text.count("<!-- bench-report:end -->") == 1
    assert (DOCS / "results" / "report").is_dir()
