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
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return f"corrupt {MARKER}"
    if recorded != fingerprint_:
        return "incompatible: written by a job with other data, labels or hyperparameters"
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        if not isinstance(state.get("global_step"), int):
            return "corrupt trainer_state.json: no global_step"
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        return f"corrupt trainer_state.json: {e}"
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
            if header_len > size - 8:
                return f"corrupt {path.name}: header longer than the file"
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"corrupt {path.name}: {e}"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
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
