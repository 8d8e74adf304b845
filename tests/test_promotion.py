"""Champion and challenger: the paired test, the verdict, drift, and the job's promotion step."""

import json
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_hyperparameters

from gata_ft.artifact import verify_tarball
from gata_ft.cli import cli
from gata_ft.data import Split
from gata_ft.promotion import compare_models, drift


class Stub:
    """A model answering from a table: what compare_models needs of the runtime's Model."""

    def __init__(self, labels, answers, routed, target=0.9, counts=None):
        self.labels = tuple(labels)
        self.answers, self.routed = answers, routed
        self.metadata = {
            "calibration": {"target_accuracy": target},
            "labels": [{"label": x, "train_count": (counts or {}).get(x, 100)} for x in labels],
        }

    def score(self, texts, batch_size=1):
        probabilities = np.full((len(texts), len(self.labels)), 0.01)
        for i, text in enumerate(texts):
            probabilities[i, self.labels.index(self.answers[text])] = 0.99
        return probabilities, [None] * len(texts)

    def route_of(self, probability, label, distance):
        return self.routed


def split_of(labels):
    texts = [f"ticket {i}" for i in range(len(labels))]
    return Split("test", None, texts, list(labels), list(range(len(labels))), "0" * 64)


def test_the_paired_test_on_a_hand_computed_case():
    truth = [7] * 30 + [8] * 30
    split = split_of(truth)
    baseline = dict(zip(split.texts, truth, strict=True))  # right on all 60
    new = dict(baseline)
    for text in split.texts[:10]:  # the new model loses 10 queue-7 tickets, gains none
        new[text] = 8
    block = compare_models(Stub((7, 8), new, True), Stub((7, 8), baseline, True), split)
    assert block["mcnemar"] == {"now_right": 0, "now_wrong": 10, "p": pytest.approx(2 * 0.5**10),
                                "alpha": 0.05}  # fmt: skip
    assert block["verdict"] == "keep"
    assert block["reasons"][0].startswith("the new model is significantly worse: 0 tickets")
    assert block["delta_accuracy"] == pytest.approx(-10 / 60)
    flipped = compare_models(Stub((7, 8), baseline, True), Stub((7, 8), new, True), split)
    assert flipped["verdict"] == "promote"
    same = compare_models(Stub((7, 8), baseline, True), Stub((7, 8), baseline, True), split)
    assert same["verdict"] == "promote"
    assert same["reasons"][0].startswith("no significant difference (0 tickets now right")


def test_drift_reports_labels_added_removed_and_moved_shares():
    before = {"labels": [{"label": 1, "train_count": 100}, {"label": 2, "train_count": 100},
                         {"label": 3, "train_count": 50}]}  # fmt: skip
    now = {"labels": [{"label": 1, "train_count": 180}, {"label": 2, "train_count": 20},
                      {"label": 4, "train_count": 50}]}  # fmt: skip
    changes = drift(now, before)
    assert changes["added"] == [4]
    assert changes["removed"] == [3]
    assert [m["label"] for m in changes["moved"]] == [2]  # 40% -> 8%: 5x
    assert changes["moved"][0]["factor"] == pytest.approx(0.4 / 0.08)


@pytest.mark.job
def test_a_clearly_better_baseline_is_kept_and_require_improvement_fails(
    sm_env, tiny_hyperparameters, trained_artifact
):
    bad = {**tiny_hyperparameters, "learning_rate": "1e-9", "num_train_epochs": "1",
           "calibration_split": "0"}  # fmt: skip
    write_hyperparameters(sm_env, bad)
    baseline = trained_artifact["tarball"]
    result = CliRunner().invoke(cli, ["train", "--baseline", str(baseline)])
    assert result.exit_code == 0, result.output
    assert "promotion: KEEP: the new model is significantly worse" in result.stdout
    assert "'promotion_delta_accuracy': -" in result.stdout
    metadata = verify_tarball(sm_env["SM_MODEL_DIR"] / "model.tar.gz")
    assert metadata["promotion"]["verdict"] == "keep"
    saved = json.loads((sm_env["SM_OUTPUT_DATA_DIR"] / "promotion.json").read_text())
    assert saved == metadata["promotion"]
    shown = CliRunner().invoke(cli, ["inspect", str(sm_env["SM_MODEL_DIR"] / "model.tar.gz")])
    assert json.loads(shown.stdout)["promotion"]["verdict"] == "keep"

    (sm_env["SM_MODEL_DIR"] / "model.tar.gz").unlink()
    write_hyperparameters(sm_env, {**bad, "require_improvement": "true"})
    result = CliRunner().invoke(cli, ["train", "--baseline", str(baseline)])
    assert result.exit_code == 1
    failure = (sm_env["SM_OUTPUT_DIR"] / "failure").read_text()
    assert failure.startswith("the new model is not promoted: the new model is significantly worse")
    assert failure.rstrip().endswith(
        "failing because require_improvement is set (see promotion.json)"
    )
    assert list(sm_env["SM_MODEL_DIR"].iterdir()) == []


def test_an_old_format_baseline_is_refused_before_training(sm_env, tiny_hyperparameters,
                                                           tmp_path, trained_artifact):  # fmt: skip
    folder = tmp_path / "old"
    with tarfile.open(trained_artifact["tarball"]) as tar:
        tar.extractall(folder, filter="data")
    metadata = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**metadata, "format_version": 1}))
    old = tmp_path / "baseline"
    old.mkdir()
    with tarfile.open(old / "model.tar.gz", "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=path.relative_to(folder).as_posix())
    write_hyperparameters(sm_env, tiny_hyperparameters)
    result = CliRunner().invoke(cli, ["train", "--baseline", str(old)])
    assert result.exit_code == 1
    expected = f"Error: baseline: {old / 'model.tar.gz'}: expected artifact format_version 2"
    assert result.stderr.startswith(expected + ", found 1; upgrade it with `gata-ft export")
    assert list(sm_env["SM_MODEL_DIR"].iterdir()) == []


def test_the_model_card_parses_and_lists_every_label(trained_artifact):
    import yaml
    from transformers import AutoModelForSequenceClassification

    card = (trained_artifact["dir"] / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["pipeline_tag"] == "text-classification"
    assert front["base_model"]
    results = front["model-index"][0]["results"][0]
    metadata = json.loads((trained_artifact["dir"] / "metadata.json").read_text())
    accuracy = next(m for m in results["metrics"] if m["type"] == "accuracy")
    assert accuracy["value"] == pytest.approx(metadata["metrics"]["test"]["accuracy"], abs=1e-6)
    for entry in metadata["labels"]:
        assert f"| {entry['class_id']} | {entry['label']} |" in card
    assert "README.md" in metadata["files"]
    AutoModelForSequenceClassification.from_pretrained(trained_artifact["dir"])  # still loads
    # what the runtime serves, as the job's log says it: both int8 graphs and the escalation
    serve = metadata["serve"]
    served = (
        f"- serving {serve['graph']}: {serve['reason']}; on CPUs with VNNI "
        f"{serve['vnni']['graph']}; tickets whose int8 top probability is below 0.5 are "
        "scored again by onnx/model.onnx\n"
    )
    assert served in card
    assert served[2:-1] in trained_artifact["log"]


def test_the_serving_line_names_each_graphs_escalation():
    from gata_ft.card import serving

    rule = {"graph": "onnx/model.onnx", "below": 0.5}
    again = "tickets whose int8 top probability is below 0.5 are scored again by onnx/model.onnx"
    both = {"graph": "p", "reason": "r", "escalate": rule, "vnni": {"graph": "v", "escalate": rule}}
    assert serving(both) == f"serving p: r; on CPUs with VNNI v; {again}"
    portable_only = {**both, "vnni": {"graph": "v"}}
    assert serving(portable_only) == f"serving p: r; on CPUs with VNNI v; p: {again}"
    off = {"graph": "p", "reason": "r", "escalate": {**rule, "below": 0}, "vnni": None}
    assert serving(off) == "serving p: r"  # below 0: no escalation, as the runtime reads it
    assert serving({"graph": "onnx/model.onnx", "reason": "gate failed"}) == (
        "serving onnx/model.onnx: gate failed"
    )
