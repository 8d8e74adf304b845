"""The job's report: the evaluate module, the per-queue table, metrics.json and the plots."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from gata_ft import reports
from gata_ft.data import LabelMap


def test_report_is_keyed_by_original_labels_and_written(tmp_path):
    label_map = LabelMap((5, 16066574298652))
    logits = np.array([[2.0, 0.1], [0.1, 3.0], [1.0, 0.0]])
    report = reports.build_report(logits, [0, 1, 1], label_map, loss=0.25)
    assert report.scalars["loss"] == 0.25
    assert report.scalars["accuracy"] == pytest.approx(2 / 3)
    assert report.per_class["16066574298652"] == {
        "precision": 1.0,
        "recall": 0.5,
        "f1": pytest.approx(2 / 3),
        "support": 2,
    }
    paths = reports.write_reports(report, tmp_path / "out")
    assert [p.name for p in paths] == [
        "metrics.json",
        "confusion_matrix.csv",
        "confusion_matrix.png",
    ]
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["confusion_matrix"] == {"labels": [5, 16066574298652], "matrix": [[1, 0], [1, 1]]}
    rows = list(csv.reader((tmp_path / "out" / "confusion_matrix.csv").open()))
    assert rows == [
        ["true\\predicted", "5", "16066574298652"],
        ["5", "1", "0"],
        ["16066574298652", "1", "1"],
    ]
    assert (tmp_path / "out" / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = reports.format_report(report)
    assert "      16066574298652    1.0000    0.5000    0.6667        2" in text


def test_many_labels_print_the_top_confusions():
    label_map = LabelMap(tuple(range(100, 130)))
    logits = np.eye(30)[[1] * 3 + [2] * 2 + list(range(2, 30))]
    truth = [0, 0, 0, 1, 1, *range(2, 30)]
    text = reports.format_report(reports.build_report(logits, truth, label_map, None))
    assert "  true 100 -> predicted 101: 3 tickets" in text
    assert "  true 101 -> predicted 102: 2 tickets" in text


def test_metric_module_loads_with_the_network_off(tmp_path):
    # A fresh interpreter with an empty cache and the Hub forbidden, as under
    # SageMaker network isolation: evaluate must load our module by path.
    code = (
        "from gata_ft import reports;"
        "print(reports.compute([1, 0], [1, 1], num_classes=2)['accuracy'])"
    )
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.5"
