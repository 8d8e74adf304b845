"""Trainer callbacks: metric lines on stdout, progress on stderr, checkpoint markers, SIGTERM."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from gata_ft import checkpoints
from gata_ft.reports import format_log_dict


class EvalPrinter(TrainerCallback):
    """Prints evaluation results to stdout (the metric lines)."""

    def __init__(self, emit: Callable[[str], None]):
        self.emit = emit

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if any(key.startswith("eval_") for key in logs):
            self.emit(format_log_dict(logs))


class PlainProgress(TrainerCallback):
    """One plain line per logging step on stderr: readable in CloudWatch, no carriage returns."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()
        self.first_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        done = state.global_step - self.first_step
        rate = done / max(time.monotonic() - self.started, 1e-9)
        eta = (state.max_steps - state.global_step) / rate if rate else 0
        print(
            f"step {state.global_step}/{state.max_steps} | epoch {state.epoch:.2f} | "
            f"loss {logs['loss']:.4f} | lr {logs.get('learning_rate', 0):.2e} | "
            f"{rate:.2f} steps/s | eta {_duration(eta)}",
            file=sys.stderr,
            flush=True,
        )


class BarProgress(ProgressCallback):
    """tqdm bars on a terminal, with the loss in the bar instead of dict lines below it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        bar = self.training_bar if state.is_world_process_zero else None
        if bar is not None and logs and "loss" in logs:
            bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)


def install_log_callbacks(trainer, emit: Callable[[str], None]) -> None:
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(EvalPrinter(emit))
    trainer.add_callback(BarProgress() if sys.stderr.isatty() else PlainProgress())


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                checkpoints.write_marker(folder, self.fingerprint, state.global_step)


class GracefulStop(TrainerCallback):
    """On SIGTERM (spot interruption), save a checkpoint at the next step and stop."""

    def __init__(self):
        self.received = False
        self._previous = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame):
        self.received = True

    def on_step_end(self, args, state, control, **kwargs):
        received = self.received
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank must stop at the same step, or the others hang in all-reduce.
            flag = torch.tensor([1.0 if received else 0.0], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            received = bool(flag.item())
        if received:
            self.received = True
            control.should_save = True
            control.should_training_stop = True
