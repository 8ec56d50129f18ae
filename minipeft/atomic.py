"""Atomic file writes: after a crash (or a power cut) a file is the old one or the new one, never a mix.

    atomic_write(path, lambda f: f.write(data))        # bytes
    atomic_write(path, lambda f: torch.save(obj, f))   # anything that writes to a binary file

The recipe: write a temporary file in the target's folder (a rename is atomic only within one
file system), flush and fsync it so the data is on disk before any name points at it, rename
it over the target (os.replace), then fsync the folder so that the rename itself survives a
crash. A failure before the rename removes the temporary file and leaves the target as it was.
Streaming through `write(f)` means a large object is never held in memory a second time as bytes.

Callers that replace several files together (checkpoint.save_adapter) use the two halves:
write_temp for each file, then their own renames, then fsync_dir.
"""

from __future__ import annotations

import os
import secrets
from typing import BinaryIO, Callable


def write_temp(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> str:
    """Write a new temporary file beside `path` through `write(f)`, on disk; return its name."""
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
