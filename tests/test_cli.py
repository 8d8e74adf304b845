import json

from click.testing import CliRunner
from conftest import write_rows

from gata_ft.cli import cli
from gata_ft.examples import QUEUES, generate


def run(*args, env=None):
    return CliRunner(env=env).invoke(cli, list(args), catch_exceptions=False)


def test_help_lists_the_commands():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("train", "validate", "example", "export", "predict", "serve", "inspect"):
        assert f"  {command} " in result.output
    assert "worker" not in result.output  # internal: torchrun's entry point


def test_inspect_verifies_and_summarises(trained_artifact, tmp_path):
    result = run("inspect", str(trained_artifact["tarball"]))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["format_version"] == 2
    assert {"model.safetensors", "onnx/model.onnx", "onnx/model_quantized.onnx"} <= set(
        summary["files"]
    )
    assert summary["serve"]["graph"] == "onnx/model_quantized.onnx"
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(trained_artifact["tarball"].read_bytes()[:1000])
    result = CliRunner().invoke(cli, ["inspect", str(broken)])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {broken}")


def test_train_help_has_a_flag_per_option():
    result = run("train", "--help")
    assert "--per-device-train-batch-size INT" in result.output
    assert "--gradient-checkpointing / --no-gradient-checkpointing" in result.output
    assert "[default: bert-base-uncased]" in result.output


def test_validate_reports_rows_labels_and_balance(example_data):
    result = run("validate", str(example_data / "train"), str(example_data / "test"))
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == f"ok: {example_data / 'train' / 'data.json'}: 120 rows, 10 labels"
    assert lines[1] == f"ok: {example_data / 'test' / 'data.json'}: 40 rows, 10 labels"
    assert lines[2].split() == ["label", "train", "test"]


def test_validate_defaults_to_the_sagemaker_channels(sm_env):
    result = run("validate")
    assert result.exit_code == 0
    assert str(sm_env["SM_CHANNEL_TRAIN"] / "data.json") in result.stdout


def test_validate_reports_every_bad_directory_and_exits_1(tmp_path):
    good = write_rows(tmp_path / "good", [{"label": 1, "text": "a"}, {"label": 2, "text": "b"}])
    bad = write_rows(tmp_path / "bad", [{"label": 1, "text": "A"}])
    result = run(
        "validate", str(tmp_path / "bad"), str(tmp_path / "missing"), str(tmp_path / "good")
    )
    assert result.exit_code == 1
    assert result.stdout == f"ok: {good}: 2 rows, 2 labels\n"
    assert result.stderr.startswith(f"Error: {bad}: 1 problem in 1 row (0 valid rows):\n")
    assert (
        f"missing channel: expected a directory holding data.json at {tmp_path / 'missing'}"
        in result.stderr
    )


def test_validate_checks_labels_against_the_first_directory(tmp_path):
    write_rows(tmp_path / "train", [{"label": 1, "text": "a"}, {"label": 2, "text": "b"}])
    write_rows(tmp_path / "test", [{"label": 3, "text": "c"}])
    result = run("validate", str(tmp_path / "train"), str(tmp_path / "test"))
    assert result.exit_code == 1
    assert "labels never seen in training: 3 (1 row, first at line 1)" in result.stderr


def test_validate_normalize_counts_repairs(tmp_path):
    write_rows(
        tmp_path / "train", [{"label": 1, "text": "Hello, World"}, {"label": 2, "text": "ok"}]
    )
    result = run("validate", "--normalize-text", str(tmp_path / "train"))
    assert result.exit_code == 0
    assert result.stdout.endswith(": 2 rows, 2 labels, 1 texts normalised\n")


def test_example_is_deterministic_and_valid(tmp_path):
    result = run("example", str(tmp_path / "a"), "--train-per-queue", "5", "--test-per-queue", "2")
    assert result.exit_code == 0
    assert result.stdout.endswith(
        "(50 rows) and " + str(tmp_path / "a" / "test" / "data.json") + " (20 rows), 10 queues\n"
    )
    run("example", str(tmp_path / "b"), "--train-per-queue", "5", "--test-per-queue", "2")
    for split in ("train", "test"):
        assert (tmp_path / "a" / split / "data.json").read_bytes() == (
            tmp_path / "b" / split / "data.json"
        ).read_bytes()
    assert (
        run("validate", str(tmp_path / "a" / "train"), str(tmp_path / "a" / "test")).exit_code == 0
    )


def test_example_into_an_unwritable_place_is_one_error_line(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the folder should go
    result = run("example", str(blocked / "data"))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {blocked}")
    assert "Traceback" not in result.output
    assert len(result.stderr.splitlines()) == 1


def test_example_labels_are_sparse_zendesk_like_ids():
    rows = generate(50, seed=3)
    labels = {row["label"] for row in rows}
    assert labels == set(QUEUES)
    assert 16066574298652 in labels
    assert len({row["text"] for row in rows}) > 0.9 * len(rows)  # varied wording
    assert json.dumps(rows) == json.dumps(generate(50, seed=3))
