"""Atomic file writes: after a crash (or a power cut) a file is the old one or the new one, never a mix.

    atomic_write(path, lambda f: f.write(data))        # bytes
    atomic_write(path, lambda f: torch.save(obj, f))   # anything that writes to a binary file

The recipe: write a temporary file in the target's folder (a rename is atomic only within one
file system), flush and fsync it so the data is on disk before any name points at it, rename
it over the target (os.replace), then fsync the folder so that the rename itself survives a
crash. A failure before the rename removes the temporary file and leaves the target as it was.
Streaming through `write(f)` means a large object is never held in memory a second time as bytes.

Callers that replace several files together (checkpoint.write_adapters) use the two halves:
write_temp for each file, then their own renames, then fsync_dir.

A whole folder (train.save_weights' best weights) cannot be renamed over a folder that has
files in it, so atomic_replace_dir swaps it in two renames and keeps a readable copy at
every moment instead:

    atomic_replace_dir(path, lambda folder: model.save_pretrained(folder))
"""

from __future__ import annotations

import os
import secrets
import shutil
from typing import BinaryIO, Callable

# What atomic_replace_dir filled a folder with, listed inside it: what a later call may delete.
SAVED_FILES = ".saved_files"


def write_temp(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> str:
    """Write a new temporary file beside `path` through `write(f)`, on disk; return its name.

    It is hidden, `.<name>.<random hex>.tmp`, and removed if `write` raises; a process killed
    outright mid-write (SIGKILL, power loss) leaves it behind, never read, to be deleted by hand.
    """
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(8)}.tmp")
    # O_EXCL: never an existing file. Mode 0o666 less the umask, as a plain open() gives
    # (mkstemp's 0600 would make an atomic save readable by fewer people than an ordinary one)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def give_default_mode(path: str | os.PathLike) -> None:
    """Set ``path``'s permissions to what a plain ``open()`` gives (0o666 less the umask): for
    files written by a library that makes them private (safetensors' save_file: 0600). The mode
    is read off a file made beside it, the way open() makes one: reading the umask would mean
    setting it, for every thread of the process, for a moment."""
    probe = write_temp(path, lambda f: None)
    try:
        os.chmod(path, os.stat(probe).st_mode & 0o777)
    finally:
        os.unlink(probe)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the renames in `folder` durable; silently not possible on every platform."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Replace (or create) the file `path` with what `write(f)` writes to a binary file `f`, atomically."""
    tmp = write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def replace_dir_side_names(path: str | os.PathLike) -> tuple[str, str]:
    """The two folders atomic_replace_dir keeps beside `path` while it works (and a crash may
    leave): the new copy being written, `<path>.tmp`, and the previous one moved aside, `<path>.old`."""
    path = os.path.normpath(os.fspath(path))  # "best/" -> "best": the side folders are siblings
    return path + ".tmp", path + ".old"


def atomic_replace_dir(path: str | os.PathLike, write: Callable[[str], object],
                       unlisted_ok: Callable[[str], bool] | None = None) -> None:
    """Replace (or create) the folder `path` with one that `write(folder)` fills.

    The new copy is written in full to `<path>.tmp` and synced, file by file (writers such as
    peft's save_pretrained do not sync), then swapped in: `<path>` is renamed to `<path>.old`,
    `<path>.tmp` to `<path>`, and `<path>.old` is deleted. A crash between the two renames
    leaves no `<path>`, but `<path>.old` (the previous copy, which a reader should then use)
    beside the complete new `<path>.tmp`; the next call removes that `<path>.tmp` (as it does a
    half-written one) and brings `<path>` back.

    The folder lists what it was filled with in `<path>/.saved_files` (one relative path a
    line), so that a later call knows what it may delete: whatever an earlier call wrote, even
    what the new copy leaves out (a model of another kind saved in its place). A `<path>` holding
    anything else (a user's notes, another program's files) is left alone and refused: replacing
    it would delete those silently (``unreplaceable`` lists them). ``unlisted_ok(name)`` judges
    a folder written before the list was kept: whether a path in it is one the caller's earlier
    saves wrote.
    """
    path = os.path.abspath(path)  # "." has no sibling to rename to; its absolute name has
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} is a file, not a folder to save into; choose another path")
    tmp, old = replace_dir_side_names(path)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
        written = sorted(_files_under(tmp))
        with open(os.path.join(tmp, SAVED_FILES), "w") as f:
            f.write("".join(name + "\n" for name in written))
        for folder, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(folder, name), "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(folder)
        foreign = sorted(set(unreplaceable(path, unlisted_ok)) - set(written))
        if foreign:
            raise FileExistsError(
                f"{path} holds {foreign[:5]}{' ...' if len(foreign) > 5 else ''}, which this save would not "
                "write, and replacing the folder would delete them; save into a new or empty folder"
            )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)  # left by a finished swap; <path> is readable
        os.replace(path, old)
    # else a crash mid-swap may have left <path>.old alone: it stays until <path> is back
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(old, ignore_errors=True)


def unreplaceable(path: str | os.PathLike, unlisted_ok: Callable[[str], bool] | None = None) -> list[str]:
    """What ``atomic_replace_dir(path, ...)`` would refuse to delete unless the new copy writes it
    too: every file and folder under `path` (relative to it) that no earlier call put there (in a
    folder without the list, every one that ``unlisted_ok`` does not accept)."""
    if not os.path.isdir(path):
        return []
    listed = os.path.join(path, SAVED_FILES)
    if not os.path.isfile(listed):
        return sorted(name for name in _files_under(os.fspath(path)) if not (unlisted_ok and unlisted_ok(name)))
    with open(listed) as f:
        saved = set(f.read().splitlines()) | {SAVED_FILES}
    return sorted(_files_under(os.fspath(path)) - saved)


def _files_under(folder: str) -> set[str]:
    """Every file and folder under `folder`, as paths relative to it."""
    found = set()
    for parent, folders, files in os.walk(folder):
        found.update(os.path.relpath(os.path.join(parent, name), folder) for name in folders + files)
    return found
