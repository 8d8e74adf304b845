"""Validation of large training files: wall time and peak memory of `gata-ft validate`.

Writes seeded files of 100,000 and 1,000,000 valid rows (about 8.5 and 85 MB)
under build/bench/validation and validates each in a fresh process, which
reports its own peak RSS. Run: make bench-validation
"""

from __future__ import annotations

import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from machine import describe

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "build" / "bench" / "validation"
WORDS = [
    "my",
    "card",
    "was",
    "declined",
    "where",
    "is",
    "my",
    "parcel",
    "refund",
    "please",
    "cannot",
    "log",
    "in",
    "invoice",
]


def write(rows: int) -> Path:
    folder = WORK / f"rows-{rows}"
    path = folder / "data.json"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        rng = random.Random(rows)
        with path.open("w") as f:
            for _ in range(rows):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20)))
                f.write(json.dumps({"label": 360000000000 + rng.randint(0, 99), "text": text}))
                f.write("\n")
    return folder


def main() -> None:
    print(describe())
    print(f"{'rows':>10}{'file MB':>9}{'seconds':>9}{'peak RSS MB':>13}")
    for rows in (100_000, 1_000_000):
        folder = write(rows)
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "gata_ft", "validate", str(folder)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        seconds = time.monotonic() - started
        if done.returncode != 0:
            sys.exit(done.stderr)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        size = (folder / "data.json").stat().st_size / 1e6
        print(f"{rows:>10,}{size:>9.1f}{seconds:>9.1f}{peak:>13.0f}")


if __name__ == "__main__":
    main()
