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
    """Delete partial files an interrupted run of ours left in `folder` (.NAME.partial-PID)."""
    removed = []
    if folder.is_dir():
        for path in folder.glob(f".*{PARTIAL}*"):
            if path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
