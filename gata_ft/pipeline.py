"""The jobs, stage by stage: the only caller of training, calibration, export and artifact writing.

training job: preflight -> train -> report -> calibrate -> export -> write model.tar.gz
export job:   preflight -> read the source -> export -> write model.tar.gz
Both end in the same tail (`_ship`).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from gata_ft import calibration as cal
from gata_ft import checkpoints, preflight, reports
from gata_ft.artifact import compose_metadata, label_entries, write_artifact
from gata_ft.config import TrainConfig
from gata_ft.data import LabelMap, Prepared, read_split, text_pattern
from gata_ft.export.graphs import add_onnx
from gata_ft.export.parity import EvalSet
from gata_ft.export.recipe import Recipe
from gata_ft.launch import launch, process_count, read_spec
from gata_ft.metrics import coverage_curve
from gata_ft.sagemaker import JobPaths, world_size

log = logging.getLogger("gata_ft")
Emit = Callable[[str], None]


def go_offline(allow_download: bool) -> None:
    """Production jobs run with network isolation: never wait on the Hub unless allowed.

    Must run before huggingface_hub is imported, which reads these variables once.
    """
    import os

    value = "0" if allow_download else "1"
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[name] = value


def training_job(
    config: TrainConfig,
    user_set: Sequence[str],
    paths: JobPaths,
    emit: Emit,
    callbacks: Sequence = (),
) -> Path | None:
    """Preflight, then train in this process or, with several GPUs, under torchrun."""
    go_offline(config.allow_download)
    nproc = process_count()
    plan = preflight.training_job(config, paths, nproc)
    emit(preflight.describe(plan.data))
    for warning in preflight.data_warnings(plan.data, config):
        log.warning(warning)
    resume = checkpoints.select_resume(paths.checkpoint_dir, plan.fingerprint, log.warning)
    if nproc > 1:
        launch(nproc, config, user_set, paths, resume)
        return None
    return _train_and_ship(config, user_set, paths, plan, resume, emit, callbacks)


def run_worker(spec_path: Path, emit: Emit) -> None:
    """One torchrun process: the launcher's data and config, then the Trainer."""
    config, user_set, paths, resume = read_spec(spec_path)
    go_offline(config.allow_download)
    plan = preflight.training_job(config, paths, world_size())
    _train_and_ship(config, user_set, paths, plan, resume, emit)


def _train_and_ship(config, user_set, paths, plan, resume, emit, callbacks=()) -> Path | None:
    from gata_ft import train

    started = time.monotonic()
    trained = train.run(
        config, paths.checkpoint_dir, plan.data, plan.base, plan.fingerprint, resume, emit,
        callbacks,
    )  # fmt: skip
    if trained is None:  # not the main process
        return None
    data = plan.data
    report = reports.build_report(
        trained.test.logits, trained.test.class_ids, data.label_map, trained.test.loss
    )
    final = {f"eval_{k}": v for k, v in report.scalars.items()}
    emit(reports.format_log_dict({**final, "epoch": trained.epoch}))
    emit(f"train_loss: {trained.train_loss:.6f}")
    emit(reports.format_report(report))
    emit(summary_line(report, data))
    written = reports.write_reports(report, paths.output_data_dir)
    emit(f"wrote {', '.join(str(p) for p in written)}")
    calibration = _calibrate(config, trained, data.label_map, paths.output_data_dir, emit)
    train.fold_temperature(trained.model, calibration["temperature"], len(data.label_map))
    training = {**trained.training, "runtime_seconds": round(time.monotonic() - started, 1)}
    metadata = _training_metadata(config, user_set, plan.base, data, report, training)
    with tempfile.TemporaryDirectory(prefix="gata-ft-artifact-") as staging:
        content = Path(staging)
        train.save_checkpoint(trained.model, trained.tokenizer, content)
        evaluation = EvalSet(
            data.test.texts, data.label_map.class_ids(data.test.labels), data.label_map.labels
        )
        return _ship(
            content, metadata | {"calibration": calibration}, plan.recipe, config.max_length,
            evaluation, config.strict_parity, paths.artifact, emit,
            parity_file=paths.output_data_dir / "parity.json",
        )  # fmt: skip


def export_job(
    source_path: Path,
    output: Path,
    recipe_name: str,
    test_dir: Path | None,
    strict: bool,
    max_length: int | None,
    normalize_text: bool,
    force: bool,
    emit: Emit,
) -> Path:
    """`gata-ft export`: a format-2 tarball (checkpoint + ONNX graphs) for `source_path`."""
    from gata_ft import upgrade

    go_offline(False)
    recipe = preflight.export_job(source_path, output, recipe_name, force)
    split = read_split(test_dir, "test", normalize=normalize_text) if test_dir else None
    with tempfile.TemporaryDirectory(prefix="gata-ft-export-") as scratch:
        source = upgrade.read_source(source_path, Path(scratch), max_length)
        emit(f"{source_path}: {source.kind} checkpoint, {len(source.labels)} labels")
        label_map = source.label_map
        evaluation, test_counts = None, None
        if split is not None:
            label_map.check_covers(split)
            evaluation = EvalSet(split.texts, label_map.class_ids(split.labels), label_map.labels)
            test_counts = Counter(split.labels)
        limit = preflight.position_limit(source.folder, str(source_path))
        if max_length is None and limit is not None and source.max_length > limit:
            # an old job's 512 on a model with fewer positions: it truncated at the limit
            source = replace(source, max_length=limit)
        preflight.check_max_length(source.max_length, source.folder, str(source_path))
        content = Path(scratch) / "content"
        upgrade.normalize_checkpoint(source, content)
        metadata = upgrade.carried_metadata(source, test_counts)
        metadata.setdefault("text", {"pattern": text_pattern().pattern, "normalized": False})
        return _ship(
            content, metadata | {"max_length": source.max_length}, recipe, source.max_length,
            evaluation, strict, output, emit,
        )  # fmt: skip


def _ship(
    content: Path,
    metadata: dict,
    recipe: Recipe,
    max_length: int,
    evaluation: EvalSet | None,
    strict: bool,
    destination: Path,
    emit: Emit,
    parity_file: Path | None = None,
) -> Path:
    """The common tail: ONNX graphs and the parity gate, then metadata and the tarball."""
    blocks = add_onnx(content, max_length, recipe, evaluation, strict, emit)
    serving = f"serving {blocks['serve']['graph']}: {blocks['serve']['reason']}"
    if parity_file is not None:
        parity_file.write_text(json.dumps(blocks["parity"], indent=2) + "\n", encoding="utf-8")
        emit(f"{serving}; wrote {parity_file}")
    artifact = write_artifact(content, compose_metadata(**metadata, export=blocks), destination)
    if parity_file is not None:
        emit(f"wrote {artifact} ({artifact.stat().st_size / 1e6:.1f} MB)")
    else:
        emit(f"wrote {artifact}; {serving}")
    return artifact


def _calibrate(config: TrainConfig, trained, label_map: LabelMap, out_dir: Path, emit) -> dict:
    """Temperature and routing threshold from the calibration split, reported on the test set."""
    if trained.calibration is None:
        why = "calibration_split=0" if config.calibration_split <= 0 else "no rows held out"
        emit(f"calibration: off ({why}): raw softmax scores, no routing threshold")
        return {"fitted": False, "temperature": 1.0, "threshold": None}
    test, held = trained.test, trained.calibration
    fitted = cal.calibrate(
        test.logits, test.class_ids, held.logits, held.class_ids, config.target_accuracy,
        label_map.labels,
    )  # fmt: skip
    result, t = fitted.result, fitted.result["test"]
    threshold, on_test = result["threshold"], result["routing_test"]
    emit(
        f"calibration: temperature {result['temperature']:.4f} fitted on "
        f"{result['calibration_rows']} held-out rows; "
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
    reports.plot_reliability(
        fitted.test_before, fitted.test_after, test.class_ids, out_dir / "reliability_diagram.png"
    )
    curves = {
        "calibration split": coverage_curve(fitted.calibration_after, held.class_ids),
        "test": coverage_curve(fitted.test_after, test.class_ids),
    }
    reports.plot_coverage(
        curves, threshold, config.target_accuracy, out_dir / "coverage_accuracy.png"
    )
    return result


def summary_line(report: reports.Report, data: Prepared) -> str:
    counts = data.test.counts()
    majority = max(counts.values()) / len(data.test)
    return (
        f"test accuracy {report.scalars['accuracy']:.4f}, macro F1 "
        f"{report.scalars['f1_macro']:.4f} on {len(data.test)} tickets, "
        f"{len(data.label_map)} queues (always answering the largest queue: {majority:.4f})"
    )


def _training_metadata(config, user_set, base, data: Prepared, report, training) -> dict:
    """The training job's metadata blocks, as `compose_metadata` arguments."""
    # counts of the training channel as written, calibration rows included
    train_counts, test_counts = data.train.counts(), data.test.counts()
    if data.calibration is not None:
        train_counts += data.calibration.counts()
    held = len(data.calibration) if data.calibration is not None else 0
    return {
        "base_model": {"name": base.name, "source": base.source},
        "max_length": config.max_length,
        "text": {"pattern": text_pattern().pattern, "normalized": config.normalize_text},
        "labels": label_entries(data.label_map.labels, train_counts, test_counts),
        "hyperparameters": {"values": config.to_dict(), "user_set": list(user_set)},
        "training": training,
        "metrics": {"test": {**report.scalars, "per_class": report.per_class}},
        "data": {
            split.name: {
                "file": split.path.name,
                "sha256": split.sha256,
                "rows": len(split) + (held if split is data.train else 0),
                "normalized_rows": split.normalized_rows,
            }
            for split in (data.train, data.test)
        },
    }
