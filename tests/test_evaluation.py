"""`gata-ft evaluate`: a shipped model scored through the runtime, with the job's report code."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_rows

from gata_ft.cli import cli
from gata_ft.data import read_split
from gata_ft.evaluation import evaluate
from gata_ft.runtime import Model


def test_evaluate_equals_the_jobs_own_test_figures(trained_artifact):
    """Same data, the fp32 graph (PyTorch's numbers to 1e-5): the job's figures again."""
    metadata = json.loads((trained_artifact["dir"] / "metadata.json").read_text())
    job = metadata["metrics"]["test"]
    split = read_split(trained_artifact["data"] / "test", "test")
    result = evaluate(Model.load(trained_artifact["dir"], graph="fp32"), split)
    got = result["metrics"]
    for name in ("accuracy", "f1", "f1_macro", "precision", "recall_macro"):
        assert got[name] == pytest.approx(job[name], abs=1e-9), name
    # the job's loss is before temperature scaling; the shipped graph has it folded in
    assert got["loss"] == result["calibration"]["nll"]
    assert got["per_class"] == job["per_class"]
    calibration = metadata["calibration"]
    if calibration.get("fitted"):
        assert result["calibration"]["ece"] == pytest.approx(
            calibration["test"]["ece_after"], abs=1e-4
        )
        assert result["calibration"]["nll"] == pytest.approx(
            calibration["test"]["nll_after"], abs=1e-4
        )
        routing, test = result["routing"], calibration["routing_test"]
        assert routing["coverage"] == pytest.approx(test["coverage"], abs=1 / len(split))
    assert result["tickets"] == len(split)
    assert result["unknown_labels"] == {}


def test_unknown_labels_are_counted_apart(tmp_path, trained_artifact):
    rows = [json.loads(line) for line in (trained_artifact["data"] / "test" / "data.json").open()]
    rows += [{"label": 777, "text": "a queue added since"}] * 3
    write_rows(tmp_path / "test", rows)
    result = evaluate(Model.load(trained_artifact["dir"]), read_split(tmp_path / "test", "test"))
    assert result["unknown_labels"] == {"777": 3}
    assert result["tickets"] == len(rows) - 3


def test_no_known_label_at_all_is_one_error_line(tmp_path, trained_artifact):
    write_rows(tmp_path / "test", [{"label": 777, "text": "a queue added since"}] * 3)
    result = CliRunner().invoke(
        cli, ["evaluate", str(trained_artifact["dir"]), "--test", str(tmp_path / "test")]
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ")
    assert "expected tickets labelled with the model's queues, found none" in result.stderr
    assert "777" in result.stderr


def test_the_evaluate_command_prints_the_report_or_json(trained_artifact):
    args = ["evaluate", str(trained_artifact["tarball"]), "--test",
            str(trained_artifact["data"] / "test")]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "confusion matrix (rows: true label, columns: predicted label)" in result.stdout
    assert "40 tickets through onnx/model_quantized" in result.stdout
    assert "(onnx/model.onnx below 0.5): accuracy" in result.stdout  # the escalation named
    alone = CliRunner().invoke(cli, [*args, "--no-escalate"])
    assert alone.exit_code == 0, alone.output
    assert "below 0.5" not in alone.stdout
    as_json = CliRunner().invoke(cli, [*args, "--json"])
    report = json.loads(as_json.stdout)
    assert report["model"]["escalate"] == {"graph": "onnx/model.onnx", "below": 0.5}
    assert set(report) >= {"metrics", "calibration", "routing", "unknown_labels", "tickets"}
    assert np.isclose(sum(r["support"] for r in report["metrics"]["per_class"].values()), 40)
