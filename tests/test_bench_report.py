"""The report command rewrites only its own section of the benchmarks page, and benches each trained
add-on it is given or says which one it did not measure."""

from __future__ import annotations

import argparse
import shutil

from leaplm.bench import report
from leaplm.bench.report import END, START, write_section
from leaplm.models.heads import DraftHeads, HeadsConfig, attach_heads, save_heads


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


def test_decoder_part_adds_a_row_per_add_on_given_and_a_note_per_one_left_out(tmp_path, tiny, tiny_model_dir,
                                                                             monkeypatch):
    model, _ = tiny("llama")
    export = tmp_path / "medusa"
    shutil.copytree(tiny_model_dir, export)
    config = HeadsConfig(kind="medusa", num_heads=2, hidden_size=model.config.hidden_size,
                         vocab_size=model.config.vocab_size)
    try:
        save_heads(attach_heads(model, DraftHeads(config, model)), export)
    finally:
        del model.draft_heads
    base = str(tiny_model_dir)  # stands in for the teacher: the draft is the target itself
    monkeypatch.setattr(report, "BASE", base)
    monkeypatch.setattr(report, "DECODERS", {base: ["ar"]})
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    args = parser.parse_args(["--n", "1", "--max-new-tokens", "4", "--heads", str(export), "--draft", base])

    text = report.decoder_part(args, tmp_path / "out")
    means, table = text.split("Per task:", 1)
    assert means.count("| medusa |") == means.count("| speculative |") == means.count("| ar |") == 1
    assert f"| {base} + medusa heads | medusa |" in table
    assert f'| {base} | speculative | {{"draft": "{base}"}} |' in table
    assert f"| {base} | ar |" in table and "| hydra |" not in table and "stop_threshold" not in table
    notes = [line for line in text.splitlines() if "not measured" in line]
    assert len(notes) == 5
    assert "--hydra DIR" in notes[0] and "configs/draft_heads/tiny_teacher_hydra_pp.yaml" in notes[0]
    assert "--eagle3 DIR" in notes[1] and "configs/eagle3/tiny_teacher.yaml" in notes[1]
    assert "--clover DIR" in notes[2] and "configs/draft_heads/tiny_teacher_clover2.yaml" in notes[2]
    assert "--kangaroo DIR" in notes[3] and "configs/kangaroo/tiny_teacher.yaml" in notes[3]
    assert "--acceptance-head DIR" in notes[4] and "configs/acceptance_head/tiny_teacher.yaml" in notes[4]
