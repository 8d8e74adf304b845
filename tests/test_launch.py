"""One process per GPU under torchrun: two CPU processes (gloo) stand in for two GPUs."""

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import write_hyperparameters

from gata_ft.artifact import verify_tarball

pytestmark = pytest.mark.job


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


def launch_two() -> subprocess.CompletedProcess:
    """`gata-ft train` as SageMaker starts it on a host with 2 GPUs (2 CPU processes here)."""
    env = {**os.environ, "SM_NUM_GPUS": "2", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "gata_ft", "train"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_preflight_fails_the_launcher_before_torchrun_starts(sm_env, tiny_hyperparameters):
    write_hyperparameters(sm_env, {**tiny_hyperparameters, "max_length": "512"})
    result = launch_two()
    assert result.returncode == 1
    failure = (sm_env["SM_OUTPUT_DIR"] / "failure").read_text()
    assert failure.startswith("max_length: expected at most 128")
    assert list(sm_env["SM_MODEL_DIR"].iterdir()) == []
    assert "launching" not in result.stderr  # no worker was started


def test_a_failing_worker_writes_the_failure_file(sm_env, tiny_hyperparameters, tmp_path):
    # config.json passes preflight; the weights fail only when a worker loads them
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_hyperparameters["base_model"], broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    write_hyperparameters(sm_env, {**tiny_hyperparameters, "base_model": str(broken)})
    result = launch_two()
    assert result.returncode == 1
    assert "launching 2 training processes" in result.stderr
    failure = (sm_env["SM_OUTPUT_DIR"] / "failure").read_text()
    assert failure.startswith(f"base model {broken} ({broken}) cannot be loaded: ")
    assert result.stderr.rstrip().endswith(failure.strip())
    assert list(sm_env["SM_MODEL_DIR"].iterdir()) == []


def test_sigterm_reaches_the_workers_which_save_a_checkpoint(
    sm_env, tiny_hyperparameters, tmp_path
):
    # A spot interruption sends SIGTERM to the launcher: the workers must get it and
    # checkpoint, not be killed with it (the checkpoint is what a restarted job resumes).
    many = {**tiny_hyperparameters, "num_train_epochs": "200", "logging_steps": "1"}
    write_hyperparameters(sm_env, many)
    env = {**os.environ, "SM_NUM_GPUS": "2", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "gata_ft", "train"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        for line in launcher.stderr:  # rank 0's progress: training has begun
            lines.append(line)
            if line.startswith("step 3/"):
                launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=300)
    finally:
        launcher.kill()
    stderr = "".join(lines)
    assert launcher.returncode == 1, stderr[-3000:]
    failure = (sm_env["SM_OUTPUT_DIR"] / "failure").read_text()
    assert failure.startswith("received SIGTERM at step "), failure
    assert "saved a checkpoint" in failure
    assert stderr.rstrip().endswith(failure.strip())
    assert list(sm_env["GATA_CHECKPOINT_DIR"].glob("checkpoint-*")), "no checkpoint was saved"
    assert list(sm_env["SM_MODEL_DIR"].iterdir()) == []
