"""The training job end to end, with the tiny model, under SageMaker's variables."""

import hashlib
import json
import os
import re
import signal
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tiny_options, write_hyperparameters, write_rows
from test_export_parity import impossible_recipe
from transformers import TrainerCallback

from gata_ft import metrics
from gata_ft.archive import safe_extract
from gata_ft.artifact import verify_tarball
from gata_ft.cli import cli
from gata_ft.config import build_config
from gata_ft.errors import JobInterrupted
from gata_ft.examples import QUEUES, write_example
from gata_ft.pipeline import training_job
from gata_ft.sagemaker import job_paths, local_env

pytestmark = pytest.mark.job

# SageMaker metric definitions of the platform's launch workflow.
METRIC_REGEXES = {
    "train_loss": r"train_loss: ([0-9\.]+)",
    "eval_loss": r"'eval_loss': ([0-9\.]+)",
    "eval_accuracy": r"'eval_accuracy': ([0-9\.]+)",
    "eval_precision": r"'eval_precision': ([0-9\.]+)",
    "eval_recall": r"'eval_recall': ([0-9\.]+)",
    "eval_f1": r"'eval_f1': ([0-9\.]+)",
}


def train(extra_args=()):
    return CliRunner().invoke(cli, ["train", *extra_args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One run of the job, for the tests that only read what it wrote and printed."""
    root = tmp_path_factory.mktemp("job")
    data = write_example(root / "data", train_per_queue=12, test_per_queue=4)
    env = local_env(root, data / "train", data / "test")
    folders = {name: Path(value) for name, value in env.items()}
    folders["SM_INPUT_CONFIG_DIR"].mkdir()
    write_hyperparameters(folders, tiny_options(tiny_model_dir))
    result = CliRunner(env=env).invoke(cli, ["train"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return folders, result


def test_job_writes_only_the_tarball_to_the_model_dir(trained):
    sm_env, _ = trained
    assert [p.name for p in sm_env["SM_MODEL_DIR"].iterdir()] == ["model.tar.gz"]
    assert any(p.name.startswith("checkpoint-") for p in sm_env["GATA_CHECKPOINT_DIR"].iterdir())
    assert not (sm_env["SM_OUTPUT_DIR"] / "failure").exists()


def test_tarball_holds_the_checkpoint_and_verified_metadata(trained):
    sm_env, _ = trained
    tarball = sm_env["SM_MODEL_DIR"] / "model.tar.gz"
    metadata = verify_tarball(tarball)
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
        config = json.load(tar.extractfile("config.json"))
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
        "metadata.json",
        "golden.json",
        "onnx/model.onnx",
        "onnx/model_quantized.onnx",
        "onnx/config.json",
        "onnx/tokenizer.json",
        "onnx/recipe.json",
    } <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)  # no pickles
    labels = sorted(QUEUES)
    assert config["id2label"] == {str(i): str(label) for i, label in enumerate(labels)}
    assert [entry["label"] for entry in metadata["labels"]] == labels
    for split in ("train", "test"):
        rows = (sm_env[f"SM_CHANNEL_{split.upper()}"] / "data.json").read_text().splitlines()
        counts = Counter(json.loads(row)["label"] for row in rows)
        assert [entry[f"{split}_count"] for entry in metadata["labels"]] == [
            counts[label] for label in labels
        ]
    assert metadata["format_version"] == 2
    assert metadata["serve"]["graph"] in ("onnx/model_quantized.onnx", "onnx/model.onnx")
    assert metadata["onnx"]["recipe"] == "avx2"
    assert metadata["parity"]["checked"] is True
    assert metadata["parity"]["texts"] == 40
    assert metadata["training"]["device"] == "cpu"
    assert metadata["training"]["precision"] == "fp32"
    assert metadata["training"]["global_step"] == 16  # 120 rows / 16 per batch = 8 steps x 2 epochs
    assert metadata["hyperparameters"]["user_set"] == sorted(
        [
            "base_model",
            "num_train_epochs",
            "per_device_train_batch_size",
            "learning_rate",
            "logging_steps",
            "max_length",
            "calibration_split",
        ]
    )
    assert metadata["hyperparameters"]["values"]["learning_rate"] == 0.001
    for split in ("train", "test"):
        data = (sm_env[f"SM_CHANNEL_{split.upper()}"] / "data.json").read_bytes()
        assert metadata["data"][split]["sha256"] == hashlib.sha256(data).hexdigest()
    assert set(metadata["libraries"]) >= {"python", "torch", "transformers", "tokenizers"}


def test_metric_regexes_scrape_the_right_values(trained):
    sm_env, result = trained
    saved = json.loads((sm_env["SM_OUTPUT_DATA_DIR"] / "metrics.json").read_text())
    metadata = verify_tarball(sm_env["SM_MODEL_DIR"] / "model.tar.gz")
    expected = {
        "train_loss": metadata["training"]["train_loss"],
        "eval_loss": saved["loss"],
        "eval_accuracy": saved["accuracy"],
        "eval_precision": saved["precision"],
        "eval_recall": saved["recall"],
        "eval_f1": saved["f1"],
    }
    for name, regex in METRIC_REGEXES.items():
        values = re.findall(regex, result.stdout)
        # one line per epoch's evaluation, then the final one for the shipped model
        assert len(values) == (1 if name == "train_loss" else 3), name
        assert float(values[-1]) == pytest.approx(expected[name], abs=1e-6), name


def test_reports_are_written_and_printed(trained):
    sm_env, result = trained
    out = sm_env["SM_OUTPUT_DATA_DIR"]
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion_matrix.csv",
        "confusion_matrix.png",
        "metrics.json",
        "parity.json",
    ]
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["per_class"]) == {str(label) for label in QUEUES}
    assert "10 labels; rows per label and split:" in result.stdout
    assert "confusion matrix (rows: true label, columns: predicted label)" in result.stdout


def test_progress_is_plain_lines_when_not_a_terminal(trained):
    _, result = trained
    lines = [line for line in result.stderr.splitlines() if line.startswith("step ")]
    assert lines[0].startswith("step 2/16 | epoch 0.25 | loss ")
    assert len(lines) == 8
    assert "\r" not in result.stderr


def test_cli_flags_override_hyperparameters(sm_env, tiny_hyperparameters):
    write_hyperparameters(
        sm_env, {**tiny_hyperparameters, "num_train_epochs": "5", "seedling": "1"}
    )
    result = train(["--num-train-epochs", "1"])
    assert result.exit_code == 0, result.output
    metadata = verify_tarball(sm_env["SM_MODEL_DIR"] / "model.tar.gz")
    assert metadata["training"]["global_step"] == 8
    assert "unknown hyperparameter 'seedling'" in result.stderr
    assert "(did you mean 'seed'?)" in result.stderr


def test_bad_data_fails_cleanly(sm_env, tiny_hyperparameters):
    write_hyperparameters(sm_env, tiny_hyperparameters)
    data = sm_env["SM_CHANNEL_TRAIN"] / "data.json"
    original = data.read_bytes() + b'{"label": 1.5, "text": "Broken row"}\n'
    data.write_bytes(original)
    result = train()
    assert result.exit_code == 1
    line = original.count(b"\n")
    assert (
        f"{data}:{line}: label: expected a non-negative integer, found 1.5 (a float)"
        in result.stderr
    )
    assert result.stderr.startswith(f"Error: {data}: 2 problems in 1 row (120 valid rows):")
    failure = (sm_env["SM_OUTPUT_DIR"] / "failure").read_text()
    assert failure.startswith(
        f"{data}: 2 problems in 1 row (120 valid rows): {data}:{line}: label:"
    )
    assert failure.count("\n") == 1  # one paragraph
    assert list(sm_env["SM_MODEL_DIR"].iterdir()) == []
    assert data.read_bytes() == original  # the input is left as it was


def test_missing_base_model_says_how_to_provide_it(sm_env):
    write_hyperparameters(sm_env, {"base_model": "no-such-org/no-such-model"})
    result = train()
    assert result.exit_code == 1
    assert (
        "base_model 'no-such-org/no-such-model' is neither a local directory "
        "nor in the Hugging Face cache" in result.stderr
    )
    assert "--allow-download (hyperparameter allow_download=true)" in result.stderr
    assert list(sm_env["SM_MODEL_DIR"].iterdir()) == []


def test_max_length_beyond_the_model_is_an_error(sm_env, tiny_hyperparameters):
    write_hyperparameters(sm_env, {**tiny_hyperparameters, "max_length": "512"})
    result = train()
    assert result.exit_code == 1
    assert (
        "max_length: expected at most 128 (the base model's position limit), found 512"
        in result.stderr
    )
    assert "max_length: expected at most 128" in (sm_env["SM_OUTPUT_DIR"] / "failure").read_text()


class _SigtermAt(TrainerCallback):
    """Sends this process SIGTERM at a step, as SageMaker does before a spot interruption."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_interrupted_job_resumes_and_finishes_with_a_valid_artifact(sm_env, tiny_hyperparameters):
    config, user_set, _ = build_config(tiny_hyperparameters, {})
    paths = job_paths()
    with pytest.raises(
        JobInterrupted, match=r"^received SIGTERM at step 4: saved a checkpoint in "
    ):
        training_job(config, user_set, paths, lambda _text: None, callbacks=[_SigtermAt(3)])
    checkpoint = sm_env["GATA_CHECKPOINT_DIR"] / "checkpoint-4"
    assert (checkpoint / "gata-checkpoint.json").is_file()
    assert list(sm_env["SM_MODEL_DIR"].iterdir()) == []

    # The spot instance died while writing a later checkpoint: that one is skipped.
    (sm_env["GATA_CHECKPOINT_DIR"] / "checkpoint-6").mkdir()
    (sm_env["GATA_CHECKPOINT_DIR"] / "checkpoint-6" / "config.json").write_text("{")

    write_hyperparameters(sm_env, tiny_hyperparameters)
    result = train()
    assert result.exit_code == 0, result.output
    assert "skipping checkpoint" in result.stderr
    assert "checkpoint-6: incomplete" in result.stderr
    assert f"resuming from {checkpoint} (step 4)" in result.stderr
    metadata = verify_tarball(sm_env["SM_MODEL_DIR"] / "model.tar.gz")
    assert metadata["training"]["resumed_from_step"] == 4
    assert metadata["training"]["global_step"] == 16
    assert (sm_env["GATA_CHECKPOINT_DIR"] / "skipped").is_dir()


def test_changed_data_does_not_resume_an_old_checkpoint(sm_env, tiny_hyperparameters):
    write_hyperparameters(sm_env, tiny_hyperparameters)
    assert train().exit_code == 0
    data = sm_env["SM_CHANNEL_TRAIN"] / "data.json"
    data.write_text(data.read_text() + '{"label": 900004417905, "text": "one more sales ticket"}\n')
    result = train()
    assert result.exit_code == 0, result.output
    assert (
        "incompatible: written by a job with other data, labels or hyperparameters" in result.stderr
    )
    assert "resuming from" not in result.stderr
    assert (
        verify_tarball(sm_env["SM_MODEL_DIR"] / "model.tar.gz")["training"]["resumed_from_step"]
        is None
    )


def test_same_seed_gives_the_same_model(tmp_path, sm_env, tiny_hyperparameters):
    write_hyperparameters(sm_env, tiny_hyperparameters)
    digests = []
    for run in ("a", "b"):
        result = train(["--checkpoint-dir", str(tmp_path / f"ck-{run}")])
        assert result.exit_code == 0, result.output
        metadata = verify_tarball(sm_env["SM_MODEL_DIR"] / "model.tar.gz")
        digests.append(metadata["files"]["model.safetensors"]["sha256"])
    assert digests[0] == digests[1]


def test_early_stopping_ends_training_when_the_metric_stalls(sm_env, tiny_hyperparameters):
    # A learning rate this small leaves the predictions, and so F1, unchanged.
    hyper = {**tiny_hyperparameters, "learning_rate": "1e-12", "num_train_epochs": "6"}
    write_hyperparameters(sm_env, {**hyper, "early_stopping_patience": "2"})
    result = train()
    assert result.exit_code == 0, result.output
    metadata = verify_tarball(sm_env["SM_MODEL_DIR"] / "model.tar.gz")
    assert metadata["training"]["epochs"] == 3.0  # best after 1, no gain after 2 and 3
    assert len(re.findall(r"'eval_f1': ", result.stdout)) == 4


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
    else:  # confident and in scope (no fallback queue here)
        assert [p.route for p in predictions] == [
            p.probability >= threshold and p.out_of_scope <= 1 for p in predictions
        ]


def test_strict_parity_in_the_training_job(sm_env, tiny_hyperparameters, tmp_path):
    write_hyperparameters(
        sm_env,
        {
            **tiny_hyperparameters,
            "export_recipe": str(impossible_recipe(tmp_path)),
            "strict_parity": "true",
        },
    )
    result = CliRunner().invoke(cli, ["train"])
    assert result.exit_code == 1
    assert (
        "failing because --strict-parity is set"
        in (sm_env["SM_OUTPUT_DIR"] / "failure").read_text()
    )
    assert list(sm_env["SM_MODEL_DIR"].iterdir()) == []


def rotated(rows, labels):
    """The same texts under the next queue's label: a model that learnt them is always wrong."""
    following = dict(zip(labels, labels[1:] + labels[:1], strict=True))
    return [{"label": following[r["label"]], "text": r["text"]} for r in rows]


@pytest.fixture
def learnable(sm_env, tiny_hyperparameters):
    """40 training tickets a queue, and options the tiny model learns them with."""
    write_example(sm_env["SM_CHANNEL_TRAIN"].parent, train_per_queue=40, test_per_queue=10)
    hyper = {**tiny_hyperparameters, "calibration_split": "0.25", "target_accuracy": "0.5"}
    return hyper | {"num_train_epochs": "8", "learning_rate": "0.005"}


def test_a_missed_routing_target_warns_and_fails_with_strict_routing(sm_env, learnable):
    hyper = learnable
    test_file = sm_env["SM_CHANNEL_TEST"] / "data.json"
    rows = [json.loads(line) for line in test_file.open()]
    test_file.write_text("".join(json.dumps(r) + "\n" for r in rotated(rows, sorted(QUEUES))))
    write_hyperparameters(sm_env, hyper)
    result = train()
    assert result.exit_code == 0, result.output
    metadata = verify_tarball(sm_env["SM_MODEL_DIR"] / "model.tar.gz")
    calibration = metadata["calibration"]
    assert calibration["threshold"] is not None  # the calibration split came from training rows
    assert calibration["meets_target"] is False
    assert calibration["routing_test"]["interval"][1] < 0.5
    assert "WARNING: the routed accuracy on the test set, " in result.stdout

    write_hyperparameters(sm_env, {**hyper, "strict_routing": "true"})
    result = CliRunner().invoke(
        cli, ["train", "--checkpoint-dir", str(sm_env["SM_MODEL_DIR"].parent / "ck2")]
    )
    (sm_env["SM_MODEL_DIR"] / "model.tar.gz").unlink(missing_ok=True)
    assert result.exit_code == 1
    failure = (sm_env["SM_OUTPUT_DIR"] / "failure").read_text()
    assert failure.startswith("the routed accuracy on the test set, ")
    assert failure.rstrip().endswith("failing because strict_routing is set")


def test_a_calibration_channel_and_a_fallback_queue(tmp_path, sm_env, learnable):
    fallback = sorted(QUEUES)[0]
    channel = tmp_path / "channel"
    test_rows = [json.loads(line) for line in (sm_env["SM_CHANNEL_TEST"] / "data.json").open()]
    write_rows(channel, test_rows[::2])
    write_hyperparameters(sm_env, {**learnable, "fallback_label": str(fallback)})
    result = train(["--calibration", str(channel)])
    assert result.exit_code == 0, result.output
    assert "rows of the calibration channel; test ECE" in result.stdout
    metadata = verify_tarball(sm_env["SM_MODEL_DIR"] / "model.tar.gz")
    calibration = metadata["calibration"]
    assert calibration["source"] == "calibration channel"
    assert calibration["calibration_rows"] == len(test_rows[::2])
    assert calibration["fallback_label"] == fallback
    assert metadata["data"]["train"]["rows"] == 400  # no split held out: all rows train
    assert metadata["data"]["calibration"]["rows"] == len(test_rows[::2])
    assert "scope.npz" in metadata["files"]
    scope = calibration["scope"]
    assert scope["queues"] == len(QUEUES) - 1  # the fallback queue has no mean
    assert scope["distance_threshold"] > 0

    from gata_ft.inference import OnnxClassifier
    from gata_ft.runtime import Model
    from gata_ft.scope import Scope

    folder = tmp_path / "model"
    safe_extract(sm_env["SM_MODEL_DIR"] / "model.tar.gz", folder)
    model = Model.load(folder, verify_golden=True, escalate=False)  # the int8 graph's features
    texts = [r["text"] for r in test_rows]
    predictions = model.predict(texts, batch_size=1)
    graph = OnnxClassifier(folder / model.graph, folder / "tokenizer.json", 64)
    features = np.concatenate([graph.scores([t])[1] for t in texts])
    distance = Scope.load(folder / "scope.npz").distance(features) / scope["distance_threshold"]
    np.testing.assert_allclose([p.out_of_scope for p in predictions], distance, rtol=1e-4)
    threshold = calibration["threshold"]
    for p in predictions:
        routed = threshold is not None and p.probability >= threshold
        routed = routed and p.label != fallback and p.out_of_scope <= 1
        assert p.route == routed
        assert p.queue == (p.label if routed else fallback)
    assert any(p.label == fallback and not p.route for p in predictions)

    # loaders that read only logits keep working beside the features output
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(folder / "onnx")
    batch = tokenizer([texts[0]], return_tensors="np")
    for name in ("model.onnx", "model_quantized.onnx"):
        ort = ORTModelForSequenceClassification.from_pretrained(folder / "onnx", file_name=name)
        ours = OnnxClassifier(folder / "onnx" / name, folder / "tokenizer.json", 64)
        logits = np.asarray(ort(**batch).logits)
        # fp32: the same numbers; int8: onnxruntime's kernels may round a little apart
        np.testing.assert_allclose(
            logits, ours.scores([texts[0]])[0], atol=1e-4 if name == "model.onnx" else 0.05
        )
        assert logits.argmax() == ours.scores([texts[0]])[0].argmax()
    classify = pipeline("text-classification", model=ort, tokenizer=tokenizer)
    assert classify(texts[0])[0]["label"] == str(predictions[0].label)


def test_a_fallback_label_must_be_a_training_label(sm_env, tiny_hyperparameters):
    write_hyperparameters(sm_env, {**tiny_hyperparameters, "fallback_label": "12345"})
    result = train()
    assert result.exit_code == 1
    assert result.stderr.startswith(
        "Error: fallback_label: expected one of the training labels, found 12345, which no row "
    )
