"""The report command rewrites only its own section of the benchmarks page."""

from __future__ import annotations

from leaplm.bench.report import END, START, write_section


def test_write_section_appends_once_then_replaces(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Measured\n\nhand-written\n")
    write_section(doc, "first\n")
    write_section(doc, "second\n")
    text = doc.read_text()
    assert text == f"# Measured\n\nhand-written\n\n{START}\nsecond\n{END}\n"
    doc.write_text(text + "\n## Later notes\n")
    write_section(doc, "third\n")
    assert doc.read_text() == f"# Measured\n\nhand-written\n\n{START}\nthird\n{END}\n## Later notes\n"
