import json
import random
import re
import unicodedata

import pytest
from conftest import write_rows

from gata_ft import text as text_rules
from gata_ft.data import LabelMap, balance_table, normalize_text, read_split, text_pattern
from gata_ft.errors import DataError

GOOD = '{"label": 7, "text": "my card was declined"}'


def write_lines(folder, *lines, raw: bytes | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "data.json"
    path.write_bytes(raw if raw is not None else "\n".join(lines).encode() + b"\n")
    return path


def problem_of(folder, line: str) -> str:
    """The message for one bad line placed second, after a good one."""
    path = write_lines(folder, GOOD, line)
    with pytest.raises(DataError) as info:
        read_split(folder, "train")
    head, first = str(info.value).splitlines()[:2]
    assert head == f"{path}: 1 problem in 1 row (1 valid rows):"
    prefix = f"  {path}:2: "
    assert first.startswith(prefix)
    return first[len(prefix) :]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"label": 1, "text": "hi"', "malformed JSON: Expecting ',' delimiter (column 26)"),
        ("not json", "malformed JSON: Expecting value (column 1)"),
        ('{"text": "hello"}', "missing field 'label'"),
        ('{"label": 1}', "missing field 'text'"),
        (
            '{"label": 1, "text": "hi", "queue": "x"}',
            "unexpected field 'queue': only 'label' and 'text' are allowed",
        ),
        (
            '{"label": 1.5, "text": "hi"}',
            "label: expected a non-negative integer, found 1.5 (a float)",
        ),
        (
            '{"label": 3.0, "text": "hi"}',
            "label: expected a non-negative integer, found 3.0 (a float)",
        ),
        (
            '{"label": "12", "text": "hi"}',
            'label: expected a non-negative integer, found "12" (a string)',
        ),
        (
            '{"label": true, "text": "hi"}',
            "label: expected a non-negative integer, found true (a boolean)",
        ),
        ('{"label": null, "text": "hi"}', "label: expected a non-negative integer, found null"),
        (
            '{"label": -4, "text": "hi"}',
            "label: expected a non-negative integer, found -4 (negative)",
        ),
        (
            '{"label": 9223372036854775808, "text": "hi"}',
            "label: expected a non-negative integer, found 9223372036854775808 (above 2**63 - 1)",
        ),
        ('{"label": 1, "text": ""}', "text: expected some words, found an empty text"),
        ('{"label": 1, "text": "   "}', "text: expected some words, found an empty text"),
        ('{"label": 1, "text": 42}', "text: expected a string, found 42"),
        (
            '{"label": 1, "text": "My card"}',
            "text: expected lower-case a-z, digits, white space and . ? ! only, "
            "found 'M' at position 1 in \"My card\"",
        ),
        (
            '{"label": 1, "text": "refund, please"}',
            "text: expected lower-case a-z, digits, white space and . ? ! only, "
            "found ',' at position 7 in \"refund, please\"",
        ),
        (
            '[1, "hi"]',
            'expected a JSON object like {"label": 360001234567, "text": "..."}, found an array',
        ),
        ('{"label": 1, "label": 2, "text": "hi"}', "field 'label' appears twice in the object"),
    ],
)
def test_each_bad_row_is_named_with_its_reason(tmp_path, line, message):
    assert problem_of(tmp_path / "train", line) == message


def test_invalid_utf8_names_the_byte_and_column(tmp_path):
    raw = GOOD.encode() + b'\n{"label": 1, "text": "caf\xe9"}\n'
    path = write_lines(tmp_path / "train", raw=raw)
    with pytest.raises(DataError) as info:
        read_split(tmp_path / "train", "train")
    assert f"{path}:2: invalid UTF-8: byte 0xe9 at column 26" in str(info.value)


def test_several_problems_in_one_row_are_all_listed(tmp_path):
    path = write_lines(tmp_path / "train", GOOD, '{"label": -1, "text": "Hi", "x": 1}')
    with pytest.raises(DataError) as info:
        read_split(tmp_path / "train", "train")
    lines = str(info.value).splitlines()
    assert lines[0] == f"{path}: 3 problems in 1 row (1 valid rows):"
    assert lines[1] == f"  {path}:2: unexpected field 'x': only 'label' and 'text' are allowed"
    assert lines[2] == f"  {path}:2: label: expected a non-negative integer, found -1 (negative)"
    assert lines[3].startswith(f"  {path}:2: text: expected lower-case")


def test_lists_the_first_20_problems_and_counts_the_rest(tmp_path):
    bad = [f'{{"label": {i}, "text": "Bad"}}' for i in range(25)]
    path = write_lines(tmp_path / "train", GOOD, *bad)
    with pytest.raises(DataError) as info:
        read_split(tmp_path / "train", "train")
    lines = str(info.value).splitlines()
    assert lines[0] == f"{path}: 25 problems in 25 rows (1 valid rows):"
    assert lines[1].startswith(f"  {path}:2: text:")
    assert lines[20].startswith(f"  {path}:21: text:")
    assert lines[21] == "  ... and 5 more problems"
    assert lines[22].startswith(
        "To repair such texts instead of rejecting them, pass --normalize-text"
    )


def test_missing_file_says_what_the_directory_holds(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "train.jsonl").write_text(GOOD)
    with pytest.raises(DataError) as info:
        read_split(folder, "train")
    assert str(info.value) == (
        f"train channel: expected {folder / 'data.json'} to be a file (JSON Lines, one "
        '{"label": int, "text": str} per line), but there is no such file; the folder holds: '
        "train.jsonl."
    )


def test_missing_directory(tmp_path):
    with pytest.raises(DataError) as info:
        read_split(tmp_path / "nope", "test")
    assert str(info.value) == (
        f"test channel: expected a directory holding data.json at {tmp_path / 'nope'}, "
        "but it does not exist."
    )


@pytest.mark.parametrize(
    ("raw", "what"), [(b"", "is empty"), (b"\n  \n\r\n", "holds only blank lines")]
)
def test_empty_file(tmp_path, raw, what):
    path = write_lines(tmp_path / "train", raw=raw)
    with pytest.raises(DataError) as info:
        read_split(tmp_path / "train", "train")
    assert str(info.value) == (
        f"{path}: the file {what}: expected one JSON object per line, "
        'like {"label": 360001234567, "text": "my card was declined"}.'
    )


def test_blank_lines_crlf_and_bom_are_tolerated(tmp_path):
    raw = (
        b"\xef\xbb\xbf"
        + b'{"label": 16066574298652, "text": "hello there"}\r\n'
        + b"\r\n   \n"
        + b'{"label": 5, "text": "two\\nlines?"}\r\n'
    )
    write_lines(tmp_path / "train", raw=raw)
    split = read_split(tmp_path / "train", "train")
    assert split.texts == ["hello there", "two\nlines?"]
    assert split.labels == [16066574298652, 5]
    assert split.lines == [1, 4]


def test_sha256_is_of_the_file_as_written(tmp_path):
    import hashlib

    path = write_lines(tmp_path / "train", GOOD)
    assert (
        read_split(tmp_path / "train", "train").sha256
        == hashlib.sha256(path.read_bytes()).hexdigest()
    )


def test_normalize_repairs_texts_and_counts_them(tmp_path):
    rows = [
        {"label": 1, "text": "My card, was DECLINED!"},
        {"label": 2, "text": "already fine"},
        {"label": 1, "text": "Café  crème — s'il vous plaît"},
    ]
    write_rows(tmp_path / "train", rows)
    split = read_split(tmp_path / "train", "train", normalize=True)
    assert split.texts == ["my card was declined!", "already fine", "cafe creme s il vous plait"]
    assert split.normalized_rows == 2


def test_normalize_still_rejects_texts_that_become_empty(tmp_path):
    path = write_rows(
        tmp_path / "train", [{"label": 1, "text": "ok"}, {"label": 2, "text": "€€ —"}]
    )
    with pytest.raises(DataError) as info:
        read_split(tmp_path / "train", "train", normalize=True)
    assert f"{path}:2: text: expected some words, found an empty text after normalisation" in str(
        info.value
    )


def test_normalize_text_function():
    assert normalize_text("Où est ma CARTE?\tÇa  urge!!") == "ou est ma carte? ca urge!!"


def _normalize_by_the_definition(value: str, pattern: str) -> str:
    decomposed = unicodedata.normalize("NFKD", value)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c)).lower()
    return " ".join("".join(c if re.fullmatch(pattern, c) else " " for c in plain).split())


def test_normalize_equals_its_definition_on_any_unicode():
    pattern = text_pattern().pattern
    hand = [
        "İstanbul ﬁle",
        "\uff26\uff35\uff2c\uff2c \uff57\uff49\uff44\uff54\uff48",  # full-width
        "e\u0301\u0327t\u00e9",
        "ß ǅ ﬀ ½ ™",
        "😀 naïve\x00\u200b",
    ]
    rng = random.Random(0)
    spans = [
        (0, 0x7F), (0x80, 0x2FF), (0x300, 0x36F), (0x370, 0x3000), (0x3000, 0xD7FF),
        (0xD800, 0xDFFF), (0xF900, 0xFFEF), (0x1D400, 0x1D7FF), (0x1F300, 0x1FAFF),
    ]  # fmt: skip
    drawn = [
        "".join(chr(rng.randint(*rng.choice(spans))) for _ in range(rng.randint(0, 40)))
        for _ in range(2_000)
    ]
    for value in hand + drawn:
        assert text_rules.normalize(value, pattern) == _normalize_by_the_definition(value, pattern)


def test_normalize_remembers_a_bounded_number_of_characters():
    pattern = text_pattern().pattern
    many = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 3 * text_rules.TABLE_LIMIT))
    assert text_rules.normalize(many, pattern) == _normalize_by_the_definition(many, pattern)
    table = text_rules._spaces_for_disallowed(pattern)
    assert len(table) <= text_rules.TABLE_LIMIT
    assert len(text_rules._NOT_COMBINING) <= text_rules.TABLE_LIMIT
    assert text_rules.normalize("Card declined", pattern) == "card declined"
    assert ord("c") in table  # full tables start again: the common characters are kept


def test_label_map_keeps_sparse_large_ids(tmp_path):
    rows = [
        {"label": label, "text": "x"} for label in (16066574298652, 360001583912, 3, 360001583912)
    ]
    write_rows(tmp_path / "train", rows)
    label_map = LabelMap.from_split(read_split(tmp_path / "train", "train"))
    assert label_map.labels == (3, 360001583912, 16066574298652)
    assert label_map.class_ids([16066574298652, 3]) == [2, 0]
    assert label_map.id2label == {0: "3", 1: "360001583912", 2: "16066574298652"}
    assert label_map.label2id == {"3": 0, "360001583912": 1, "16066574298652": 2}


def test_fewer_than_two_classes_is_an_error(tmp_path):
    path = write_rows(tmp_path / "train", [{"label": 9, "text": "a"}, {"label": 9, "text": "b"}])
    with pytest.raises(DataError) as info:
        LabelMap.from_split(read_split(tmp_path / "train", "train"))
    assert str(info.value) == (
        f"{path}: a classifier needs at least 2 classes, found 1 (label 9) in 2 rows. "
        "Add examples of the other queues to the training data."
    )


def test_test_labels_unseen_in_training_are_named(tmp_path):
    write_rows(tmp_path / "train", [{"label": 1, "text": "a"}, {"label": 2, "text": "b"}])
    path = write_rows(
        tmp_path / "test",
        [
            {"label": 1, "text": "a"},
            {"label": 7, "text": "b"},
            {"label": 12, "text": "c"},
            {"label": 7, "text": "d"},
        ],
    )
    label_map = LabelMap.from_split(read_split(tmp_path / "train", "train"))
    with pytest.raises(DataError) as info:
        label_map.check_covers(read_split(tmp_path / "test", "test"))
    assert str(info.value) == (
        f"{path}: labels never seen in training: 7 (2 rows, first at line 2), "
        "12 (1 row, first at line 3). The model can only predict the 2 training labels (1, 2); "
        "add training examples for these queues or remove those rows from the test data."
    )


def test_balance_table_shows_counts_and_shares(tmp_path):
    write_rows(tmp_path / "train", [{"label": 1, "text": "a"}] * 3 + [{"label": 20, "text": "b"}])
    write_rows(tmp_path / "test", [{"label": 20, "text": "b"}])
    train = read_split(tmp_path / "train", "train")
    test = read_split(tmp_path / "test", "test")
    table = balance_table(LabelMap.from_split(train), [train, test]).splitlines()
    assert table[1].split() == ["1", "3", "75.0%", "0", "0.0%"]
    assert table[2].split() == ["20", "1", "25.0%", "1", "100.0%"]
    assert table[3].split() == ["total", "4", "1"]


def test_schema_file_is_the_source_of_the_rules():
    from gata_ft.resources import schema_path

    schema = json.loads(schema_path("training-data.schema.json").read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["text"]["pattern"] == r"^[a-z0-9\s\.\?!]+$"
    assert schema["properties"]["label"]["minimum"] == 0
