"""Hostile input and faults: every case ends in one `Error:` line, exit 1, a failure file
naming the problem, and nothing partial left behind; never a traceback.

The corpus grew out of a probe of the job (issue 12): bad data files, bad options,
broken tarballs, signals at each stage and full or read-only disks.
"""

import errno
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_hyperparameters

from gata_ft.cli import cli

GOOD = b'{"label": 7, "text": "my card was declined"}\n{"label": 8, "text": "where is my parcel"}\n'


def row(body: bytes) -> bytes:
    return GOOD + body + b"\n"


# name -> (data.json bytes, a fragment of the expected message)
DATA = {
    "malformed JSON": (row(b'{"label": 7, "text": "hi"'), "Expecting ',' delimiter (column 26)"),
    "not JSON": (row(b"hello"), "malformed JSON: Expecting value (column 1)"),
    "trailing comma": (row(b'{"label": 7, "text": "hi",}'), "malformed JSON: Expecting property"),
    "single quotes": (row(b"{'label': 7}"), "malformed JSON: Expecting property name"),
    "unterminated string": (row(b'{"label": 7, "text": "abc'),
                            "Unterminated string starting (column 22)"),
    "array row": (row(b'[7, "hi"]'), "found an array"),
    "string row": (row(b'"hi"'), 'found "hi" (a string)'),
    "number row": (row(b"7"), "found 7"),
    "null row": (row(b"null"), "found null"),
    "missing label": (row(b'{"text": "hi"}'), "missing field 'label'"),
    "missing text": (row(b'{"label": 7}'), "missing field 'text'"),
    "extra field": (row(b'{"label": 7, "text": "hi", "x": 1}'), "unexpected field 'x'"),
    "duplicate key": (row(b'{"label": 7, "label": 8, "text": "hi"}'), "appears twice"),
    "float label": (row(b'{"label": 7.0, "text": "hi"}'), "found 7.0 (a float)"),
    "string label": (row(b'{"label": "7", "text": "hi"}'), 'found "7" (a string)'),
    "boolean label": (row(b'{"label": true, "text": "hi"}'), "found true (a boolean)"),
    "negative label": (row(b'{"label": -3, "text": "hi"}'), "found -3 (negative)"),
    "label of 2**63": (row(b'{"label": 9223372036854775808, "text": "hi"}'), "above 2**63 - 1"),
    "label of 31 digits": (row(b'{"label": ' + b"1" * 31 + b', "text": "hi"}'),
                           "found one of 31 digits"),
    "label of 5,001 digits": (row(b'{"label": ' + b"9" * 5001 + b', "text": "hi"}'),
                              "expected numbers of at most 30 digits (a label id has 19 at most), "
                              "found one of 5,001 digits"),
    "NaN label": (row(b'{"label": NaN, "text": "hi"}'), "NaN is not a JSON value"),
    "Infinity label": (row(b'{"label": Infinity, "text": "hi"}'), "Infinity is not a JSON value"),
    "label 1e400": (row(b'{"label": 1e400, "text": "hi"}'), "found inf (a float)"),
    "object label": (row(b'{"label": {"id": 7}, "text": "hi"}'), "found an object"),
    "number text": (row(b'{"label": 7, "text": 42}'), "text: expected a string, found 42"),
    "null text": (row(b'{"label": 7, "text": null}'), "text: expected a string, found null"),
    "empty text": (row(b'{"label": 7, "text": ""}'), "found an empty text"),
    "blank text": (row(b'{"label": 7, "text": "   "}'), "found an empty text"),
    "upper-case text": (row(b'{"label": 7, "text": "Hi"}'), "found 'H' at position 1"),
    "emoji": (row('{"label": 7, "text": "hi \U0001f600"}'.encode()), "at position 4"),
    "lone surrogate": (row(b'{"label": 7, "text": "ab\\ud800cd"}'),
                       "found '\\ud800' at position 3"),
    "NUL byte": (row(b'{"label": 7, "text": "a\x00b"}'), "Invalid control character (column 24)"),
    "invalid UTF-8": (row(b'{"label": 7, "text": "caf\xe9"}'), "invalid UTF-8: byte 0xe9"),
    "UTF-16 LE": (GOOD.decode().encode("utf-16"), "found UTF-16 little-endian (byte-order mark"),
    "UTF-16 BE": (b"\xfe\xff" + GOOD.decode().encode("utf-16-be"), "found UTF-16 big-endian"),
    "UTF-16 without mark": (GOOD.decode().encode("utf-16-le"), "UTF-16 without a byte-order"),
    "UTF-32": (GOOD.decode().encode("utf-32"), "found UTF-32"),
    "100,000 brackets": (row(b"[" * 100_000 + b"]" * 100_000), "nested too deeply"),
    "deep text": (row(b'{"label": 7, "text": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
                  "nested too deeply"),
    "line over 1 MB": (row(b'{"label": 7, "text": "' + b"a" * 1_200_000 + b'"}'),
                       "a line longer than 1,000,000 bytes"),
    "carriage returns only": (b'{"label": 7, "text": "a"}\r{"label": 8, "text": "b"}\r',
                              "end them with carriage returns alone"),
    "empty file": (b"", "the file is empty"),
    "blank lines only": (b"\n  \n\n", "holds only blank lines"),
    "one label only": (b'{"label": 7, "text": "a"}\n{"label": 7, "text": "b"}\n',
                       "a classifier needs at least 2 classes, found 1 (label 7)"),
    "many bad rows": (GOOD + b'{"label": 7, "text": "Bad"}\n' * 5000,
                      "... and 4980 more problems"),
}  # fmt: skip


def special_files(folder: Path):
    """data.json that is not a regular file: (name, make, expected fragment)."""
    return [
        ("a directory", lambda p: p.mkdir(), "it is a directory"),
        ("a FIFO", lambda p: os.mkfifo(p), "it is a named pipe (FIFO)"),
        ("a link to /dev/zero", lambda p: p.symlink_to("/dev/zero"),
         "it is a character device (through a symbolic link to /dev/zero)"),
        ("a dangling link", lambda p: p.symlink_to(folder / "gone.json"),
         f"it is a symbolic link to {folder / 'gone.json'}, which does not exist"),
        ("missing", lambda p: None, "there is no such file; the folder is empty"),
    ]  # fmt: skip


def assert_one_clean_error(result, fragment: str, failure: Path | None = None):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(error_lines) == 1, result.stderr
    assert fragment in result.stderr
    if failure is not None:
        text = failure.read_text(encoding="utf-8")
        assert text.strip(), "the failure file is empty"
        assert fragment.splitlines()[0] in text or fragment in text.replace("\\\\", "\\")


@pytest.mark.parametrize("name", list(DATA))
def test_bad_data_is_one_clean_error_in_validate_and_train(name, tmp_path, sm_env, no_model):
    content, fragment = DATA[name]
    train = sm_env["SM_CHANNEL_TRAIN"]
    (train / "data.json").write_bytes(content)
    validate = CliRunner().invoke(cli, ["validate", str(train), str(sm_env["SM_CHANNEL_TEST"])])
    assert_one_clean_error(validate, fragment)
    result = CliRunner().invoke(cli, ["train"])
    assert_one_clean_error(result, fragment, sm_env["SM_OUTPUT_DIR"] / "failure")
    assert list(sm_env["SM_MODEL_DIR"].iterdir()) == []


@pytest.mark.parametrize("case", range(5))
def test_data_json_that_is_not_a_file(case, sm_env, no_model):
    train = sm_env["SM_CHANNEL_TRAIN"]
    (train / "data.json").unlink()
    _, make, fragment = special_files(train)[case]
    make(train / "data.json")
    result = CliRunner().invoke(cli, ["train"])
    assert_one_clean_error(result, fragment, sm_env["SM_OUTPUT_DIR"] / "failure")


@pytest.fixture
def no_model(monkeypatch):
    """Bad input must stop the job before any model is loaded."""
    from transformers import AutoModelForSequenceClassification

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", refuse)


# hyperparameters.json -> a fragment of the expected message
OPTIONS = {
    "seed 2**64": ({"seed": str(2**64)}, "seed: expected an integer from 0 to 4294967295"),
    "negative seed": ({"seed": "-1"}, "seed: expected an integer from 0 to 4294967295"),
    "seed of 5,000 digits": ({"seed": "9" * 5000}, "seed: expected an integer, found"),
    "learning rate text": ({"learning_rate": "fast"}, "learning_rate: expected a number"),
    "learning rate nan": ({"learning_rate": "nan"}, "learning_rate: expected a number"),
    "learning rate inf": ({"learning_rate": "inf"}, "learning_rate: expected a number"),
    "learning rate 2": ({"learning_rate": "2"}, "learning_rate: expected a number between 0 and 1"),
    "batch size 0": ({"per_device_train_batch_size": "0"}, "expected at least 1, found 0"),
    "batch size float": ({"per_device_train_batch_size": "16.5"}, "expected an integer"),
    "epochs 0": ({"num_train_epochs": "0"}, "num_train_epochs: expected a number above 0"),
    "boolean maybe": ({"fp16": "maybe"}, "fp16: expected true or false"),
    "fp16 and bf16": ({"fp16": "true", "bf16": "true"}, "fp16 and bf16 are both true"),
    "fp16 on a CPU": ({"fp16": "true"}, "fp16: expected a CUDA GPU"),
    "unknown metric": ({"metric_for_best_model": "auc"}, "metric_for_best_model: expected one"),
    "unknown scheduler": ({"lr_scheduler_type": "zigzag"}, "lr_scheduler_type: expected one"),
    "max length 4": ({"max_length": "4"}, "max_length: expected an integer from 8 to 8192"),
    "max length over the model": ({"max_length": "512"}, "expected at most 128"),
    "calibration split 0.9": ({"calibration_split": "0.9"}, "calibration_split: expected"),
    "target 1.5": ({"target_accuracy": "1.5"}, "target_accuracy: expected a number above 0"),
    "expected out of scope 0.95": ({"expected_out_of_scope": "0.95"},
                                   "expected_out_of_scope: expected a number from 0 to 0.9"),
    "fallback not a training label": ({"fallback_label": "12"},
                                      "fallback_label: expected one of the training labels"),
    "unknown recipe": ({"export_recipe": "sse4"}, "export_recipe: recipe 'sse4': expected one"),
    "recipe is a directory": ({"export_recipe": "/tmp/"}, "export_recipe: recipe"),
    "base model missing": ({"base_model": "/nonexistent/model"}, "no such directory"),
    "base model not cached": ({"base_model": "org/none"}, "neither a local directory"),
    "label smoothing 1": ({"label_smoothing_factor": "1"}, "label_smoothing_factor: expected"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(OPTIONS))
def test_bad_options_are_one_clean_error_before_loading(name, sm_env, tiny_hyperparameters,
                                                        no_model):  # fmt: skip
    values, fragment = OPTIONS[name]
    write_hyperparameters(sm_env, {**tiny_hyperparameters, **values})
    result = CliRunner().invoke(cli, ["train"])
    assert_one_clean_error(result, fragment, sm_env["SM_OUTPUT_DIR"] / "failure")
    assert list(sm_env["SM_MODEL_DIR"].iterdir()) == []


# the hyperparameters file itself -> a fragment of the expected message
FILES = {
    "invalid JSON": (b"{not json", "expected a JSON object of hyperparameters, found invalid"),
    "an array": (b"[1, 2]", "expected a JSON object of hyperparameters, found list"),
    "deeply nested": (b"[" * 100_000 + b"]" * 100_000, "found invalid JSON: nesting too deep"),
    "over 1 MB": (b'{"seed": "' + b"1" * 1_100_000 + b'"}', "of at most 1,000,000 bytes"),
    "UTF-16": ('{"seed": "1"}'.encode("utf-16"), "expected a JSON object of hyperparameters"),
}


@pytest.mark.parametrize("name", list(FILES))
def test_a_broken_hyperparameters_file_is_one_clean_error(name, sm_env, no_model):
    content, fragment = FILES[name]
    (sm_env["SM_INPUT_CONFIG_DIR"] / "hyperparameters.json").write_bytes(content)
    result = CliRunner().invoke(cli, ["train"])
    assert_one_clean_error(result, fragment, sm_env["SM_OUTPUT_DIR"] / "failure")


def test_a_missing_hyperparameters_file_named_on_the_command_line(sm_env, tmp_path, no_model):
    missing = tmp_path / "nope.json"
    result = CliRunner().invoke(cli, ["train", "--hyperparameters", str(missing)])
    assert_one_clean_error(
        result,
        f"{missing}: expected a JSON file of hyperparameters, but it does not exist",
        sm_env["SM_OUTPUT_DIR"] / "failure",
    )


# --- signals at each stage: one Error line, a failure file, nothing partial ------------


def sigterm_when(monkeypatch, target: str):
    """Send this process SIGTERM when `target` (module.attribute) is called."""
    import importlib

    module, name = target.rsplit(".", 1)
    try:
        owner = importlib.import_module(module)
    except ModuleNotFoundError:  # a class's method: module.Class.method
        module, cls = module.rsplit(".", 1)
        owner = getattr(importlib.import_module(module), cls)
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


STAGES = {
    "validating data": "gata_ft.preflight.read_split",
    "loading the model": "gata_ft.train.load_model",
    "after train_loss, in the report": "gata_ft.reports.write_reports",
    "in the export": "gata_ft.export.graphs.export_fp32",
    # inside library code wrapped in `except Exception`: SIGTERM must not be taken for
    # the library's own failure (reworded, or swallowed and the export carried on)
    "inside from_pretrained": "transformers.AutoModelForSequenceClassification.from_pretrained",
    "inside shape inference": (
        "onnxruntime.tools.symbolic_shape_infer.SymbolicShapeInference.infer_shapes"
    ),
    "writing the tarball": "gata_ft.archive._add",
}


@pytest.mark.job
@pytest.mark.parametrize("stage", list(STAGES))
def test_sigterm_at_any_stage_ends_cleanly_and_the_rerun_completes(
    stage, sm_env, tiny_hyperparameters, monkeypatch, tmp_path
):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    write_hyperparameters(sm_env, tiny_hyperparameters)
    with monkeypatch.context() as patch:
        sigterm_when(patch, STAGES[stage])
        result = CliRunner().invoke(cli, ["train"])
    assert_one_clean_error(result, "received SIGTERM", sm_env["SM_OUTPUT_DIR"] / "failure")
    reason = (sm_env["SM_OUTPUT_DIR"] / "failure").read_text()
    assert reason.startswith("received SIGTERM"), reason  # not reworded as another failure
    assert list(sm_env["SM_MODEL_DIR"].iterdir()) == []
    assert list(scratch.iterdir()) == []  # no staging folder, no extraction left
    again = CliRunner().invoke(cli, ["train"])
    assert again.exit_code == 0, again.output
    assert [p.name for p in sm_env["SM_MODEL_DIR"].iterdir()] == ["model.tar.gz"]


def test_a_partial_tarball_of_a_killed_run_is_removed(sm_env, tiny_hyperparameters, no_model):
    import subprocess

    # as SIGKILL would leave it; its PID runs (PID 1 always does), but nobody holds its lock
    stale = sm_env["SM_MODEL_DIR"] / ".model.tar.gz.partial-1"
    stale.write_bytes(b"x" * 1000)
    # another export writing beside us holds its partial's lock
    live = sm_env["SM_MODEL_DIR"] / ".model.tar.gz.partial-4242"
    live.write_bytes(b"y" * 1000)
    hold = "import fcntl, sys, time; f = open(sys.argv[1], 'ab'); fcntl.flock(f, fcntl.LOCK_EX); "
    running = subprocess.Popen(
        [sys.executable, "-c", hold + "print('locked', flush=True); time.sleep(60)", str(live)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert running.stdout.readline() == "locked\n"
    write_hyperparameters(sm_env, {**tiny_hyperparameters, "fallback_label": "12"})
    try:
        result = CliRunner().invoke(cli, ["train"])
    finally:
        running.kill()
        running.wait()
    # the job stopped at preflight (no such fallback label), after the clean-up
    assert_one_clean_error(result, "fallback_label")
    assert not stale.exists()
    assert live.read_bytes() == b"y" * 1000


# --- full and read-only disks, simulated by patching the writes --------------------------


def enospc(path):
    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    return fail


def enospc_in_tarball(tar, *args):
    """archive._add failing as a full disk does, naming the partial file being written."""
    raise OSError(errno.ENOSPC, "No space left on device", tar.fileobj.fileobj.name)


@pytest.mark.job
def test_a_full_disk_in_the_model_folder(sm_env, tiny_hyperparameters, monkeypatch):
    write_hyperparameters(sm_env, tiny_hyperparameters)
    monkeypatch.setattr("gata_ft.archive._add", enospc_in_tarball)
    result = CliRunner().invoke(cli, ["train"])
    # the partial file of this process, named as atomic_path writes it
    target = sm_env["SM_MODEL_DIR"] / f".model.tar.gz.partial-{os.getpid()}"
    assert_one_clean_error(
        result, f"{target}: expected free space on its disk, found none (No space left",
        sm_env["SM_OUTPUT_DIR"] / "failure",
    )  # fmt: skip
    assert list(sm_env["SM_MODEL_DIR"].iterdir()) == []


@pytest.mark.job
def test_a_full_disk_in_the_output_folder_leaves_no_empty_file(sm_env, tiny_hyperparameters,
                                                               monkeypatch):  # fmt: skip
    write_hyperparameters(sm_env, tiny_hyperparameters)
    metrics = sm_env["SM_OUTPUT_DATA_DIR"] / "metrics.json"
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith(".metrics.json"):
            real(self, "")  # the file is created, then the write fails
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    result = CliRunner().invoke(cli, ["train"])
    assert_one_clean_error(result, "expected free space on its disk",
                           sm_env["SM_OUTPUT_DIR"] / "failure")  # fmt: skip
    assert not metrics.exists()
    assert not list(sm_env["SM_OUTPUT_DATA_DIR"].glob(".metrics.json*"))


@pytest.mark.job
def test_a_full_disk_while_checkpointing_removes_the_half_checkpoint(
    sm_env, tiny_hyperparameters, monkeypatch
):
    from transformers import Trainer

    write_hyperparameters(sm_env, tiny_hyperparameters)
    optimizer = sm_env["GATA_CHECKPOINT_DIR"] / "checkpoint-8" / "optimizer.pt"
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", enospc(optimizer))
    result = CliRunner().invoke(cli, ["train"])
    assert_one_clean_error(result, "checkpoint-8/optimizer.pt: expected free space",
                           sm_env["SM_OUTPUT_DIR"] / "failure")  # fmt: skip
    assert not (sm_env["GATA_CHECKPOINT_DIR"] / "checkpoint-8").exists()
    assert list(sm_env["SM_MODEL_DIR"].iterdir()) == []


def test_a_read_only_output_folder_is_found_before_loading(sm_env, tiny_hyperparameters,
                                                           monkeypatch, no_model):  # fmt: skip
    real = tempfile.mkstemp
    output = sm_env["SM_OUTPUT_DATA_DIR"]

    def read_only(*args, dir=None, **kwargs):
        if Path(dir) == output:
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr("gata_ft.preflight.tempfile.mkstemp", read_only)
    write_hyperparameters(sm_env, tiny_hyperparameters)
    result = CliRunner().invoke(cli, ["train"])
    assert_one_clean_error(result, f"{output}: expected a writable folder for metrics and plots",
                           sm_env["SM_OUTPUT_DIR"] / "failure")  # fmt: skip


def test_a_failure_reason_with_a_lone_surrogate_is_written(tmp_path):
    from gata_ft.failure import write_failure

    path = tmp_path / "failure"
    assert write_failure(path, "bad text 'ab\ud800cd'\nsecond line") is None
    assert path.read_text(encoding="utf-8") == "bad text 'ab\\ud800cd' second line\n"


def test_an_unexpected_error_is_one_line_without_a_traceback(sm_env, tiny_hyperparameters,
                                                             monkeypatch):  # fmt: skip
    def boom(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("gata_ft.preflight.prepare_data", boom)
    write_hyperparameters(sm_env, tiny_hyperparameters)
    result = CliRunner().invoke(cli, ["train"])
    assert_one_clean_error(result, "unexpected error: ZeroDivisionError: division by zero at ",
                           sm_env["SM_OUTPUT_DIR"] / "failure")  # fmt: skip
    assert "GATA_DEBUG=1 prints the traceback" in result.stderr


# --- corrupt checkpoints: moved to skipped/, never a crash loop --------------------------


def corrupt_variants():
    import struct

    def header(body: bytes):
        return lambda p: p.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 8)

    return {
        "header of brackets": header(b"[" * 64),
        "no data_offsets": header(json.dumps({"w": {"dtype": "F32", "shape": [2]}}).encode()),
        "header not an object": header(b"[1, 2, 3]"),
        "offsets not numbers": header(json.dumps({"w": {"data_offsets": ["a", "b"]}}).encode()),
        "header longer than the file": lambda p: p.write_bytes(struct.pack("<Q", 10**12)),
        "truncated": lambda p: p.write_bytes(p.read_bytes()[:-4]),
        "empty": lambda p: p.write_bytes(b""),
        "not safetensors at all": lambda p: p.write_bytes(b"\xff" * 64),
    }


@pytest.mark.parametrize("name", list(corrupt_variants()))
def test_a_corrupt_checkpoint_is_set_aside(name, tmp_path):
    from test_checkpoints import make_checkpoint

    from gata_ft import checkpoints

    make_checkpoint(tmp_path, 10)
    bad = make_checkpoint(tmp_path, 20)
    corrupt_variants()[name](bad / "model.safetensors")
    warnings = []
    chosen = checkpoints.select_resume(tmp_path, "fp", warnings.append)
    assert chosen == tmp_path / "checkpoint-10"
    assert len(warnings) == 1
    assert "checkpoint-20: corrupt model.safetensors" in warnings[0]
    assert [p.name[:14] for p in (tmp_path / "skipped").iterdir()] == ["checkpoint-20-"]
