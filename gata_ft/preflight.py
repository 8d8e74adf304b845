"""Checks that run before any model is loaded: data, options, base model, folders and free disk.

Whatever a user can get wrong is found here, in seconds, not after the GPU hours.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gata_ft import checkpoints
from gata_ft.archive import member_sizes
from gata_ft.calibration import MIN_ROWS_TO_HOLD_OUT, split_for_calibration
from gata_ft.config import TrainConfig
from gata_ft.data import LabelMap, Prepared, balance_table, read_split
from gata_ft.errors import ArtifactError, ConfigError, ModelError, StorageError
from gata_ft.export.recipe import Recipe
from gata_ft.modeling import BaseModel, resolve_base_model
from gata_ft.sagemaker import JobPaths

MIN_ROWS_PER_CLASS = 5
# Disk needed, in multiples of the base model's weights (measured: the demo's
# tarball is 2.0x all-MiniLM-L6-v2's weights; a checkpoint is the weights plus
# AdamW's two moments).
ARTIFACT_FACTOR = 2.5  # checkpoint + ONNX fp32 + int8, gzip level 1
SCRATCH_FACTOR = 6.0  # staging folder + the export's fp32, fused and int8 graphs
CHECKPOINT_FACTOR = 3.0  # per checkpoint: weights + optimizer state


@dataclass(frozen=True)
class Plan:
    """What preflight found: validated data, the base model, the recipe, the run's identity."""

    data: Prepared
    base: BaseModel
    recipe: Recipe
    fingerprint: str


def training_job(config: TrainConfig, paths: JobPaths, num_processes: int) -> Plan:
    """Every check of the training job that needs no model weights."""
    data = prepare_data(config, paths)
    recipe = Recipe.load(config.export_recipe)
    config.precision(_cuda())
    if paths.baseline is not None:
        check_baseline(paths.baseline)
    folders = {
        "model.tar.gz": (paths.model_dir, ARTIFACT_FACTOR),
        "checkpoints": (paths.checkpoint_dir, CHECKPOINT_FACTOR * (config.save_total_limit + 1)),
        "metrics and plots": (paths.output_data_dir, 0),
        "the failure file": (paths.failure_file.parent, 0),
        "the export's scratch files": (Path(tempfile.gettempdir()), SCRATCH_FACTOR),
    }
    for purpose, (folder, _) in folders.items():  # before a download could fill the disk
        probe_writable(folder, purpose)
    base = resolve_base_model(config.base_model, config.allow_download)
    check_max_length(config.max_length, base.path, f"base model {base.name}")
    weights = weights_size(base.path)
    check_free_disk([(f, purpose, factor * weights) for purpose, (f, factor) in folders.items()])
    return Plan(data, base, recipe, fingerprint(config, data, num_processes))


def export_job(source: Path, output: Path, recipe_name: str, force: bool) -> Recipe:
    """The export job's checks before its input is read: output rules, recipe, folders, disk."""
    if not source.exists():
        raise ArtifactError(f"{source}: no such file or directory")
    if output.exists() and output.resolve() == source.resolve():
        raise ConfigError(f"--output {output}: is the input; the input is never modified")
    if output.exists() and not force:
        raise ConfigError(f"--output {output}: already exists; pass --force to replace it")
    recipe = Recipe.load(recipe_name)
    scratch = Path(tempfile.gettempdir())
    probe_writable(output.parent, "the exported model.tar.gz")
    probe_writable(scratch, "the export's scratch files")
    if source.is_file():
        sizes = member_sizes(source)
        weights = sum(sizes.get(name, 0) for name in ("model.safetensors", "pytorch_model.bin"))
        extracted = sum(sizes.values())
    else:
        weights, extracted = weights_size(source), 0
    check_free_disk(
        [
            (output.parent, "the exported model.tar.gz", ARTIFACT_FACTOR * weights),
            (scratch, "the export's scratch files", extracted + SCRATCH_FACTOR * weights),
        ]
    )
    return recipe


def check_baseline(path: Path) -> None:
    """The model in service must be a gata-ft artifact the runtime loads (format 2)."""
    from gata_ft.artifact import METADATA, ArtifactInfo, read_tarball_metadata

    tarball = path / "model.tar.gz" if path.is_dir() else path
    if path.is_dir() and (path / METADATA).is_file():
        ArtifactInfo.read(path)
    elif tarball.is_file():
        try:
            ArtifactInfo.of(read_tarball_metadata(tarball), tarball)
        except ArtifactError as e:
            raise ArtifactError(f"baseline: {e}") from None
    else:
        raise ArtifactError(
            f"baseline: expected a model.tar.gz of gata-ft (or its folder) at {path}, found none"
        )


def prepare_data(config: TrainConfig, paths: JobPaths) -> Prepared:
    """Read and validate the channels; hold out the calibration split unless a channel is given."""
    train = read_split(paths.train, "train", normalize=config.normalize_text)
    test = read_split(paths.test, "test", normalize=config.normalize_text)
    label_map = LabelMap.from_split(train)
    label_map.check_covers(test)
    if config.fallback_label is not None and config.fallback_label not in label_map.labels:
        raise ConfigError(
            f"fallback_label: expected one of the training labels, found {config.fallback_label}"
            f", which no row of {train.path} carries. Add a few tickets of the fallback queue "
            "to the training data, or leave fallback_label unset."
        )
    if paths.calibration is not None:
        channel = read_split(paths.calibration, "calibration", normalize=config.normalize_text)
        label_map.check_covers(channel)
        return Prepared(train, test, label_map, channel, calibration_channel=True)
    kept, held = split_for_calibration(train.labels, config.calibration_split, config.seed)
    calibration = train.subset(held, "calibration") if held else None
    return Prepared(train.subset(kept, "train"), test, label_map, calibration)


def fingerprint(config: TrainConfig, data: Prepared, num_processes: int) -> str:
    """What must match for a checkpoint to be resumed."""
    return checkpoints.fingerprint(
        {
            "train": data.train.sha256,
            "test": data.test.sha256,
            "calibration_channel": data.calibration.sha256 if data.calibration_channel else None,
            "labels": list(data.label_map.labels),
            "config": config.to_dict(),
            "num_processes": num_processes,
        }
    )


def position_limit(folder: Path, what: str) -> int | None:
    """The model's position embeddings, from its config.json (no weights load)."""
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ModelError(f"{what} ({folder}): config.json cannot be read: {e}") from e
    limit = getattr(model_config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) else None


def check_max_length(max_length: int, folder: Path, what: str) -> None:
    """max_length against the model's position embeddings."""
    limit = position_limit(folder, what)
    if limit is not None and max_length > limit:
        raise ConfigError(
            f"max_length: expected at most {limit} (the base model's position limit), "
            f"found {max_length}"
        )


def weights_size(folder: Path) -> int:
    """Bytes of the model weights at the top of a checkpoint folder (safetensors preferred)."""
    for pattern in ("model*.safetensors", "pytorch_model*.bin"):
        files = list(folder.glob(pattern))
        if files:
            return sum(p.stat().st_size for p in files)
    raise ModelError(
        f"{folder}: expected model weights (model.safetensors or pytorch_model.bin) beside "
        f"config.json, found none"
    )


def probe_writable(folder: Path, purpose: str) -> None:
    """The folder exists (or is made) and takes a file, which is removed at once."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".gata-ft-probe-")
        os.close(fd)
        Path(probe).unlink()
    except OSError as e:
        raise StorageError(
            f"{folder}: expected a writable folder for {purpose}, found it is not: "
            f"{e.strerror or e}"
        ) from e


def check_free_disk(needs: Iterable[tuple[Path, str, float]]) -> None:
    """Each file system has the space its folders need (summed where they share one)."""
    by_device: dict[int, list[tuple[Path, str, float]]] = {}
    for folder, purpose, need in needs:
        by_device.setdefault(folder.stat().st_dev, []).append((folder, purpose, need))
    for entries in by_device.values():
        need = sum(n for _, _, n in entries)
        if not need:
            continue
        free = shutil.disk_usage(entries[0][0]).free
        if free < need:
            parts = ", ".join(f"{_mb(n)} for {p} in {f}" for f, p, n in entries if n)
            raise StorageError(
                f"{entries[0][0]}: expected at least {_mb(need)} of free disk ({parts}; "
                f"estimated from the model's weights), found {_mb(free)} free. "
                "Give the job a larger volume or free some space."
            )


def _mb(size: float) -> str:
    return f"{size / 1e6:,.0f} MB"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def describe(data: Prepared) -> str:
    """The data summary the job prints: sizes, repairs and the class balance of each split."""
    lines = []
    splits = [s for s in (data.train, data.calibration, data.test) if s]
    for split in splits:
        line = f"{split.name}: {len(split)} rows from {split.path}"
        if split.normalized_rows:
            line += f" ({split.normalized_rows} texts normalised)"
        lines.append(line)
    lines.append(f"{len(data.label_map)} labels; rows per label and split:")
    lines.append(balance_table(data.label_map, splits))
    return "\n".join(lines)


def data_warnings(data: Prepared, config: TrainConfig) -> list[str]:
    warnings, labels = [], data.label_map.labels
    for split, purpose in ((data.train, "training rows, too few to learn"),
                           (data.test, "test rows, too few to evaluate")):  # fmt: skip
        counts = split.counts()
        few = [str(x) for x in labels if counts[x] < MIN_ROWS_PER_CLASS]
        if few:
            warnings.append(
                f"labels with fewer than {MIN_ROWS_PER_CLASS} {purpose}: " + ", ".join(few)
            )
    fallback = config.fallback_label
    if (
        data.calibration_channel
        and fallback is not None
        and fallback not in data.calibration.labels
    ):
        warnings.append(
            f"the calibration channel holds no tickets labelled with the fallback queue "
            f"{fallback}: the thresholds are fitted as if no traffic were out of scope"
        )
    if data.calibration_channel:
        pass  # the channel's labels are whatever traffic brought
    elif data.calibration is not None:
        present = set(data.calibration.labels)
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
    overlap = len(set(data.train.texts) & set(data.test.texts))
    if overlap:
        warnings.append(
            f"{overlap} test texts also appear in the training data; "
            "test metrics overstate accuracy on new tickets"
        )
    return warnings
