"""The jobs, stage by stage: the only caller of training, calibration, export and artifact writing.

training job: preflight -> train -> report -> calibrate -> export -> write model.tar.gz
export job:   preflight -> read the source -> export -> write model.tar.gz
Both end in the same tail (`_ship`).
"""

from __future__ import annotations

import errno
import json
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from gata_ft import calibration as cal
from gata_ft import card, checkpoints, files, metrics, preflight, promotion, reports
from gata_ft.artifact import METADATA, SCOPE, compose_metadata, label_entries, write_artifact
from gata_ft.config import TrainConfig
from gata_ft.data import LabelMap, Prepared, Split, read_split, text_pattern
from gata_ft.errors import PromotionError, RoutingError
from gata_ft.export.graphs import add_onnx
from gata_ft.export.parity import EvalSet
from gata_ft.export.recipe import Recipe
from gata_ft.export.reference import forward_scores
from gata_ft.launch import launch, process_count, read_spec
from gata_ft.metrics import coverage_curve
from gata_ft.reports import describe_calibration, routing_shortfall
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
    for folder in (paths.model_dir, paths.output_data_dir):
        for path in files.remove_partials(folder):
            log.warning("removed %s, left by an interrupted run", path)
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
    try:
        _train_and_ship(config, user_set, paths, plan, resume, emit)
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Shut this rank's process group down before the interpreter exits.

    Left to the interpreter's exit, gloo's threads can abort the process
    ("terminate called without an active exception", SIGABRT): seen once in CI
    on a rank that had finished training, which failed the whole job.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # never hide what the job itself raised
            log.warning("could not shut the process group down: %s", e)


def _train_and_ship(config, user_set, paths, plan, resume, emit, callbacks=()) -> Path | None:
    from gata_ft import train

    started = time.monotonic()
    try:
        trained = train.run(
            config, paths.checkpoint_dir, plan.data, plan.base, plan.fingerprint, resume, emit,
            callbacks,
        )  # fmt: skip
    except OSError as e:
        if e.errno == errno.ENOSPC:  # free what the half-written checkpoint holds
            for checkpoint in checkpoints.discard_incomplete(paths.checkpoint_dir):
                log.warning("removed the incomplete %s (the disk is full)", checkpoint)
        raise
    if trained is None:  # not the main process
        return None
    data = plan.data
    test = _rows(trained, data.test, data.label_map, config.max_length)
    loss = metrics.nll(metrics.softmax(test.logits.astype(np.float64)), test.class_ids)
    report = reports.build_report(test.logits, test.class_ids, data.label_map, loss)
    final = {f"eval_{k}": v for k, v in report.scalars.items()}
    emit(reports.format_log_dict({**final, "epoch": trained.epoch}))
    emit(f"train_loss: {trained.train_loss:.6f}")
    emit(reports.format_report(report))
    emit(summary_line(report, data))
    written = reports.write_reports(report, paths.output_data_dir)
    emit(f"wrote {', '.join(str(p) for p in written)}")
    calibrated = _calibrate(config, trained, data, test, paths.output_data_dir, emit)
    calibration = calibrated.result if calibrated else {"fitted": False, "temperature": 1.0,
                                                        "threshold": None}  # fmt: skip
    train.fold_temperature(trained.model, calibration["temperature"], len(data.label_map))
    training = {**trained.training, "runtime_seconds": round(time.monotonic() - started, 1)}
    metadata = _training_metadata(config, user_set, plan.base, data, report, training)
    with tempfile.TemporaryDirectory(prefix="gata-ft-artifact-") as staging:
        content = Path(staging)
        train.save_checkpoint(trained.model, trained.tokenizer, content)
        routing = None
        if calibrated and calibrated.scope is not None:
            calibrated.scope.save(content / SCOPE)
            routing = (calibrated.rule, calibrated.scope)
        evaluation = EvalSet(
            data.test.texts, data.label_map.class_ids(data.test.labels), data.label_map.labels,
            routing,
        )  # fmt: skip
        review = None
        if paths.baseline is not None:
            review = partial(_review, config, paths, data.test, emit)
        return _ship(
            content, metadata | {"calibration": calibration}, plan.recipe, config.max_length,
            evaluation, config.strict_parity, paths.artifact, emit,
            parity_file=paths.output_data_dir / "parity.json", review=review,
        )  # fmt: skip


def _review(config, paths, test: Split, emit: Emit, content: Path, metadata: dict) -> dict:
    """The new model against the one in service (the baseline channel), on the test set."""
    from gata_ft.runtime import Model

    files.write_text(content / METADATA, json.dumps(metadata) + "\n")  # for the runtime
    new = Model(content, verify_files=False)  # just built: no file table yet
    baseline = Model.load(paths.baseline)  # a folder holding model.tar.gz loads that
    try:
        block = promotion.compare_models(new, baseline, test)
    finally:
        baseline.close()
    for line in promotion.describe(block):
        emit(line)
    files.write_text(paths.output_data_dir / "promotion.json", json.dumps(block, indent=2) + "\n")
    if config.require_improvement and block["verdict"] == "keep":
        raise PromotionError(
            f"the new model is not promoted: {'; '.join(block['reasons'])}; failing because "
            "require_improvement is set (see promotion.json)"
        )
    return metadata | {"promotion": block}


def _rows(trained, split: Split, label_map: LabelMap, max_length: int) -> cal.Rows:
    """The fine-tuned model's logits and features for one split, in the split's order."""
    logits, features = forward_scores(trained.model, trained.tokenizer, split.texts, max_length)
    return cal.Rows(logits, np.asarray(label_map.class_ids(split.labels)), features)


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
    files.remove_partials(output.parent)
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
        routing = upgrade.carried_routing(source, content)
        if evaluation is not None and routing is not None:
            evaluation = replace(evaluation, routing=routing)
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
    review: Callable[[Path, dict], dict] | None = None,
) -> Path:
    """The common tail: ONNX graphs and the parity gate, a review against the model in
    service, the model card, then metadata and the tarball."""
    blocks = add_onnx(content, max_length, recipe, evaluation, strict, emit)
    serving = card.serving(blocks["serve"])
    if parity_file is not None:
        files.write_text(parity_file, json.dumps(blocks["parity"], indent=2) + "\n")
        emit(f"{serving}; wrote {parity_file}")
    metadata = compose_metadata(**metadata, export=blocks)
    if review is not None:
        metadata = review(content, metadata)
    card.write(content, metadata)
    artifact = write_artifact(content, metadata, destination)
    if parity_file is not None:
        emit(f"wrote {artifact} ({artifact.stat().st_size / 1e6:.1f} MB)")
    else:
        emit(f"wrote {artifact}; {serving}")
    return artifact


def _calibrate(config: TrainConfig, trained, data: Prepared, test, out_dir: Path, emit):
    """Temperature, out-of-scope statistics and routing thresholds; reported on the test set."""
    if data.calibration is None:
        why = "calibration_split=0" if config.calibration_split <= 0 else "no rows held out"
        emit(f"calibration: off ({why}): raw softmax scores, no routing threshold")
        return None
    label_map = data.label_map
    held = _rows(trained, data.calibration, label_map, config.max_length)
    train_rows = _rows(trained, data.train, label_map, config.max_length)
    fallback = config.fallback_label
    options = cal.Options(
        target=config.target_accuracy,
        fallback_class=None if fallback is None else label_map.class_ids([fallback])[0],
        min_rejection=config.out_of_scope_rejection,
        expected_out_of_scope=config.expected_out_of_scope,
        channel=data.calibration_channel,
    )
    fitted = cal.calibrate(train_rows, held, test, options, label_map.labels)
    result = fitted.result
    for line in describe_calibration(result):
        emit(line)
    out_dir.mkdir(parents=True, exist_ok=True)
    files.write_text(out_dir / "calibration.json", json.dumps(result, indent=2) + "\n")
    reports.plot_reliability(
        fitted.test_before, fitted.test_after, test.class_ids, out_dir / "reliability_diagram.png"
    )
    curves = {
        result["source"]: coverage_curve(fitted.held_after, held.class_ids, fitted.eligible_held),
        "test": coverage_curve(fitted.test_after, test.class_ids, fitted.eligible_test),
    }
    reports.plot_coverage(
        curves, result["threshold"], config.target_accuracy, out_dir / "coverage_accuracy.png"
    )
    if result["meets_target"] is False and config.strict_routing:
        raise RoutingError(f"{routing_shortfall(result)}; failing because strict_routing is set")
    return fitted


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
    # counts of the training channel as written, a calibration split included
    train_counts, test_counts = data.train.counts(), data.test.counts()
    split = data.calibration if not data.calibration_channel else None
    if split is not None:
        train_counts += split.counts()
    held = len(split) if split is not None else 0
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
            for split in (
                data.train,
                data.test,
                data.calibration if data.calibration_channel else None,
            )
            if split is not None
        },
    }
