"""Preflight: every check that runs before a model is loaded."""

import errno
import json
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_hyperparameters, write_rows

from gata_ft.cli import cli


def test_thin_labels_are_warned_about(tmp_path):
    from dataclasses import replace

    from gata_ft.config import TrainConfig
    from gata_ft.preflight import data_warnings, prepare_data
    from gata_ft.sagemaker import job_paths

    train = [{"label": 7, "text": f"printer jam number {i}"} for i in range(40)]
    train += [{"label": 8, "text": f"lost password {i}"} for i in range(3)]
    test = [{"label": 7, "text": f"paper jam {i}"} for i in range(10)]
    test += [{"label": 8, "text": "reset my password"}] * 2
    write_rows(tmp_path / "train", train)
    write_rows(tmp_path / "test", test)
    paths = job_paths({}, train=tmp_path / "train", test=tmp_path / "test")
    config = TrainConfig()

    warnings = data_warnings(prepare_data(config, paths), config)
    assert warnings[0] == "labels with fewer than 5 training rows, too few to learn: 8"
    assert warnings[1] == "labels with fewer than 5 test rows, too few to evaluate: 8"
    assert warnings[2].startswith("1 of 2 labels give no calibration rows (fewer than 5")
    assert warnings[2].endswith("calibration.json: 8")
    assert len(warnings) == 3

    off = replace(config, calibration_split=0.0)
    assert len(data_warnings(prepare_data(off, paths), off)) == 2  # no calibration, no warning

    write_rows(tmp_path / "train", [r for r in train if r["label"] == 8] + train[:4])
    warnings = data_warnings(prepare_data(config, paths), config)
    assert warnings[-1] == (
        "no label has 5 training rows to spare for the calibration split: "
        "probabilities stay uncalibrated and nothing will be routed automatically"
    )


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fails the test if any model or tokenizer is loaded: preflight must stop the job first."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    loads = []

    def refuse(*args, **kwargs):
        loads.append(args)
        raise AssertionError("a model was loaded before preflight finished")

    for cls in (AutoModelForSequenceClassification, AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    return loads


def stopped_before_loading(sm_env, loads, result, message):
    """The job failed with `message`, loaded nothing and wrote nothing where models go."""
    assert result.exit_code == 1
    assert result.stderr == f"Error: {message}\n"
    assert (sm_env["SM_OUTPUT_DIR"] / "failure").read_text() == message + "\n"
    assert loads == []
    for folder in (sm_env["SM_MODEL_DIR"], sm_env["GATA_CHECKPOINT_DIR"]):
        assert not folder.exists() or list(folder.iterdir()) == []


def train_with(sm_env, hyperparameters):
    write_hyperparameters(sm_env, hyperparameters)
    return CliRunner().invoke(cli, ["train"])


def test_a_custom_recipe_is_checked_as_data(sm_env, tiny_hyperparameters, no_model_loads, tmp_path):
    recipe = tmp_path / "hello.json"
    recipe.write_text(json.dumps({"hello": 1}))
    result = train_with(sm_env, {**tiny_hyperparameters, "export_recipe": str(recipe)})
    stopped_before_loading(
        sm_env,
        no_model_loads,
        result,
        f"export_recipe: recipe {recipe}: unknown fields ['hello'] (expected only name, "
        "description, preset, opset, optimization_level, fuse_attention, quantization, "
        "fallbacks, parity, companion, escalate_below)",
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"preset": "sse4"},
            'preset: expected one of avx2, avx512, avx512_vnni, arm64, found "sse4"',
        ),
        ({"opset": "18"}, 'opset: expected an ONNX opset from 14 to 21, found "18"'),
        (
            {"quantization": {}},
            "quantization: per_channel: expected true or false, found no such field",
        ),
        (
            {"fallbacks": [{"preset": "avx2"}]},
            "fallbacks[0]: label: expected a label, found no such field",
        ),
        (
            {"parity": {"max_accuracy_drop": "1"}},
            'parity: max_accuracy_drop: expected a number of percentage points, found "1"',
        ),
    ],
)
def test_each_recipe_field_is_checked(tmp_path, change, message):
    from gata_ft.errors import ConfigError
    from gata_ft.export.recipe import Recipe

    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({**Recipe.load("avx2").source, **change}))
    with pytest.raises(ConfigError) as info:
        Recipe.load(path)
    where = f"recipe {path}: "
    assert str(info.value) == where + message


def test_max_length_is_checked_against_the_base_config(
    sm_env, tiny_hyperparameters, no_model_loads
):
    result = train_with(sm_env, {**tiny_hyperparameters, "max_length": "512"})
    stopped_before_loading(
        sm_env,
        no_model_loads,
        result,
        "max_length: expected at most 128 (the base model's position limit), found 512",
    )


def test_seed_beyond_32_bits_is_refused(sm_env, tiny_hyperparameters, no_model_loads):
    result = train_with(sm_env, {**tiny_hyperparameters, "seed": str(2**64)})
    stopped_before_loading(
        sm_env,
        no_model_loads,
        result,
        "seed: expected an integer from 0 to 4294967295, found 18446744073709551616",
    )


def test_a_read_only_model_folder_is_found_first(sm_env, tiny_hyperparameters, no_model_loads,
                                                 monkeypatch):  # fmt: skip
    real = tempfile.mkstemp
    model_dir = sm_env["SM_MODEL_DIR"]

    def read_only(*args, dir=None, **kwargs):
        if Path(dir) == model_dir:
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr("gata_ft.preflight.tempfile.mkstemp", read_only)
    result = train_with(sm_env, tiny_hyperparameters)
    stopped_before_loading(
        sm_env,
        no_model_loads,
        result,
        f"{model_dir}: expected a writable folder for model.tar.gz, found it is not: "
        "Read-only file system",
    )


def test_too_little_disk_is_found_first(sm_env, tiny_hyperparameters, no_model_loads, monkeypatch,
                                        tiny_model_dir):  # fmt: skip
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("gata_ft.preflight.shutil.disk_usage", lambda _: usage(10**9, 0, 1000))
    result = train_with(sm_env, tiny_hyperparameters)
    assert result.exit_code == 1
    assert no_model_loads == []
    weights = sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors"))
    need = round((2.5 + 3.0 * 3 + 6.0) * weights / 1e6)  # model.tar.gz, 3 checkpoints, scratch
    assert f"expected at least {need:,} MB of free disk (" in result.stderr
    assert "estimated from the model's weights), found 0 MB free." in result.stderr
    for folder in (sm_env["SM_MODEL_DIR"], sm_env["GATA_CHECKPOINT_DIR"]):
        assert list(folder.iterdir()) == []


def test_the_export_job_checks_before_reading_its_input(tmp_path, trained_artifact,
                                                        no_model_loads, monkeypatch):  # fmt: skip
    out = tmp_path / "out" / "model.tar.gz"
    args = ["export", str(trained_artifact["tarball"]), "-o", str(out)]
    result = CliRunner().invoke(cli, [*args, "--recipe", "sse4"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: recipe 'sse4': expected one of arm64, avx2")
    real = tempfile.mkstemp

    def read_only(*a, dir=None, **kwargs):
        if Path(dir) == out.parent:
            raise OSError(errno.EACCES, "Permission denied", str(dir))
        return real(*a, dir=dir, **kwargs)

    monkeypatch.setattr("gata_ft.preflight.tempfile.mkstemp", read_only)
    result = CliRunner().invoke(cli, args)
    assert result.stderr == (
        f"Error: {out.parent}: expected a writable folder for the exported model.tar.gz, "
        "found it is not: Permission denied\n"
    )
    assert no_model_loads == []
    assert list(out.parent.iterdir()) == []


def test_a_calibration_channel_gets_no_split_warnings(tmp_path):
    from gata_ft.config import TrainConfig
    from gata_ft.preflight import data_warnings, prepare_data
    from gata_ft.sagemaker import job_paths

    train = [{"label": 7, "text": f"printer jam number {i}"} for i in range(40)]
    train += [{"label": 8, "text": f"lost password {i}"} for i in range(40)]
    write_rows(tmp_path / "train", train)
    write_rows(tmp_path / "test", train[::4])
    write_rows(tmp_path / "channel", train[1::4])
    paths = job_paths({}, train=tmp_path / "train", test=tmp_path / "test",
                      calibration=tmp_path / "channel")  # fmt: skip
    config = TrainConfig(fallback_label=8)
    data = prepare_data(config, paths)
    assert data.calibration_channel is True
    assert len(data.train) == 80  # nothing held out of the training rows
    assert data_warnings(data, config) == [
        "20 test texts also appear in the training data; test metrics overstate accuracy on "
        "new tickets"
    ]
