"""The one place that reads SageMaker's SM_* variables and /opt/ml paths."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gata_ft.errors import ConfigError

ENV_DEFAULTS = {
    "SM_CHANNEL_TRAIN": "/opt/ml/input/data/train",
    "SM_CHANNEL_TEST": "/opt/ml/input/data/test",
    # optional: labelled recent traffic for calibration (used when the folder exists)
    "SM_CHANNEL_CALIBRATION": "/opt/ml/input/data/calibration",
    # optional: the model.tar.gz in service, to compare the new model with
    "SM_CHANNEL_BASELINE": "/opt/ml/input/data/baseline",
    "SM_MODEL_DIR": "/opt/ml/model",
    "SM_OUTPUT_DATA_DIR": "/opt/ml/output/data",
    "SM_OUTPUT_DIR": "/opt/ml/output",
    "SM_INPUT_CONFIG_DIR": "/opt/ml/input/config",
    # Not a SageMaker variable: SageMaker syncs /opt/ml/checkpoints to S3 for
    # spot training (the estimator's checkpoint_local_path).
    "GATA_CHECKPOINT_DIR": "/opt/ml/checkpoints",
}
ARTIFACT_NAME = "model.tar.gz"
MAX_HYPERPARAMETERS_BYTES = 1_000_000


@dataclass(frozen=True)
class JobPaths:
    """Where a training job reads its data and writes its results."""

    train: Path
    test: Path
    model_dir: Path
    output_data_dir: Path
    checkpoint_dir: Path
    failure_file: Path
    hyperparameters_file: Path
    calibration: Path | None = None  # the optional calibration channel
    baseline: Path | None = None  # the optional baseline channel (the model in service)

    @property
    def artifact(self) -> Path:
        return self.model_dir / ARTIFACT_NAME


def _env(env: Mapping[str, str], name: str) -> Path:
    return Path(env.get(name) or ENV_DEFAULTS[name])


def job_paths(env: Mapping[str, str] | None = None, **overrides: Path | str | None) -> JobPaths:
    """Paths from the SM_* variables (or /opt/ml defaults); non-None overrides win."""
    env = os.environ if env is None else env
    paths = {
        "train": _env(env, "SM_CHANNEL_TRAIN"),
        "test": _env(env, "SM_CHANNEL_TEST"),
        "model_dir": _env(env, "SM_MODEL_DIR"),
        "output_data_dir": _env(env, "SM_OUTPUT_DATA_DIR"),
        "checkpoint_dir": _env(env, "GATA_CHECKPOINT_DIR"),
        "failure_file": _env(env, "SM_OUTPUT_DIR") / "failure",
        "hyperparameters_file": _env(env, "SM_INPUT_CONFIG_DIR") / "hyperparameters.json",
        "calibration": _optional_channel(env, "SM_CHANNEL_CALIBRATION"),
        "baseline": _optional_channel(env, "SM_CHANNEL_BASELINE"),
    }
    paths.update({k: Path(v) for k, v in overrides.items() if v is not None})
    return JobPaths(**paths)


def _optional_channel(env: Mapping[str, str], name: str) -> Path | None:
    """An optional channel: the variable when set (it must exist then), else its default
    folder if present (SageMaker creates a channel's folder only when the job has it)."""
    if env.get(name):
        return Path(env[name])
    default = Path(ENV_DEFAULTS[name])
    return default if default.is_dir() else None


def read_hyperparameters(path: Path, required: bool = False) -> dict[str, object]:
    """SageMaker's hyperparameters.json (values are strings).

    {} when the file is absent and not `required` (SageMaker writes none when a
    job sets no hyperparameters); a file named on the command line is required.
    """
    if not path.is_file():
        if required or path.exists():
            what = "it does not exist" if not path.exists() else "it is not a regular file"
            raise ConfigError(f"{path}: expected a JSON file of hyperparameters, but {what}")
        return {}
    if path.stat().st_size > MAX_HYPERPARAMETERS_BYTES:
        raise ConfigError(
            f"{path}: expected a JSON object of hyperparameters of at most "
            f"{MAX_HYPERPARAMETERS_BYTES:,} bytes, found {path.stat().st_size:,} bytes"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as e:
        found = "nesting too deep" if isinstance(e, RecursionError) else str(e)
        raise ConfigError(
            f"{path}: expected a JSON object of hyperparameters, found invalid JSON: {found}"
        ) from e
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a JSON object of hyperparameters, found {type(data).__name__}"
        )
    return data


def num_gpus(env: Mapping[str, str] | None = None) -> int | None:
    """SM_NUM_GPUS as an integer, or None when it is not set."""
    env = os.environ if env is None else env
    raw = env.get("SM_NUM_GPUS")
    if raw is None or raw == "":
        return None
    if not raw.strip().isdigit():
        raise ConfigError(f"SM_NUM_GPUS: expected a non-negative integer, found {raw!r}")
    return int(raw)


def model_dir(env: Mapping[str, str] | None = None) -> Path:
    """SM_MODEL_DIR: where the job writes model.tar.gz, and where an endpoint finds it extracted."""
    return _env(os.environ if env is None else env, "SM_MODEL_DIR")


def rank() -> int:
    """This process's rank under torchrun (0 without it)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many training processes torchrun started (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def local_env(root: Path, train: Path, test: Path) -> dict[str, str]:
    """SM_* variables for a job run outside SageMaker, every output folder under `root`."""
    return {
        "SM_CHANNEL_TRAIN": str(train),
        "SM_CHANNEL_TEST": str(test),
        "SM_MODEL_DIR": str(root / "model"),
        "SM_OUTPUT_DATA_DIR": str(root / "output" / "data"),
        "SM_OUTPUT_DIR": str(root / "output"),
        "SM_INPUT_CONFIG_DIR": str(root / "config"),
        "GATA_CHECKPOINT_DIR": str(root / "checkpoints"),
    }
