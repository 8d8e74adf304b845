"""The machine a benchmark ran on, printed with its figures: CPU model, cores, SIMD flags."""

from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def describe() -> str:
    """One line: CPU model, core count, and which of the SIMD flags that matter it has."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    lines = text.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines
                  if line.startswith("model name")), platform.processor() or "unknown")  # fmt: skip
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    shown = [f for f in FLAGS if f in flags]
    return (
        f"CPU: {model}, {os.cpu_count()} cores, {platform.machine()}, flags: "
        f"{' '.join(shown) or 'none of ' + ', '.join(FLAGS)}"
    )
