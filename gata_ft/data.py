"""Read a channel's data.json, validate every row against schemas/, and map labels to classes."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from gata_ft import text
from gata_ft.errors import DataError
from gata_ft.resources import schema_path

DATA_FILE = "data.json"
SCHEMA_FILE = "training-data.schema.json"
MAX_PROBLEMS_SHOWN = 20
_BOM = b"\xef\xbb\xbf"
_NORMALIZE_HINT = (
    "To repair such texts instead of rejecting them, pass --normalize-text "
    "(hyperparameter normalize_text=true): it lower-cases the text and turns "
    "every other disallowed character into a space."
)


@dataclass(frozen=True)
class Split:
    """The validated rows of one channel: texts, original label ids and their source lines."""

    name: str
    path: Path
    texts: list[str]
    labels: list[int]
    lines: list[int]
    sha256: str
    normalized_rows: int = 0

    def __len__(self) -> int:
        return len(self.texts)

    def counts(self) -> Counter[int]:
        return Counter(self.labels)

    def subset(self, rows: list[int], name: str) -> Split:
        """The given rows, under another name (same file, digest and repair count)."""
        return Split(
            name,
            self.path,
            [self.texts[i] for i in rows],
            [self.labels[i] for i in rows],
            [self.lines[i] for i in rows],
            self.sha256,
            self.normalized_rows,
        )


@dataclass(frozen=True)
class LabelMap:
    """Original label ids (Zendesk group ids) in class-id order: class i predicts labels[i]."""

    labels: tuple[int, ...]

    @classmethod
    def from_split(cls, split: Split) -> LabelMap:
        labels = tuple(sorted(set(split.labels)))
        if len(labels) < 2:
            found = f"label {labels[0]}" if labels else "no labels"
            raise DataError(
                f"{split.path}: a classifier needs at least 2 classes, found 1 ({found}) "
                f"in {len(split)} rows. Add examples of the other queues to the training data."
            )
        return cls(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def class_ids(self, labels: Iterable[int]) -> list[int]:
        index = {label: i for i, label in enumerate(self.labels)}
        return [index[label] for label in labels]

    @property
    def id2label(self) -> dict[int, str]:
        return {i: str(label) for i, label in enumerate(self.labels)}

    @property
    def label2id(self) -> dict[str, int]:
        return {str(label): i for i, label in enumerate(self.labels)}

    def check_covers(self, split: Split) -> None:
        """Fail when `split` holds labels the classifier was never trained on."""
        known = set(self.labels)
        unseen: dict[int, list[int]] = {}
        for label, line in zip(split.labels, split.lines, strict=True):
            if label not in known:
                unseen.setdefault(label, []).append(line)
        if not unseen:
            return
        parts = []
        for label in sorted(unseen):
            lines = unseen[label]
            rows = "1 row" if len(lines) == 1 else f"{len(lines)} rows"
            parts.append(f"{label} ({rows}, first at line {lines[0]})")
        raise DataError(
            f"{split.path}: labels never seen in training: {', '.join(parts)}. "
            f"The model can only predict the {len(self)} training labels "
            f"({_short_list(self.labels)}); add training examples for these queues "
            "or remove those rows from the test data."
        )


@dataclass(frozen=True)
class Prepared:
    """The validated splits a job trains, calibrates and evaluates on."""

    train: Split
    test: Split
    label_map: LabelMap
    calibration: Split | None = None
    calibration_channel: bool = False  # the calibration rows are labelled traffic, not a split


@cache
def _validator():
    from jsonschema import Draft202012Validator, validators

    schema = json.loads(schema_path(SCHEMA_FILE).read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    # JSON Schema counts 3.0 as an integer; a label written as a float is a
    # sign of a lossy export (ids above 2**53 lose digits as floats), so only
    # true JSON integers pass.
    checker = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, v: isinstance(v, int) and not isinstance(v, bool)
    )
    strict = validators.extend(Draft202012Validator, type_checker=checker)
    return strict(schema)


@cache
def text_pattern() -> re.Pattern[str]:
    return re.compile(_validator().schema["properties"]["text"]["pattern"])


def _allowed(char: str) -> bool:
    return text.allowed(char, text_pattern().pattern)


def normalize_text(value: str) -> str:
    """Lower-case, strip accents, turn disallowed characters into spaces, collapse white space."""
    return text.normalize(value, text_pattern().pattern)


def read_split(directory: Path | str, name: str, *, normalize: bool = False) -> Split:
    """Read and validate `directory`/data.json; raise DataError listing what is wrong, by line."""
    directory = Path(directory)
    path = directory if directory.is_file() else directory / DATA_FILE
    if not directory.exists():
        raise DataError(
            f"{name} channel: expected a directory holding {DATA_FILE} at {directory}, "
            "but it does not exist."
        )
    if not path.is_file():
        present = sorted(p.name for p in directory.iterdir())[:10]
        found = f"it holds: {', '.join(present)}" if present else "it is empty"
        raise DataError(
            f"{name} channel: expected {path} (JSON Lines, one "
            f'{{"label": int, "text": str}} per line), but there is no such file; {found}.'
        )
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if raw.startswith(_BOM):
        raw = raw[len(_BOM) :]

    texts: list[str] = []
    labels: list[int] = []
    lines: list[int] = []
    problems: list[tuple[int, str]] = []
    normalized_rows = 0
    validator = _validator()
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        if not line_bytes.strip():
            continue
        row, problem = _parse_line(line_bytes)
        if problem:
            problems.append((number, problem))
            continue
        if normalize and isinstance(row, dict) and isinstance(row.get("text"), str):
            fixed = normalize_text(row["text"])
            if fixed != row["text"]:
                normalized_rows += 1
                row["text"] = fixed
        errors = list(validator.iter_errors(row))
        if errors:
            problems.extend((number, msg) for msg in _describe_errors(row, errors, normalize))
            continue
        texts.append(row["text"])
        labels.append(row["label"])
        lines.append(number)

    if problems:
        raise DataError(_problem_report(path, problems, rows_ok=len(texts)))
    if not texts:
        what = "is empty" if not raw else "holds only blank lines"
        raise DataError(
            f"{path}: the file {what}: expected one JSON object per line, "
            'like {"label": 360001234567, "text": "my card was declined"}.'
        )
    return Split(name, path, texts, labels, lines, digest, normalized_rows)


def _parse_line(line_bytes: bytes) -> tuple[object, str | None]:
    try:
        line = line_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8: byte 0x{line_bytes[e.start]:02x} at column {e.start + 1}"
    try:
        return json.loads(line, object_pairs_hook=_no_duplicate_keys), None
    except _DuplicateKeyError as e:
        return None, f"field {e.args[0]!r} appears twice in the object"
    except json.JSONDecodeError as e:
        return None, f"malformed JSON: {e.msg} at column {e.colno}"


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def _describe_errors(row: object, errors: list, normalized: bool) -> list[str]:
    """Turn jsonschema errors for one row into messages that say what was expected and found."""
    if not isinstance(row, dict):
        return [
            'expected a JSON object like {"label": 360001234567, "text": "..."}, '
            f"found {_describe(row)}"
        ]
    messages = []
    for error in sorted(errors, key=lambda e: (list(e.absolute_path), e.validator)):
        field = error.absolute_path[0] if error.absolute_path else None
        kind = error.validator
        if kind == "required":
            for missing in sorted({"label", "text"} - row.keys()):
                messages.append(f"missing field {missing!r}")
        elif kind == "additionalProperties":
            extra = ", ".join(repr(k) for k in sorted(row.keys() - {"label", "text"}))
            messages.append(f"unexpected field {extra}: only 'label' and 'text' are allowed")
        elif field == "label":
            label = row["label"]
            found = _describe(label)
            if kind in ("minimum", "maximum"):
                found += " (negative)" if label < 0 else " (above 2**63 - 1)"
            messages.append(f"label: expected a non-negative integer, found {found}")
        elif field == "text" and kind == "type":
            messages.append(f"text: expected a string, found {_describe(row['text'])}")
        elif field == "text" and not isinstance(row["text"], str):
            continue  # the type error says it; `not` also fails on non-strings
        elif field == "text" and not row["text"].strip():
            after = " after normalisation" if normalized else ""
            messages.append(f"text: expected some words, found an empty text{after}")
        elif field == "text" and kind == "pattern":
            messages.append(_pattern_message(row["text"]))
        else:
            messages.append(error.message)
    return list(dict.fromkeys(messages))


def _pattern_message(text: str) -> str:
    position, char = next((i, c) for i, c in enumerate(text) if not _allowed(c))
    return (
        "text: expected lower-case a-z, digits, white space and . ? ! only, "
        f"found {char!r} at position {position + 1} in {_snippet(text)}"
    )


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"{json.dumps(value)} (a boolean)"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value!r} (a float)"
    if isinstance(value, str):
        return f"{_snippet(value)} (a string)"
    if value is None:
        return "null"
    return "an array" if isinstance(value, list) else "an object"


def _snippet(text: str, limit: int = 40) -> str:
    return json.dumps(text if len(text) <= limit else text[:limit] + "...", ensure_ascii=False)


def _problem_report(path: Path, problems: list[tuple[int, str]], rows_ok: int) -> str:
    bad_rows = len({line for line, _ in problems})
    count = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
    rows = "1 row" if bad_rows == 1 else f"{bad_rows} rows"
    head = f"{path}: {count} in {rows} ({rows_ok} valid rows):"
    shown = [f"  {path}:{line}: {message}" for line, message in problems[:MAX_PROBLEMS_SHOWN]]
    rest = len(problems) - MAX_PROBLEMS_SHOWN
    if rest > 0:
        shown.append(f"  ... and {rest} more {'problem' if rest == 1 else 'problems'}")
    report = "\n".join([head, *shown])
    if any("text: expected lower-case" in message for _, message in problems):
        report += "\n" + _NORMALIZE_HINT
    return report


def _short_list(values: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values) - limit} more)" if len(values) > limit else "")


def balance_table(label_map: LabelMap, splits: Sequence[Split]) -> str:
    """A text table of rows per label and split, with shares, for the job log."""
    counts = [split.counts() for split in splits]
    header = f"{'label':>20}" + "".join(f"{s.name:>16}" for s in splits)
    rows = [header]
    for label in label_map.labels:
        cells = ""
        for split, c in zip(splits, counts, strict=True):
            n = c.get(label, 0)
            cells += f"{n:>8} {100 * n / len(split):5.1f}%  "
        rows.append(f"{label:>20}" + cells.rstrip())
    rows.append(f"{'total':>20}" + "".join(f"{len(s):>8}        " for s in splits).rstrip())
    return "\n".join(rows)
