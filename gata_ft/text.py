"""Text normalisation shared by training (--normalize-text) and the runtime; stdlib only."""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache


@lru_cache(maxsize=8)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def allowed(char: str, pattern: str) -> bool:
    """Whether `char` alone matches the training-data text pattern."""
    return _allowed(char, pattern)


@lru_cache(maxsize=4096)
def _allowed(char: str, pattern: str) -> bool:
    return _compiled(pattern).fullmatch(char) is not None


def normalize(text: str, pattern: str) -> str:
    """Lower-case, strip accents, turn disallowed characters into spaces, collapse white space."""
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c)).lower()
    return " ".join("".join(c if _allowed(c, pattern) else " " for c in plain).split())
