"""The training job around the Trainer: validate, pick a checkpoint, launch the processes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from gata_ft import checkpoints
from gata_ft.calibration import MIN_ROWS_TO_HOLD_OUT, split_for_calibration
from gata_ft.config import TrainConfig
from gata_ft.data import LabelMap, Split, balance_table, read_split
from gata_ft.errors import GataError, WorkerFailed
from gata_ft.sagemaker import JobPaths, num_gpus

log = logging.getLogger("gata_ft")
Emit = Callable[[str], None]
MIN_ROWS_PER_CLASS = 5


@dataclass(frozen=True)
class Prepared:
    """What every training process needs besides the config: validated data and its identity."""

    train: Split
    test: Split
    label_map: LabelMap
    fingerprint: str
    calibration: Split | None = None


def prepare(config: TrainConfig, paths: JobPaths, num_processes: int) -> Prepared:
    """Read and validate both channels; fail before any model is loaded."""
    train = read_split(paths.train, "train", normalize=config.normalize_text)
    test = read_split(paths.test, "test", normalize=config.normalize_text)
    label_map = LabelMap.from_split(train)
    label_map.check_covers(test)
    kept, held = split_for_calibration(train.labels, config.calibration_split, config.seed)
    calibration = _subset(train, held, "calibration") if held else None
    train = _subset(train, kept, "train")
    fingerprint = checkpoints.fingerprint(
        {
            "train": train.sha256,
            "test": test.sha256,
            "labels": list(label_map.labels),
            "config": config.to_dict(),
            "num_processes": num_processes,
        }
    )
    return Prepared(train, test, label_map, fingerprint, calibration)


def _subset(split: Split, rows: list[int], name: str) -> Split:
    return Split(
        name,
        split.path,
        [split.texts[i] for i in rows],
        [split.labels[i] for i in rows],
        [split.lines[i] for i in rows],
        split.sha256,
        split.normalized_rows,
    )


def describe(prepared: Prepared) -> str:
    """The data summary the job prints: sizes, repairs and the class balance of each split."""
    lines = []
    splits = [s for s in (prepared.train, prepared.calibration, prepared.test) if s]
    for split in splits:
        line = f"{split.name}: {len(split)} rows from {split.path}"
        if split.normalized_rows:
            line += f" ({split.normalized_rows} texts normalised)"
        lines.append(line)
    lines.append(f"{len(prepared.label_map)} labels; rows per label and split:")
    lines.append(balance_table(prepared.label_map, splits))
    return "\n".join(lines)


def data_warnings(prepared: Prepared, config: TrainConfig) -> list[str]:
    warnings, labels = [], prepared.label_map.labels
    for split, purpose in ((prepared.train, "training rows, too few to learn"),
                           (prepared.test, "test rows, too few to evaluate")):  # fmt: skip
        counts = split.counts()
        few = [str(x) for x in labels if counts[x] < MIN_ROWS_PER_CLASS]
        if few:
            warnings.append(
                f"labels with fewer than {MIN_ROWS_PER_CLASS} {purpose}: " + ", ".join(few)
            )
    if prepared.calibration is not None:
        present = set(prepared.calibration.labels)
        absent = [str(x) for x in labels if x not in present]
        if absent:
            warnings.append(
                f"{len(absent)} of {len(labels)} labels give no calibration rows (fewer than "
                f"{MIN_ROWS_TO_HOLD_OUT} training rows): the temperature and the routing "
                "threshold are fitted without them and may not hold for them; check "
                "routing_test in calibration.json: " + ", ".join(absent)
            )
    elif config.calibration_split > 0:
        warnings.append(
            f"no label has {MIN_ROWS_TO_HOLD_OUT} training rows to spare for the calibration "
            "split: probabilities stay uncalibrated and nothing will be routed automatically"
        )
    overlap = len(set(prepared.train.texts) & set(prepared.test.texts))
    if overlap:
        warnings.append(
            f"{overlap} test texts also appear in the training data; "
            "test metrics overstate accuracy on new tickets"
        )
    return warnings


def go_offline(allow_download: bool) -> None:
    """Production jobs run with network isolation: never wait on the Hub unless allowed.

    Must run before huggingface_hub is imported, which reads these variables once.
    """
    value = "0" if allow_download else "1"
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[name] = value


def process_count() -> int:
    """One process per GPU: SM_NUM_GPUS, else the GPUs torch sees; 1 on a CPU."""
    gpus = num_gpus()
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    return max(gpus, 1)


def run_job(
    config: TrainConfig,
    user_set: Sequence[str],
    paths: JobPaths,
    emit: Emit,
    callbacks: Sequence = (),
) -> None:
    """Validate, then train in this process or, with several GPUs, under torchrun."""
    go_offline(config.allow_download)
    nproc = process_count()
    prepared = prepare(config, paths, nproc)
    emit(describe(prepared))
    for warning in data_warnings(prepared, config):
        log.warning(warning)
    resume = checkpoints.select_resume(paths.checkpoint_dir, prepared.fingerprint, log.warning)
    if nproc > 1:
        _launch(nproc, config, user_set, paths, resume)
        return
    from gata_ft.train import run

    run(config, user_set, paths, prepared, resume, emit, callbacks)


def _launch(
    nproc: int,
    config: TrainConfig,
    user_set: Sequence[str],
    paths: JobPaths,
    resume: Path | None,
) -> None:
    """Run the worker on every GPU with PyTorch's own launcher (torchrun, DDP)."""
    spec = {
        "config": config.to_dict(),
        "user_set": list(user_set),
        "paths": {k: str(v) for k, v in asdict(paths).items()},
        "resume_from": str(resume) if resume else None,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="gata-ft-worker-") as f:
        json.dump(spec, f)
        f.flush()
        command = launch_command(nproc, f.name)
        log.info("launching %d training processes: %s", nproc, " ".join(command))
        returncode = subprocess.call(command)
    if returncode != 0:
        if paths.failure_file.is_file():  # the main worker already said why
            raise WorkerFailed(paths.failure_file.read_text(encoding="utf-8").strip())
        raise GataError(
            f"distributed training failed: torchrun exited with code {returncode}; "
            "the first error of a worker is in the log above"
        )


def launch_command(nproc: int, spec_path: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "gata_ft",
        "worker",
        spec_path,
    ]


def run_worker(spec_path: Path, emit: Emit) -> None:
    """One torchrun process: the same data and config as the launcher, then the Trainer."""
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    config = TrainConfig(**spec["config"])
    paths = JobPaths(**{k: Path(v) for k, v in spec["paths"].items()})
    go_offline(config.allow_download)
    prepared = prepare(config, paths, int(os.environ.get("WORLD_SIZE", "1")))
    resume = Path(spec["resume_from"]) if spec["resume_from"] else None
    from gata_ft.train import run

    run(config, spec["user_set"], paths, prepared, resume, emit)
