"""atomic_write when the final rename itself fails (a read-only or vanished folder, a target
that is a folder): the previous file stays as it was and no temporary file is left behind,
just as when the write fails (test_atomic.py covers that half)."""

import os

import pytest

from minipeft.atomic import atomic_write


def test_a_failed_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old contents")

    def replace(src, dst):
        raise OSError("rename refused")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename refused"):
        atomic_write(target, lambda f: f.write(b"new contents"))
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_a_target_that_is_a_folder_is_refused_without_leftovers(tmp_path):
    (tmp_path / "a.bin").mkdir()
    (tmp_path / "a.bin" / "inside").write_bytes(b"kept")
    with pytest.raises(OSError):
        atomic_write(tmp_path / "a.bin", lambda f: f.write(b"data"))
    assert os.listdir(tmp_path) == ["a.bin"]
    assert (tmp_path / "a.bin" / "inside").read_bytes() == b"kept"
