"""Writing files whole or not at all: a reader never sees half a file, a failure leaves none."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL = ".partial-"


@contextmanager
def atomic_path(destination: Path) -> Iterator[Path]:
    """A temporary path beside `destination`, renamed onto it when the block succeeds.

    The partial file is created first and locked (flock) until the block ends, so
    that `remove_partials` in another process can tell it is being written.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".{destination.name}{PARTIAL}{os.getpid()}")
    try:
        with partial.open("ab") as holder:
            fcntl.flock(holder, fcntl.LOCK_EX)
            yield partial
            partial.replace(destination)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_text(destination: Path, text: str) -> Path:
    """Write `text` (UTF-8) to `destination` atomically."""
    with atomic_path(destination) as partial:
        partial.write_text(text, encoding="utf-8")
    return destination


def remove_partials(folder: Path) -> list[Path]:
    """Delete partial files an interrupted run of ours left in `folder` (.NAME.partial-PID).

    A partial that another process is still writing (it holds the file's lock:
    another export into the same folder) is left alone, whatever its PID.
    """
    removed = []
    if folder.is_dir():
        for path in folder.glob(f".*{PARTIAL}*"):
            if not path.is_file() or path.is_symlink() or _being_written(path):
                continue
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _being_written(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # locked by its writer (BlockingIOError), gone or unreadable: leave it
        return True
    return False
