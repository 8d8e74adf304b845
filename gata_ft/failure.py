"""Why a command failed, in one paragraph: the `Error:` line and SageMaker's failure file."""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from gata_ft.errors import GataError, Terminated, WorkerFailed
from gata_ft.files import write_text

FAILURE_LIMIT = 4000  # SageMaker shows the first 1024 characters as FailureReason


def printable(text: str) -> str:
    """Lone surrogates and other unencodable characters escaped, so the text can be written."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def reason_of(error: BaseException) -> str:
    """The failure in words: what was expected, what was found, where."""
    if isinstance(error, GataError | Terminated):
        return str(error)
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (KeyboardInterrupt)"
    if isinstance(error, OSError) and error.errno is not None:
        where = error.filename or "a file"
        found = error.strerror or str(error)
        if error.errno == errno.ENOSPC:
            return (
                f"{where}: expected free space on its disk, found none ({found}); give the job "
                "a larger volume or free some space, then run it again"
            )
        if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return f"{where}: expected to write there, found it is not writable ({found})"
        return f"{where}: {found} (errno {errno.errorcode.get(error.errno, error.errno)})"
    if isinstance(error, MemoryError):
        return "out of memory: give the job an instance with more memory, or smaller batches"
    frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    at = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    return (
        f"unexpected error: {type(error).__name__}: {error}{at} (a bug in gata-ft: please "
        "report it; GATA_DEBUG=1 prints the traceback)"
    )


def show_traceback() -> bool:
    return os.environ.get("GATA_DEBUG", "") not in ("", "0")


def write_failure(path: Path, reason: str) -> str | None:
    """The reason as one paragraph in `path`; None, or why it could not be written."""
    paragraph = " ".join(line.strip() for line in printable(reason).splitlines() if line.strip())
    try:
        write_text(path, (paragraph or "failed")[:FAILURE_LIMIT] + "\n")
    except OSError as e:
        return f"cannot write the failure file {path}: {e.strerror or e}"
    return None


def _terminate(signum, frame):
    raise Terminated(
        "received SIGTERM (SageMaker sends it before a spot interruption and on "
        "StopTrainingJob): stopped; a restarted job resumes from the last checkpoint"
    )


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises Terminated in the main thread, so cleanup runs and the reason is written."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def guard(failure_file: Path | None) -> Iterator[None]:
    """Turn any failure into one `Error: ...` line on stderr, a failure file and exit code 1."""
    try:
        with sigterm_raises():
            yield
        return
    except WorkerFailed as e:  # the worker wrote the failure file already
        reason, failure_file = str(e), None
    except (Exception, KeyboardInterrupt, Terminated) as e:
        if show_traceback():
            traceback.print_exc(file=sys.stderr)
        reason = reason_of(e)
    reason = printable(reason)
    if failure_file is not None:
        problem = write_failure(failure_file, reason)
        if problem:
            click.echo(f"warning: {problem}", err=True)
    click.echo(f"Error: {reason}", err=True)
    sys.exit(1)
