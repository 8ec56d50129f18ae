"""A benchmark results file keeps every script's section; each says which machine and versions
it was measured with, and the header's (the latest writer's) are never lent to another."""

from __future__ import annotations

from tests.test_atomic import _benchmark_common


def test_each_section_names_its_own_machine_or_says_it_was_not_recorded(tmp_path, monkeypatch):
    common = _benchmark_common(monkeypatch)
    doc = {"machine": "CPU B", "versions": {"torch": "2"}, "sections": {
        "old": {"command": "x", "load_average_after": [0, 0, 0], "markdown": "| old |"},  # no record of its own
        "other": {"command": "y", "load_average_after": [0, 0, 0], "machine": "CPU A", "versions": {"torch": "1"},
                  "markdown": "| other |"},
        "latest": {"command": "z", "load_average_after": [0, 0, 0], "machine": "CPU B", "versions": {"torch": "2"},
                   "markdown": "| latest |"}}}
    text = common.render_results(doc)
    sections = {part.split("\n", 1)[0]: part for part in text.split("## ")[1:]}
    assert "its machine and versions were not recorded" in sections["old"]
    assert "(An earlier run, on CPU A: torch 1.)" in sections["other"]
    assert "An earlier run" not in sections["latest"]


def test_a_section_written_again_says_which_run_it_replaces(tmp_path, monkeypatch, capsys):
    common = _benchmark_common(monkeypatch)
    common.write_results("cpu", "train_step", {"a": 1}, "| first |", tmp_path)
    assert "replacing" not in capsys.readouterr().err
    common.write_results("cpu", "inference", {"b": 1}, "| other |", tmp_path)
    common.write_results("cpu", "train_step", {"a": 2}, "| second |", tmp_path)
    assert "replacing" not in capsys.readouterr().err  # this process's own section, rewritten (after each case)
    common._WRITTEN_HERE.clear()  # another process
    common.write_results("cpu", "train_step", {"a": 2}, "| second |", tmp_path)
    said = capsys.readouterr().err
    assert "replacing section 'train_step' of" in said and "inference" not in said
    text = (tmp_path / "cpu.md").read_text()
    assert "| second |" in text and "| other |" in text and "| first |" not in text
