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
