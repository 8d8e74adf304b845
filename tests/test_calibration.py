"""Calibration math, the routing threshold, class weighting, and the runtime applying both."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_hyperparameters

from gata_ft import calibration as cal
from gata_ft import metrics
from gata_ft.archive import safe_extract
from gata_ft.artifact import verify_tarball
from gata_ft.cli import cli


def test_ece_and_nll_match_a_hand_computed_case():
    # top-1 confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.6 (right)
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    labels = [0, 1, 1, 0]
    # bin (0.867, 0.933]: accuracy 0.5, confidence 0.9 -> 0.4 x 2/4; bin (0.533, 0.6]: 1.0 vs 0.6
    assert metrics.ece(probs, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert metrics.nll(probs, labels) == pytest.approx(
        -(np.log(0.9) + np.log(0.1) + 2 * np.log(0.6)) / 4
    )
    assert metrics.ece(np.array([[1.0, 0.0], [0.0, 1.0]]), [0, 1]) == 0.0


def test_temperature_scaling_fixes_an_overconfident_model():
    rng = np.random.default_rng(0)
    honest = rng.normal(size=(4000, 5)) * 1.5
    labels = [
        rng.choice(5, p=row) for row in metrics.softmax(honest)
    ]  # honest logits are calibrated
    overconfident = honest * 4.0
    temperature = cal.fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(4.0, rel=0.1)
    before, after = metrics.softmax(overconfident), metrics.softmax(overconfident, temperature)
    assert metrics.nll(after, labels) < metrics.nll(before, labels) - 0.5
    assert metrics.ece(after, labels) < 0.03 < metrics.ece(before, labels)
    assert (after.argmax(-1) == before.argmax(-1)).all()  # routing decisions unchanged


def test_threshold_is_the_lowest_that_meets_the_target_on_its_split():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2000, 4)) * 2
    probs = metrics.softmax(logits)
    labels = [rng.choice(4, p=row) for row in probs]
    from scipy.stats import beta

    threshold = cal.recommend_threshold(probs, labels, target=0.9)
    correct = probs.argmax(-1) == np.array(labels)

    def lower_bound(t):  # one-sided 90% Clopper-Pearson, computed here from scratch
        routed = probs.max(-1) >= t
        k, n = int(correct[routed].sum()), int(routed.sum())
        return beta.ppf(0.1, k, n - k + 1)

    routed = probs.max(-1) >= threshold
    assert correct[routed].mean() >= 0.9  # the target holds on the split it was chosen on
    assert lower_bound(threshold) >= 0.9  # ... with 90% confidence
    lower = np.sort(np.unique(probs.max(-1)))
    for t in lower[lower < threshold][-20:]:  # every lower threshold misses it
        assert lower_bound(t) < 0.9
    assert cal.recommend_threshold(probs, labels, target=1.01) is None


def test_coverage_curve_on_a_hand_case():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.8, 0.2], [0.3, 0.7]])
    curve = metrics.coverage_curve(probs, [0, 1, 0, 1])
    assert curve.thresholds.tolist() == [0.9, 0.8, 0.7]
    assert curve.coverage.tolist() == [0.25, 0.75, 1.0]
    assert curve.accuracy.tolist() == pytest.approx([1.0, 2 / 3, 0.75])
    report = metrics.routing_report(probs, [0, 1, 0, 1], 0.8, ["a", "b"])
    assert (report["coverage"], report["accuracy"]) == (0.75, pytest.approx(2 / 3))
    assert report["per_class"]["b"] == {"tickets": 2, "coverage": 0.5, "accuracy": 0.0}


def test_calibration_split_is_stratified_seeded_and_spares_tiny_classes():
    labels = [1] * 100 + [2] * 20 + [3] * 4
    train, held = cal.split_for_calibration(labels, 0.1, seed=7)
    assert sorted(train + held) == list(range(len(labels)))
    counts = {c: sum(labels[i] == c for i in held) for c in (1, 2, 3)}
    assert counts == {1: 10, 2: 2, 3: 0}  # 4 rows: all kept for training
    assert cal.split_for_calibration(labels, 0.1, seed=7) == (train, held)
    assert cal.split_for_calibration(labels, 0.1, seed=8) != (train, held)
    assert cal.split_for_calibration(labels, 0.0, seed=7) == (list(range(len(labels))), [])


def test_class_weights_are_inverse_frequency_with_mean_one(tmp_path):
    from conftest import write_rows

    from gata_ft.data import LabelMap, read_split
    from gata_ft.train import class_weights

    write_rows(tmp_path / "t", [{"label": 5, "text": "a"}] * 90 + [{"label": 9, "text": "b"}] * 10)
    split = read_split(tmp_path / "t", "train")
    weights = class_weights(split, LabelMap.from_split(split)).tolist()
    assert weights == pytest.approx([100 / (2 * 90), 100 / (2 * 10)])
    assert (90 * weights[0] + 10 * weights[1]) / 100 == pytest.approx(1.0)  # mean 1 per ticket


def test_weighted_trainer_weights_training_loss_only(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    from gata_ft.train import WeightedTrainer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    weights = torch.tensor([0.5, 1.0, 4.0])
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = WeightedTrainer(model=model, args=args, class_weights=weights)
    assert trainer.model_accepts_loss_kwargs is False  # the Trainer scales it for accumulation
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(5, 90, (6, 7)), "labels": torch.tensor([0, 1, 2, 2, 1, 0])}
    model.eval()  # no dropout, but compute_loss looks at .training: flip only the flag
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
        model.training = True
        weighted = trainer.compute_loss(model, dict(batch))
        model.training = False
        plain = trainer.compute_loss(model, dict(batch))
    per_ticket = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    w = weights[batch["labels"]]
    torch.testing.assert_close(weighted, (w * per_ticket).sum() / w.sum())
    torch.testing.assert_close(plain, per_ticket.mean())
    assert not torch.isclose(weighted, plain)


def test_folding_the_temperature_divides_the_logits():
    from transformers import BertConfig, BertForSequenceClassification

    from gata_ft.train import fold_temperature

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=3,
        )
    ).eval()
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        raw = model(input_ids=ids).logits
        fold_temperature(model, 2.5, 3)
        folded = model(input_ids=ids).logits
    torch.testing.assert_close(folded, raw / 2.5)


def test_training_job_calibrates_and_the_runtime_applies_it(tmp_path, sm_env, tiny_hyperparameters):
    hyper = {**tiny_hyperparameters, "calibration_split": "0.25", "target_accuracy": "0.5"}
    hyper.update({"num_train_epochs": "6", "learning_rate": "0.005"})
    write_hyperparameters(sm_env, hyper)
    result = CliRunner().invoke(cli, ["train"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = sm_env["SM_OUTPUT_DATA_DIR"]
    for name in ("calibration.json", "reliability_diagram.png", "coverage_accuracy.png"):
        assert (out / name).is_file(), name
    metadata = verify_tarball(sm_env["SM_MODEL_DIR"] / "model.tar.gz")
    calibration = metadata["calibration"]
    assert calibration == json.loads((out / "calibration.json").read_text())
    assert calibration["fitted"] is True
    rows = [json.loads(line)["label"] for line in (sm_env["SM_CHANNEL_TRAIN"] / "data.json").open()]
    counts = [rows.count(label) for label in set(rows)]
    assert calibration["calibration_rows"] == sum(max(1, round(0.25 * n)) for n in counts if n >= 5)
    assert metadata["data"]["train"]["rows"] == 120
    assert "calibration: temperature " in result.stdout
    assert "held-out rows; test ECE " in result.stdout

    from gata_ft.export.reference import torch_logits
    from gata_ft.runtime import Model

    folder = tmp_path / "model"
    safe_extract(sm_env["SM_MODEL_DIR"] / "model.tar.gz", folder)
    texts = [json.loads(line)["text"] for line in (sm_env["SM_CHANNEL_TEST"] / "data.json").open()]
    calibrated = metrics.softmax(torch_logits(folder, texts, 64))  # the checkpoint: folded
    model = Model.load(folder, graph="fp32")
    predictions = model.predict(texts, batch_size=1)
    np.testing.assert_allclose([p.probability for p in predictions], calibrated.max(-1), atol=1e-5)
    threshold = calibration["threshold"]
    if threshold is None:
        assert all(p.route is False for p in predictions)
    else:
        assert [p.route for p in predictions] == [p.probability >= threshold for p in predictions]


def test_thin_labels_are_warned_about(tmp_path):
    from dataclasses import replace

    from conftest import write_rows

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
