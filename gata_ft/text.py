"""Text normalisation shared by training (--normalize-text) and the runtime; stdlib only."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from functools import lru_cache

# characters a translation table remembers; when full it starts again, so that a text
# of many distinct characters costs neither memory nor the common characters' speed
TABLE_LIMIT = 4096


@lru_cache(maxsize=8)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def allowed(char: str, pattern: str) -> bool:
    """Whether `char` alone matches the training-data text pattern."""
    return _allowed(char, pattern)


@lru_cache(maxsize=4096)
def _allowed(char: str, pattern: str) -> bool:
    return _compiled(pattern).fullmatch(char) is not None


class _Table(dict):
    """A str.translate table that works each character out on first sight."""

    def __init__(self, rule: Callable[[str], str]):
        super().__init__()
        self.rule = rule

    def __missing__(self, code: int) -> str:
        value = self.rule(chr(code))
        if len(self) >= TABLE_LIMIT:
            self.clear()
        self[code] = value
        return value


_NOT_COMBINING = _Table(lambda c: "" if unicodedata.combining(c) else c)


@lru_cache(maxsize=8)
def _spaces_for_disallowed(pattern: str) -> _Table:
    matches = _compiled(pattern).fullmatch  # the table is the cache: no second one
    return _Table(lambda c: c if matches(c) else " ")


def normalize(text: str, pattern: str) -> str:
    """Lower-case, strip accents, turn disallowed characters into spaces, collapse white space."""
    decomposed = unicodedata.normalize("NFKD", text)
    if not decomposed.isascii():  # no ASCII character combines
        decomposed = decomposed.translate(_NOT_COMBINING)
    return " ".join(decomposed.lower().translate(_spaces_for_disallowed(pattern)).split())
