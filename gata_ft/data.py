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
    """Read and validate `directory`/data.json; raise DataError listing what is wrong, by line.

    The file is streamed line by line (memory grows with the rows kept, not the
    file), no line may exceed MAX_LINE_BYTES, and only the first problems are kept.
    """
    directory = Path(directory)
    path = directory if directory.is_file() else directory / DATA_FILE
    if not directory.exists() and not directory.is_symlink():
        raise DataError(
            f"{name} channel: expected a directory holding {DATA_FILE} at {directory}, "
            "but it does not exist."
        )
    if not path.is_file():
        raise DataError(
            f"{name} channel: expected {path} to be a file (JSON Lines, one "
            f'{{"label": int, "text": str}} per line), but {_what_is(path, directory)}.'
        )
    try:
        stream = path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: expected a readable file, found {e.strerror or e}") from e
    with stream:
        encoding = _foreign_encoding(stream.read(4))
        if encoding:
            raise DataError(
                f"{path}: expected UTF-8 text, found {encoding}; save the file as UTF-8."
            )
        stream.seek(0)
        return _validate(stream, path, name, normalize)


def _validate(stream, path: Path, name: str, normalize: bool) -> Split:
    digest = hashlib.sha256()
    texts: list[str] = []
    labels: list[int] = []
    lines: list[int] = []
    problems: list[tuple[int, str]] = []  # the first MAX_PROBLEMS_SHOWN
    total, bad_rows, normalized_rows, empty = 0, 0, 0, True
    validator = _validator()
    for number, line_bytes in enumerate(_lines(stream, digest), start=1):
        empty = empty and not line_bytes
        if number == 1 and line_bytes.startswith(_BOM):
            line_bytes = line_bytes[len(_BOM) :]
        if line_bytes is _TOO_LONG:
            found = [f"a line longer than {MAX_LINE_BYTES:,} bytes: expected one ticket per line"]
        elif not line_bytes.strip():
            continue
        else:
            row, failure = _parse_line(line_bytes)
            found = [failure] if failure else []
            if (
                not found
                and normalize
                and isinstance(row, dict)
                and isinstance(row.get("text"), str)
            ):
                fixed = normalize_text(row["text"])
                normalized_rows += fixed != row["text"]
                row["text"] = fixed
            if not found:
                errors = list(validator.iter_errors(row))
                found = _describe_errors(row, errors, normalize) if errors else []
        if found:
            total += len(found)
            bad_rows += 1
            problems.extend((number, m) for m in found[: MAX_PROBLEMS_SHOWN - len(problems)])
            continue
        texts.append(row["text"])
        labels.append(row["label"])
        lines.append(number)
    if total:
        raise DataError(_problem_report(path, problems, total, bad_rows, len(texts)))
    if not texts:
        what = "is empty" if empty else "holds only blank lines"
        raise DataError(
            f"{path}: the file {what}: expected one JSON object per line, "
            'like {"label": 360001234567, "text": "my card was declined"}.'
        )
    return Split(name, path, texts, labels, lines, digest.hexdigest(), normalized_rows)


_TOO_LONG = b"\0too long"
MAX_LINE_BYTES = 1_000_000  # a ticket is a few KB; a longer line is not a ticket
MAX_DIGITS = 30


def _lines(stream, digest):
    """The file's lines (without their end), hashing every byte; over-long lines as _TOO_LONG."""
    pending, skipping = b"", False
    while chunk := stream.read(1 << 20):
        digest.update(chunk)
        parts = chunk.split(b"\n")
        for part in parts[:-1]:
            yield _TOO_LONG if skipping else pending + part
            pending, skipping = b"", False
        if not skipping:
            pending += parts[-1]
            if len(pending) > MAX_LINE_BYTES:
                pending, skipping = b"", True
    if skipping:
        yield _TOO_LONG
    elif pending:
        yield pending


def _foreign_encoding(first: bytes) -> str | None:
    """A UTF-16 or UTF-32 file, by its byte-order mark or its NUL bytes."""
    marks = {
        b"\xff\xfe\x00\x00": "UTF-32 (byte-order mark FF FE 00 00)",
        b"\x00\x00\xfe\xff": "UTF-32 (byte-order mark 00 00 FE FF)",
        b"\xff\xfe": "UTF-16 little-endian (byte-order mark FF FE)",
        b"\xfe\xff": "UTF-16 big-endian (byte-order mark FE FF)",
    }
    for mark, encoding in marks.items():
        if first.startswith(mark):
            return encoding
    if len(first) >= 2 and (first[0] == 0) != (first[1] == 0):
        return "UTF-16 without a byte-order mark (every other byte is 0)"
    return None


def _what_is(path: Path, directory: Path) -> str:
    """What stands at `path` instead of a regular file."""
    import stat

    if path.is_symlink() and not path.exists():
        return f"it is a symbolic link to {path.readlink()}, which does not exist"
    if not path.exists():
        if not directory.is_dir():
            return f"{directory} is not a directory"
        present = sorted(p.name for p in directory.iterdir())[:10]
        holds = f"the folder holds: {', '.join(present)}" if present else "the folder is empty"
        return f"there is no such file; {holds}"
    mode = path.stat().st_mode
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    link = f" (through a symbolic link to {path.readlink()})" if path.is_symlink() else ""
    return f"it is {kind}{link}"


def _parse_line(line_bytes: bytes) -> tuple[object, str | None]:
    try:
        line = line_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8: byte 0x{line_bytes[e.start]:02x} at column {e.start + 1}"
    try:
        row = json.loads(
            line, object_pairs_hook=_no_duplicate_keys, parse_int=_int, parse_constant=_constant
        )
        return row, None
    except _DuplicateKeyError as e:
        return None, f"field {e.args[0]!r} appears twice in the object"
    except _HugeNumberError as e:
        return None, (
            f"expected numbers of at most {MAX_DIGITS} digits (a label id has 19 at most), "
            f"found one of {e.args[0]:,} digits"
        )
    except _NotJsonError as e:
        return None, f"malformed JSON: {e.args[0]} is not a JSON value"
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and "\r" in line.rstrip("\r"):
            return None, (
                "several objects on one line: lines must end with a line feed (\\n); this "
                "file seems to end them with carriage returns alone (\\r)"
            )
        return None, f"malformed JSON: {e.msg.removesuffix(' at')} (column {e.colno})"
    except RecursionError:
        return None, "malformed JSON: nested too deeply (expected a flat object)"


class _HugeNumberError(ValueError):
    pass


class _NotJsonError(ValueError):
    pass


def _constant(name: str):
    raise _NotJsonError(name)  # NaN, Infinity: Python reads them, JSON has no such values


def _int(digits: str) -> int:
    # Python refuses ints of more than 4,300 digits with a ValueError that names no line
    size = len(digits.lstrip("-"))
    if size > MAX_DIGITS:
        raise _HugeNumberError(size)
    return int(digits)


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
            if kind in ("minimum", "maximum") and isinstance(label, int):
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


def _problem_report(
    path: Path, problems: list[tuple[int, str]], total: int, bad_rows: int, rows_ok: int
) -> str:
    count = "1 problem" if total == 1 else f"{total} problems"
    rows = "1 row" if bad_rows == 1 else f"{bad_rows} rows"
    head = f"{path}: {count} in {rows} ({rows_ok} valid rows):"
    shown = [f"  {path}:{line}: {printable(message)}" for line, message in problems]
    rest = total - len(problems)
    if rest > 0:
        shown.append(f"  ... and {rest} more {'problem' if rest == 1 else 'problems'}")
    report = "\n".join([head, *shown])
    if any("text: expected lower-case" in message for _, message in problems):
        report += "\n" + _NORMALIZE_HINT
    return report


def printable(message: str) -> str:
    """Lone surrogates and other unencodable characters escaped, so the message can print."""
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


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
