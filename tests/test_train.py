"""The training job end to end, with the tiny model, under SageMaker's variables."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
from collections import Counter

import pytest
from click.testing import CliRunner
from conftest import write_hyperparameters
from test_config import WORKFLOW
from transformers import TrainerCallback

from gata_ft.artifact import verify_tarball
from gata_ft.cli import cli
from gata_ft.config import build_config
from gata_ft.errors import JobInterrupted
from gata_ft.examples import QUEUES
from gata_ft.pipeline import training_job
from gata_ft.sagemaker import job_paths

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


@pytest.fixture
def trained(sm_env, tiny_hyperparameters):
    write_hyperparameters(sm_env, tiny_hyperparameters)
    result = train()
    assert result.exit_code == 0, result.output
    return sm_env, result


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


def test_changed_data_does_not_resume_an_old_checkpoint(trained):
    sm_env, _ = trained
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


def test_ddp_with_two_processes_through_torchrun(
    tmp_path, sm_env, tiny_hyperparameters, monkeypatch
):
    # SM_NUM_GPUS=2 on a CPU machine: torchrun starts two gloo processes, the
    # same launch path as two GPUs with NCCL.
    write_hyperparameters(sm_env, tiny_hyperparameters)
    env = {**os.environ, "SM_NUM_GPUS": "2", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "gata_ft", "train"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launching 2 training processes" in result.stderr
    assert "--nproc-per-node=2" in result.stderr
    metadata = verify_tarball(sm_env["SM_MODEL_DIR"] / "model.tar.gz")
    assert metadata["training"]["num_processes"] == 2
    assert metadata["training"]["global_step"] == 8  # each step sees 2 x 16 rows
    assert len(re.findall(r"train_loss: ([0-9\.]+)", result.stdout)) == 1  # rank 0 only


def test_ddp_worker_failure_writes_the_failure_file(sm_env, tiny_hyperparameters):
    write_hyperparameters(sm_env, {**tiny_hyperparameters, "max_length": "512"})
    env = {**os.environ, "SM_NUM_GPUS": "2", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "gata_ft", "train"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1
    failure = (sm_env["SM_OUTPUT_DIR"] / "failure").read_text()
    assert failure.startswith("max_length: expected at most 128")
    assert list(sm_env["SM_MODEL_DIR"].iterdir()) == []


@pytest.mark.parametrize(
    ("flags", "cuda", "precision"),
    [
        ({}, True, "fp16"),
        ({}, False, "fp32"),
        ({"bf16": "true"}, True, "bf16"),
        ({"bf16": "true"}, False, "bf16"),
        ({"fp16": "false"}, True, "fp32"),
    ],
)
def test_precision_is_fp16_on_cuda_unless_chosen_otherwise(flags, cuda, precision):
    assert build_config(flags, {})[0].precision(cuda) == precision


def test_fp16_on_a_cpu_is_an_error():
    from gata_ft.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        build_config({"fp16": "true"}, {})[0].precision(cuda=False)
    assert str(info.value) == (
        "fp16: expected a CUDA GPU for fp16 mixed precision, found none; "
        "leave fp16 unset (automatic) or use bf16"
    )


def test_training_arguments_follow_the_config(tmp_path):
    from gata_ft.train import training_args

    config = build_config(
        {
            **WORKFLOW,
            "eval_steps": "25",
            "metric_for_best_model": "loss",
        },
        {},
    )[0]
    args = training_args(config, tmp_path, False, "fp32")
    assert args.output_dir == str(tmp_path)
    assert args.per_device_train_batch_size == 16
    assert args.num_train_epochs == 4
    assert args.learning_rate == 0.00002
    assert args.weight_decay == 0.01
    assert args.warmup_ratio == 0.1
    assert args.gradient_accumulation_steps == 4
    assert args.gradient_checkpointing is True
    assert args.group_by_length is True  # length-grouped batches; the collator pads per batch
    assert (args.eval_strategy, args.save_strategy) == ("steps", "steps")
    assert (args.eval_steps, args.save_steps) == (25, 25)
    assert args.metric_for_best_model == "loss"
    assert args.greater_is_better is False
    assert args.load_best_model_at_end is True


def test_early_stopping_ends_training_when_the_metric_stalls(sm_env, tiny_hyperparameters):
    # A learning rate this small leaves the predictions, and so F1, unchanged.
    hyper = {**tiny_hyperparameters, "learning_rate": "1e-12", "num_train_epochs": "6"}
    write_hyperparameters(sm_env, {**hyper, "early_stopping_patience": "2"})
    result = train()
    assert result.exit_code == 0, result.output
    metadata = verify_tarball(sm_env["SM_MODEL_DIR"] / "model.tar.gz")
    assert metadata["training"]["epochs"] == 3.0  # best after 1, no gain after 2 and 3
    assert len(re.findall(r"'eval_f1': ", result.stdout)) == 4


def test_a_terminal_gets_a_progress_bar(monkeypatch):
    import io

    from transformers import PrinterCallback, ProgressCallback

    from gata_ft import callbacks

    class Tty(io.StringIO):
        def isatty(self):
            return True

    class FakeTrainer:
        def __init__(self):
            self.callbacks = [PrinterCallback(), ProgressCallback()]

        def remove_callback(self, kind):
            self.callbacks = [c for c in self.callbacks if type(c) is not kind]

        def add_callback(self, callback):
            self.callbacks.append(callback)

    for stream, expected in ((Tty(), "BarProgress"), (io.StringIO(), "PlainProgress")):
        monkeypatch.setattr(sys, "stderr", stream)
        trainer = FakeTrainer()
        callbacks.install_log_callbacks(trainer, print)
        assert [type(c).__name__ for c in trainer.callbacks] == ["EvalPrinter", expected]
