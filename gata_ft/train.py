"""The training run: validated splits -> fine-tuned checkpoint -> metrics -> model.tar.gz."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from gata_ft import __version__, checkpoints
from gata_ft.artifact import FORMAT_VERSION, library_versions, write_artifact
from gata_ft.config import TrainConfig
from gata_ft.data import LabelMap, Split, text_pattern
from gata_ft.errors import ConfigError, GataError, JobInterrupted
from gata_ft.export import EvalSet, Recipe, add_onnx
from gata_ft.job import Prepared
from gata_ft.metrics import Report, build_report, format_report, trainer_metrics, write_reports
from gata_ft.modeling import BaseModel, resolve_base_model
from gata_ft.sagemaker import JobPaths

log = logging.getLogger("gata_ft")


@dataclass(frozen=True)
class TrainResult:
    artifact: Path
    report: Report
    metadata: dict


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def run(
    config: TrainConfig,
    user_set: Sequence[str],
    paths: JobPaths,
    prepared: Prepared,
    resume_from: Path | None,
    emit: Callable[[str], None] = print,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult | None:
    """Fine-tune, evaluate on the test split and write the artifact; None on non-zero ranks."""
    started = time.monotonic()
    main = is_main_process()
    cuda = torch.cuda.is_available()
    precision = choose_precision(config, cuda)
    label_map = prepared.label_map

    base = resolve_base_model(config.base_model, config.allow_download)
    log.info("base model %s from %s (%s)", base.name, base.path, base.source)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    set_seed(config.seed)  # the new head's initial weights come from the global RNG
    model = _load_model(base, label_map)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and config.max_length > limit:
        raise ConfigError(
            f"max_length: expected at most {limit} (the base model's position limit), "
            f"found {config.max_length}"
        )

    train_ds = _tokenize(prepared.train, label_map, tokenizer, config.max_length)
    test_ds = _tokenize(prepared.test, label_map, tokenizer, config.max_length)
    args = _training_args(config, paths, cuda, precision)
    marker = _CheckpointMarker(prepared.fingerprint)
    stop = _GracefulStop()
    trainer_class, extra = Trainer, {}
    if config.class_weighting:
        trainer_class = _WeightedTrainer
        extra = {"class_weights": class_weights(prepared.train, label_map)}
    trainer = trainer_class(
        **extra,
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=test_ds,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if cuda else None),
        compute_metrics=trainer_metrics(len(label_map)),
        callbacks=[marker, stop, *callbacks],
    )
    _install_log_callbacks(trainer, emit)
    if config.early_stopping_patience:
        trainer.add_callback(EarlyStoppingCallback(config.early_stopping_patience))

    resumed_step = None
    if resume_from is not None:
        resumed_step = int(resume_from.name.split("-")[1])
        log.info("resuming from %s (step %d)", resume_from, resumed_step)
    with warnings.catch_warnings():
        # Checkpoint rotation falls back to step order when mtimes tie: what we want.
        warnings.filterwarnings("ignore", message="mtime may not be reliable")
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if stop.received:
        raise JobInterrupted(
            f"received SIGTERM at step {trainer.state.global_step}: saved a checkpoint in "
            f"{paths.checkpoint_dir}; a restarted job resumes from it"
        )

    # The best checkpoint is loaded now (load_best_model_at_end); evaluate it once more
    # for the full report: per-class metrics and the confusion matrix.
    # label_ids, not test_ds["labels"]: with group_by_length the Trainer evaluates in
    # length-sorted order, and returns predictions and labels in that order.
    prediction = trainer.predict(test_ds, metric_key_prefix="eval")
    calibration_prediction = None
    if prepared.calibration is not None:
        calibration_ds = _tokenize(prepared.calibration, label_map, tokenizer, config.max_length)
        calibration_prediction = trainer.predict(calibration_ds, metric_key_prefix="calibration")
    if not main:
        return None
    report = build_report(
        prediction.predictions, prediction.label_ids, label_map, prediction.metrics["eval_loss"]
    )
    final = {f"eval_{k}": v for k, v in report.scalars.items()}
    emit(format_log_dict({**final, "epoch": trainer.state.epoch}))
    emit(f"train_loss: {output.training_loss:.6f}")
    emit(format_report(report))
    emit(summary_line(report, prepared))
    written = write_reports(report, paths.output_data_dir)
    emit(f"wrote {', '.join(str(p) for p in written)}")
    calibrated = calibrate(
        config, prediction, calibration_prediction, label_map, paths.output_data_dir, emit
    )
    _fold_temperature(trainer.model, calibrated["temperature"], len(label_map))

    training = {
        "device": "cuda" if cuda else "cpu",
        "precision": precision,
        "num_processes": world_size(),
        "global_step": trainer.state.global_step,
        "epochs": float(trainer.state.epoch or 0),
        "train_loss": float(output.training_loss),
        "best_checkpoint_step": _step_of(trainer.state.best_model_checkpoint),
        "resumed_from_step": resumed_step,
        "runtime_seconds": round(time.monotonic() - started, 1),
    }
    metadata = build_metadata(config, user_set, base, prepared, report, training)
    metadata["calibration"] = calibrated
    with tempfile.TemporaryDirectory(prefix="gata-ft-artifact-") as staging:
        content = Path(staging)
        trainer.model.save_pretrained(content, safe_serialization=True)
        tokenizer.save_pretrained(content)
        evaluation = EvalSet(
            prepared.test.texts, label_map.class_ids(prepared.test.labels), label_map.labels
        )
        recipe = Recipe.load(config.export_recipe)
        blocks = add_onnx(
            content, config.max_length, recipe, evaluation, config.strict_parity, emit
        )
        metadata.update(blocks)
        parity_file = paths.output_data_dir / "parity.json"
        parity_file.write_text(json.dumps(blocks["parity"], indent=2) + "\n", encoding="utf-8")
        emit(
            f"serving {blocks['serve']['graph']}: {blocks['serve']['reason']}; wrote {parity_file}"
        )
        artifact = write_artifact(content, metadata, paths.artifact)
    emit(f"wrote {artifact} ({artifact.stat().st_size / 1e6:.1f} MB)")
    return TrainResult(artifact, report, metadata)


def class_weights(split: Split, label_map: LabelMap) -> torch.Tensor:
    """Inverse label frequency, mean 1: a queue with 100x fewer tickets weighs 100x more."""
    counts = split.counts()
    n, k = len(split), len(label_map)
    weights = [n / (k * counts[label]) for label in label_map.labels]
    return torch.tensor(weights, dtype=torch.float32)


class _WeightedTrainer(Trainer):
    """Class-weighted cross-entropy in training; evaluation losses stay unweighted."""

    def __init__(self, *args, class_weights: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.class_weights = class_weights
        # The loss below is a per-batch mean: the Trainer must divide it by the
        # gradient-accumulation steps, as it does for models without loss kwargs.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = torch.nn.functional.cross_entropy(
            outputs.logits,
            labels,
            weight=self.class_weights.to(outputs.logits.device),
            label_smoothing=self.args.label_smoothing_factor,
        )
        return (loss, outputs) if return_outputs else loss


def calibrate(config, test_prediction, calibration_prediction, label_map, out_dir, emit) -> dict:
    """Temperature and routing threshold from the calibration split, reported on the test set."""
    from gata_ft import calibration as cal

    test_logits, test_labels = test_prediction.predictions, test_prediction.label_ids
    if calibration_prediction is None:
        why = "calibration_split=0" if config.calibration_split <= 0 else "no rows held out"
        emit(f"calibration: off ({why}): raw softmax scores, no routing threshold")
        return {"fitted": False, "temperature": 1.0, "threshold": None}
    cal_logits, cal_labels = calibration_prediction.predictions, calibration_prediction.label_ids
    temperature = cal.fit_temperature(cal_logits, cal_labels)
    before, after = cal.softmax(test_logits), cal.softmax(test_logits, temperature)
    cal_after = cal.softmax(cal_logits, temperature)
    threshold = cal.recommend_threshold(cal_after, cal_labels, config.target_accuracy)
    on_cal = cal.routing_report(cal_after, cal_labels, threshold, label_map.labels)
    on_test = cal.routing_report(after, test_labels, threshold, label_map.labels)
    result = {
        "fitted": True,
        "temperature": temperature,
        "applied": "folded into the classifier's weights: every graph outputs calibrated logits",
        "calibration_rows": len(cal_labels),
        "ece_bins": cal.ECE_BINS,
        "test": {
            "ece_before": cal.ece(before, test_labels),
            "ece_after": cal.ece(after, test_labels),
            "nll_before": cal.nll(before, test_labels),
            "nll_after": cal.nll(after, test_labels),
        },
        "target_accuracy": config.target_accuracy,
        "threshold": threshold,
        "routing_calibration_split": {k: v for k, v in on_cal.items() if k != "per_class"},
        "routing_test": on_test,
    }
    t = result["test"]
    emit(
        f"calibration: temperature {temperature:.4f} fitted on {len(cal_labels)} held-out rows; "
        f"test ECE {t['ece_before']:.4f} -> {t['ece_after']:.4f}, "
        f"NLL {t['nll_before']:.4f} -> {t['nll_after']:.4f}"
    )
    if threshold is None:
        emit(f"routing: no threshold reaches {config.target_accuracy} accuracy on the calibration "
             "split; nothing would be routed automatically")  # fmt: skip
    else:
        accuracy = on_test["accuracy"]
        emit(
            f"routing: threshold {threshold:.4f} for accuracy {config.target_accuracy}; on the "
            f"test set it routes {100 * on_test['coverage']:.1f}% of tickets automatically at "
            f"{'-' if accuracy is None else f'{100 * accuracy:.2f}%'} accuracy"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    cal.plot_reliability(before, after, test_labels, out_dir / "reliability_diagram.png")
    curves = {
        "calibration split": cal.coverage_curve(cal_after, cal_labels),
        "test": cal.coverage_curve(after, test_labels),
    }
    cal.plot_coverage(curves, threshold, config.target_accuracy, out_dir / "coverage_accuracy.png")
    return result


def _fold_temperature(model, temperature: float, num_labels: int) -> None:
    """Divide the output layer by the temperature: logits / T without any code that knows it."""
    if temperature == 1.0:
        return
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    last = next(m for m in reversed(head) if m.out_features == num_labels)
    with torch.no_grad():
        last.weight.div_(temperature)
        if last.bias is not None:
            last.bias.div_(temperature)


def summary_line(report: Report, prepared: Prepared) -> str:
    counts = prepared.test.counts()
    majority = max(counts.values()) / len(prepared.test)
    return (
        f"test accuracy {report.scalars['accuracy']:.4f}, macro F1 "
        f"{report.scalars['f1_macro']:.4f} on {len(prepared.test)} tickets, "
        f"{len(prepared.label_map)} queues (always answering the largest queue: {majority:.4f})"
    )


def _load_model(base: BaseModel, label_map: LabelMap):
    from transformers.utils import logging as hf_logging

    # The "newly initialized: classifier.weight" warning is expected for a
    # base model; say it once in our own words instead.
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            base.path,
            num_labels=len(label_map),
            id2label=label_map.id2label,
            label2id=label_map.label2id,
            ignore_mismatched_sizes=True,
        )
    except (OSError, ValueError) as e:
        raise GataError(f"base model {base.name} ({base.path}) cannot be loaded: {e}") from e
    finally:
        hf_logging.set_verbosity(previous)
    log.info("new classification head with %d labels on %s", len(label_map), base.name)
    return model


def _tokenize(split: Split, label_map: LabelMap, tokenizer, max_length: int):
    from datasets import Dataset

    # Tokenized once, unpadded; the collator pads each batch to its longest
    # ticket and the length-grouped sampler keeps those lengths similar.
    encoded = tokenizer(split.texts, truncation=True, max_length=max_length)
    return Dataset.from_dict({**encoded, "labels": label_map.class_ids(split.labels)})


def choose_precision(config: TrainConfig, cuda: bool) -> str:
    """fp16 on CUDA unless the user chose otherwise; fp32 on a CPU; bf16 on request."""
    fp16 = config.fp16 if config.fp16 is not None else (cuda and not config.bf16)
    if fp16 and not cuda:
        raise ConfigError(
            "fp16: expected a CUDA GPU for fp16 mixed precision, found none; "
            "leave fp16 unset (automatic) or use bf16"
        )
    return "fp16" if fp16 else "bf16" if config.bf16 else "fp32"


def _training_args(config: TrainConfig, paths: JobPaths, cuda: bool, precision: str):
    per_epoch = config.eval_steps == 0
    return TrainingArguments(
        output_dir=str(paths.checkpoint_dir),
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        gradient_checkpointing=config.gradient_checkpointing,
        num_train_epochs=config.num_train_epochs,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_ratio=config.warmup_ratio,
        lr_scheduler_type=config.lr_scheduler_type,
        label_smoothing_factor=config.label_smoothing_factor,
        seed=config.seed,
        data_seed=config.seed,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        eval_strategy="epoch" if per_epoch else "steps",
        save_strategy="epoch" if per_epoch else "steps",
        eval_steps=None if per_epoch else config.eval_steps,
        save_steps=None if per_epoch else config.eval_steps,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model=config.metric_for_best_model,
        greater_is_better=config.metric_for_best_model != "loss",
        logging_steps=config.logging_steps,
        group_by_length=True,
        report_to="none",
        disable_tqdm=True,  # progress is ours: a bar on a terminal, plain lines elsewhere
        dataloader_pin_memory=cuda,
        ddp_backend="gloo" if world_size() > 1 and not cuda else None,
        ddp_find_unused_parameters=False,
        use_cpu=not cuda,
    )


def _step_of(checkpoint: str | None) -> int | None:
    return int(checkpoint.rsplit("-", 1)[1]) if checkpoint else None


def build_metadata(
    config: TrainConfig,
    user_set: Sequence[str],
    base: BaseModel,
    prepared: Prepared,
    report: Report,
    training: dict,
) -> dict:
    # counts of the training channel as written, calibration rows included
    train_counts, test_counts = prepared.train.counts(), prepared.test.counts()
    if prepared.calibration is not None:
        train_counts += prepared.calibration.counts()
    held = len(prepared.calibration) if prepared.calibration is not None else 0
    return {
        "format_version": FORMAT_VERSION,
        "gata_ft_version": __version__,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "task": "text-classification",
        "base_model": {"name": base.name, "source": base.source},
        "max_length": config.max_length,
        "text": {"pattern": text_pattern().pattern, "normalized": config.normalize_text},
        "labels": [
            {
                "class_id": i,
                "label": label,
                "train_count": train_counts[label],
                "test_count": test_counts.get(label, 0),
            }
            for i, label in enumerate(prepared.label_map.labels)
        ],
        "hyperparameters": {"values": config.to_dict(), "user_set": list(user_set)},
        "training": training,
        "metrics": {"test": {**report.scalars, "per_class": report.per_class}},
        "libraries": library_versions(),
        "data": {
            split.name: {
                "file": split.path.name,
                "sha256": split.sha256,
                "rows": len(split) + (held if split is prepared.train else 0),
                "normalized_rows": split.normalized_rows,
            }
            for split in (prepared.train, prepared.test)
        },
    }


def format_log_dict(logs: dict) -> str:
    """A Trainer log as a Python-dict line whose numbers SageMaker's regexes can read.

    Fixed-point floats: `'eval_loss': 1.2e-05` would be scraped as 1.2.
    """
    parts = []
    for key, value in logs.items():
        if isinstance(value, float | np.floating):
            parts.append(f"'{key}': {float(value):.6f}")
        elif isinstance(value, int | np.integer):
            parts.append(f"'{key}': {int(value)}")
    return "{" + ", ".join(parts) + "}"


class _EvalPrinter(TrainerCallback):
    """Prints evaluation results and the final train_loss line to stdout (the metric lines)."""

    def __init__(self, emit: Callable[[str], None]):
        self.emit = emit

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if any(key.startswith("eval_") for key in logs):
            self.emit(format_log_dict(logs))


class _PlainProgress(TrainerCallback):
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


class _BarProgress(ProgressCallback):
    """tqdm bars on a terminal, with the loss in the bar instead of dict lines below it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        bar = self.training_bar if state.is_world_process_zero else None
        if bar is not None and logs and "loss" in logs:
            bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)


def _install_log_callbacks(trainer: Trainer, emit: Callable[[str], None]) -> None:
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_EvalPrinter(emit))
    trainer.add_callback(_BarProgress() if sys.stderr.isatty() else _PlainProgress())


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class _CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                checkpoints.write_marker(folder, self.fingerprint, state.global_step)


class _GracefulStop(TrainerCallback):
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
