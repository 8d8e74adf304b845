"""Process count and the torchrun launch of one training process per GPU."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from gata_ft.config import TrainConfig
from gata_ft.errors import GataError, WorkerFailed
from gata_ft.sagemaker import JobPaths, num_gpus

log = logging.getLogger("gata_ft")


def process_count() -> int:
    """One process per GPU: SM_NUM_GPUS, else the GPUs torch sees; 1 on a CPU."""
    gpus = num_gpus()
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    return max(gpus, 1)


def launch(
    nproc: int,
    config: TrainConfig,
    user_set: Sequence[str],
    paths: JobPaths,
    resume: Path | None,
) -> None:
    """Run `gata_ft worker` on every GPU with PyTorch's own launcher (torchrun, DDP)."""
    spec = {
        "config": config.to_dict(),
        "user_set": list(user_set),
        "paths": {k: str(v) for k, v in asdict(paths).items() if v is not None},
        "resume_from": str(resume) if resume else None,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="gata-ft-worker-") as f:
        json.dump(spec, f)
        f.flush()
        command = launch_command(nproc, f.name)
        log.info("launching %d training processes: %s", nproc, " ".join(command))
        returncode, forwarded = _run_forwarding_sigterm(command)
    if returncode != 0:
        if paths.failure_file.is_file():  # the main worker already said why
            raise WorkerFailed(paths.failure_file.read_text(encoding="utf-8").strip())
        if forwarded:
            raise GataError(
                "received SIGTERM: passed to the training processes, which stopped (torchrun "
                f"exited with code {returncode}); a restarted job resumes from the last checkpoint"
            )
        raise GataError(
            f"distributed training failed: torchrun exited with code {returncode}; "
            "the first error of a worker is in the log above"
        )


def _run_forwarding_sigterm(command: list[str]) -> tuple[int, bool]:
    """Run torchrun; a SIGTERM (spot interruption) goes to it and on to the workers.

    The workers save a checkpoint at their next step and stop; waiting for them
    instead of raising here keeps that checkpoint (torchrun forwards the signal).
    """
    process = subprocess.Popen(command)
    forwarded = []

    def forward(signum, frame):
        forwarded.append(signum)
        process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        returncode = process.wait()
    except BaseException:  # Ctrl-C or another failure here: stop the workers too
        process.terminate()
        process.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return returncode, bool(forwarded)


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


def read_spec(spec_path: Path) -> tuple[TrainConfig, list[str], JobPaths, Path | None]:
    """What `launch` wrote for the workers."""
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    paths = JobPaths(**{k: Path(v) for k, v in spec["paths"].items()})
    resume = Path(spec["resume_from"]) if spec["resume_from"] else None
    return TrainConfig(**spec["config"]), spec["user_set"], paths, resume
