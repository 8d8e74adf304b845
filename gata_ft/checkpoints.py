"""Spot-training checkpoints: which one to resume from, and which to set aside.

The Trainer writes checkpoint-N/ file by file, so a job stopped mid-save
leaves a partial folder. gata-ft adds a marker (gata-checkpoint.json) only
after the Trainer has finished a checkpoint, and records in it a fingerprint
of the data and options; a checkpoint without a matching marker, or whose
files are truncated, is moved to skipped/ (never deleted) and the next older
one is tried.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time
import zipfile
from pathlib import Path

MARKER = "gata-checkpoint.json"
MAX_HEADER_BYTES = 100_000_000
SKIPPED = "skipped"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Files every resumable checkpoint has; torch.save writes zip archives.
_TORCH_FILES = ("optimizer.pt", "scheduler.pt")


def fingerprint(parts: dict) -> str:
    """A stable hash of what must match for a checkpoint to be resumed."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def write_marker(checkpoint: Path, fingerprint_: str, step: int) -> None:
    partial = checkpoint / (MARKER + ".partial")
    partial.write_text(json.dumps({"fingerprint": fingerprint_, "step": step}) + "\n")
    partial.replace(checkpoint / MARKER)


def checkpoints_newest_first(folder: Path) -> list[Path]:
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = _CHECKPOINT.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found, reverse=True)]


def problem(checkpoint: Path, fingerprint_: str) -> str | None:
    """Why `checkpoint` cannot be resumed, or None when it can."""
    marker = checkpoint / MARKER
    if not marker.is_file():
        return f"incomplete: no {MARKER}, so the job stopped while writing it"
    try:
        recorded = json.loads(marker.read_text()).get("fingerprint")
    except (OSError, ValueError, RecursionError, AttributeError):
        return f"corrupt {MARKER}"
    if recorded != fingerprint_:
        return "incompatible: written by a job with other data, labels or hyperparameters"
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        if not isinstance(state.get("global_step"), int):
            return "corrupt trainer_state.json: no global_step"
    except (OSError, ValueError, RecursionError, AttributeError) as e:
        return f"corrupt trainer_state.json: {str(e)[:200]}"
    weights = checkpoint / "model.safetensors"
    why = _safetensors_problem(weights)
    if why:
        return why
    for name in _TORCH_FILES:
        try:
            with zipfile.ZipFile(checkpoint / name) as archive:
                archive.infolist()
        except (OSError, zipfile.BadZipFile) as e:
            return f"corrupt {name}: {e}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """Check that a .safetensors file is whole: its header covers exactly the file's bytes."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                return f"corrupt {path.name}: header longer than the file or than 100 MB"
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            return f"corrupt {path.name}: expected a JSON object as header"
        ends = [
            t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"
        ]  # a missing or malformed entry raises below
        end = max((int(e) for e in ends), default=0)
    except (OSError, struct.error, ValueError, RecursionError, KeyError, TypeError,
            IndexError) as e:  # fmt: skip
        return f"corrupt {path.name}: {type(e).__name__}: {str(e)[:200]}"
    if 8 + header_len + end != size:
        return f"corrupt {path.name}: {size} bytes, expected {8 + header_len + end} (truncated?)"
    return None


def select_resume(folder: Path, fingerprint_: str, warn) -> Path | None:
    """The newest resumable checkpoint in `folder`; unusable newer ones go to skipped/."""
    for checkpoint in checkpoints_newest_first(folder):
        why = problem(checkpoint, fingerprint_)
        if why is None:
            return checkpoint
        target = folder / SKIPPED / f"{checkpoint.name}-{time.strftime('%Y%m%dT%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.rename(target)
        warn(f"skipping checkpoint {checkpoint}: {why}; moved it to {target}")
    return None


def discard_incomplete(folder: Path) -> list[Path]:
    """Delete checkpoints without a marker: ones this job was writing when it failed.

    Used when writing failed (a full disk): they are incomplete by construction
    and hold the space the rerun needs. A restart otherwise moves them to skipped/.
    """
    import shutil

    removed = []
    for checkpoint in checkpoints_newest_first(folder):
        if not (checkpoint / MARKER).is_file():
            shutil.rmtree(checkpoint, ignore_errors=True)
            removed.append(checkpoint)
    return removed
