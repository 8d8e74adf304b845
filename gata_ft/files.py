"""Writing files whole or not at all: a reader never sees half a file, a failure leaves none."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL = ".partial-"


@contextmanager
def atomic_path(destination: Path) -> Iterator[Path]:
    """A temporary path beside `destination`, renamed onto it when the block succeeds."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".{destination.name}{PARTIAL}{os.getpid()}")
    try:
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

    A partial whose process still runs (another export into the same folder) is
    left alone; one of a dead process, or of another machine or container (a
    spot instance's earlier run: its PID is not ours to see), is removed.
    """
    removed = []
    if folder.is_dir():
        for path in folder.glob(f".*{PARTIAL}*"):
            if not path.is_file() or path.is_symlink() or _writer_runs(path):
                continue
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _writer_runs(path: Path) -> bool:
    pid = path.name.rpartition(PARTIAL)[2]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, OverflowError):  # no such process
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
