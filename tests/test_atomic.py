"""Atomic writes (minipeft.atomic) and the files written through them: training checkpoints
and the benchmark results."""

import importlib.util
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from minipeft.atomic import atomic_replace_dir, atomic_write, replace_dir_side_names

ROOT = Path(__file__).resolve().parents[1]


def test_writes_and_replaces_with_the_mode_a_plain_open_gives(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write(target, lambda f: f.write(b"first"))
    atomic_write(target, lambda f: f.write(b"second"))
    assert target.read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["a.bin"]  # no temporary file left behind
    (tmp_path / "plain.bin").write_bytes(b"x")  # the reference: an ordinary write, same umask
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE((tmp_path / "plain.bin").stat().st_mode)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old contents")

    def half_then_fail(f):
        f.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_data_is_synced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write(tmp_path / "a.bin", lambda f: f.write(b"data"))
    assert events == ["fsync file", "rename", "fsync folder"]


def test_a_folder_is_replaced_only_once_its_new_copy_is_on_disk(tmp_path, monkeypatch):
    target = tmp_path / "best"
    atomic_replace_dir(target, lambda folder: (Path(folder) / "w.bin").write_bytes(b"first"))
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append(f"rename {Path(src).name} -> {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_replace_dir(target, lambda folder: (Path(folder) / "w.bin").write_bytes(b"second"))
    assert events == ["fsync file", "fsync file", "fsync folder",  # w.bin and the list of saved files
                      "rename best -> best.old", "rename best.tmp -> best", "fsync folder"]
    assert os.listdir(tmp_path) == ["best"] and (target / "w.bin").read_bytes() == b"second"


def test_a_failed_folder_write_leaves_the_old_folder_and_no_side_folder(tmp_path):
    target = tmp_path / "best"
    atomic_replace_dir(target, lambda folder: (Path(folder) / "w.bin").write_bytes(b"old"))

    def half_then_fail(folder):
        (Path(folder) / "w.bin").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_replace_dir(target, half_then_fail)
    assert os.listdir(tmp_path) == ["best"] and (target / "w.bin").read_bytes() == b"old"
    assert replace_dir_side_names(target) == (str(tmp_path / "best.tmp"), str(tmp_path / "best.old"))


def test_a_folder_holding_files_the_save_would_not_write_is_refused_and_kept(tmp_path):
    target = tmp_path / "best"
    (target / "runs").mkdir(parents=True)
    (target / "notes.txt").write_text("precious")
    (target / "runs" / "r1.log").write_text("x")
    with pytest.raises(FileExistsError, match=r"holds \['notes.txt', 'runs', 'runs/r1.log'\], which this save"):
        atomic_replace_dir(target, lambda folder: (Path(folder) / "w.bin").write_bytes(b"new"))
    assert sorted(os.listdir(tmp_path)) == ["best"]  # no side folder left
    assert (target / "notes.txt").read_text() == "precious" and (target / "runs" / "r1.log").exists()


def test_a_file_is_no_folder_to_replace(tmp_path):
    (tmp_path / "best").write_text("mine")
    with pytest.raises(NotADirectoryError, match="is a file"):
        atomic_replace_dir(tmp_path / "best", lambda folder: None)
    assert (tmp_path / "best").read_text() == "mine" and os.listdir(tmp_path) == ["best"]


def test_the_current_folder_is_replaced_by_its_absolute_name(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    atomic_replace_dir(".", lambda folder: (Path(folder) / "w.bin").write_bytes(b"new"))
    assert os.listdir(tmp_path) == ["out"] and (tmp_path / "out" / "w.bin").read_bytes() == b"new"


def test_training_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    import minipeft.train as train_module
    from tests.test_train import TinyClassifier, loaders

    train_loader, eval_loader = loaders(n_train=32)
    config = train_module.TrainConfig(output_dir=str(tmp_path), epochs=1, log_every=100)
    train_module.train(TinyClassifier(), train_loader, eval_loader, config)
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def save_half_then_die(obj, f):
        f.write(b"half a pickle")
        raise KeyboardInterrupt  # the job is killed while the checkpoint is being written

    monkeypatch.setattr(train_module.torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(TinyClassifier(), train_loader, eval_loader,
                           train_module.TrainConfig(output_dir=str(tmp_path), epochs=1, log_every=100, resume=False))
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def _benchmark_common(monkeypatch):
    spec = importlib.util.spec_from_file_location("benchmarks_common", ROOT / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_results_survive_a_failed_rewrite(tmp_path, monkeypatch):
    common = _benchmark_common(monkeypatch)
    common.write_results("cpu", "first", {"x": 1}, "| a |", results_dir=tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert json.loads(files["cpu.json"])["sections"]["first"]["results"] == {"x": 1}

    def failing_fsync(fd):
        raise OSError("I/O error")  # the disk fails while the new results are being written

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="I/O error"):
        common.write_results("cpu", "second", {"y": 2}, "| b |", results_dir=tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files  # both files as they were
