"""`gata-ft export`: turn a checkpoint or an older tarball into a dual-format artifact.

Inputs: a Hugging Face checkpoint folder; a model.tar.gz from gata-ft (any
format version); or a tarball of the previous gata-finetune job (checkpoint
files at the root, metadata.json with `label_mapping`, no ONNX). The input
is only read; tarballs are extracted with `artifact.safe_extract`.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gata_ft import __version__
from gata_ft.artifact import (
    FORMAT_VERSION,
    METADATA,
    library_versions,
    safe_extract,
    sha256_file,
    write_artifact,
)
from gata_ft.data import LabelMap, read_split, text_pattern
from gata_ft.errors import ArtifactError, ConfigError
from gata_ft.export import EvalSet, Recipe, add_onnx

OLD_JOB_MAX_LENGTH = 512  # gata-finetune padded and truncated every ticket to 512 tokens
# Metadata that a gata-ft artifact carries over into its upgrade unchanged.
CARRIED = ("base_model", "text", "hyperparameters", "training", "metrics", "data")


@dataclass(frozen=True)
class Source:
    kind: str  # "gata-ft", "gata-finetune" or "checkpoint"
    folder: Path
    metadata: dict | None
    labels: tuple[int, ...]
    max_length: int
    sha256: str | None


def read_source(path: Path, scratch: Path, max_length: int | None) -> Source:
    """Identify the input, extract it if it is a tarball, and find its labels."""
    if not path.exists():
        raise ArtifactError(f"{path}: no such file or directory")
    digest = None
    folder = path
    if path.is_file():
        digest = sha256_file(path)
        folder = scratch / "input"
        safe_extract(path, folder)
    if not (folder / "config.json").is_file():
        raise ArtifactError(
            f"{path}: expected a Hugging Face checkpoint (config.json and weights at the top), "
            f"found no config.json"
        )
    if not any((folder / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")):
        raise ArtifactError(
            f"{path}: expected model.safetensors or pytorch_model.bin beside config.json, "
            "found neither: the checkpoint is incomplete"
        )
    metadata = None
    if (folder / METADATA).is_file():
        try:
            metadata = json.loads((folder / METADATA).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path}: {METADATA} is not valid JSON: {e}") from e
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))

    if metadata and "format_version" in metadata:
        kind = "gata-ft"
        labels = tuple(entry["label"] for entry in metadata["labels"])
        length = metadata["max_length"]
    elif metadata and "label_mapping" in metadata:
        kind = "gata-finetune"
        labels = _labels_from_mapping(path, metadata["label_mapping"])
        length = metadata.get("max_length", OLD_JOB_MAX_LENGTH)
    else:
        kind = "checkpoint"
        labels = _labels_from_config(path, config)
        length = OLD_JOB_MAX_LENGTH
    outputs = len(config.get("id2label") or {})
    if outputs and outputs != len(labels):
        raise ArtifactError(
            f"{path}: the model has {outputs} outputs but {len(labels)} labels are recorded"
        )
    return Source(kind, folder, metadata, labels, max_length or length, digest)


def _labels_from_mapping(path: Path, mapping: dict) -> tuple[int, ...]:
    """gata-finetune's label_mapping, in either direction: {label: class id} or the reverse."""
    try:
        pairs = {int(k): int(v) for k, v in mapping.items()}
    except (TypeError, ValueError) as e:
        raise ArtifactError(
            f"{path}: label_mapping: expected integer labels and class ids, found {mapping!r}"
        ) from e
    n = len(pairs)
    if sorted(pairs.values()) == list(range(n)):  # {original label: class id}
        by_class = {class_id: label for label, class_id in pairs.items()}
    elif sorted(pairs) == list(range(n)):  # {class id: original label}
        by_class = pairs
    else:
        raise ArtifactError(
            f"{path}: label_mapping: expected class ids 0..{n - 1} on one side, found {mapping!r}"
        )
    return tuple(by_class[i] for i in range(n))


def _labels_from_config(path: Path, config: dict) -> tuple[int, ...]:
    id2label = config.get("id2label") or {}
    try:
        return tuple(int(id2label[str(i)]) for i in range(len(id2label)))
    except (KeyError, ValueError):
        shown = ", ".join(list(id2label.values())[:3])
        raise ArtifactError(
            f"{path}: config.json's id2label must map class ids to queue ids (integers), "
            f"found {shown}...; export a gata-ft or gata-finetune tarball instead, whose "
            "metadata records the labels"
        ) from None


def upgrade(
    source_path: Path,
    output: Path,
    recipe_name: str,
    test_dir: Path | None,
    strict: bool,
    max_length: int | None,
    normalize_text: bool,
    force: bool,
    emit: Callable[[str], None],
) -> dict:
    """Write a format-2 tarball (checkpoint + ONNX graphs) for `source_path` to `output`."""
    if output.exists() and output.resolve() == source_path.resolve():
        raise ConfigError(f"--output {output}: is the input; the input is never modified")
    if output.exists() and not force:
        raise ConfigError(f"--output {output}: already exists; pass --force to replace it")
    recipe = Recipe.load(recipe_name)
    with tempfile.TemporaryDirectory(prefix="gata-ft-export-") as scratch:
        source = read_source(source_path, Path(scratch), max_length)
        emit(f"{source_path}: {source.kind} checkpoint, {len(source.labels)} labels")
        label_map = LabelMap(source.labels)
        evaluation, test_counts = None, None
        if test_dir is not None:
            split = read_split(test_dir, "test", normalize=normalize_text)
            label_map.check_covers(split)
            evaluation = EvalSet(split.texts, label_map.class_ids(split.labels), label_map.labels)
            test_counts = Counter(split.labels)
        content = Path(scratch) / "content"
        _normalize_checkpoint(source, content)
        blocks = add_onnx(content, source.max_length, recipe, evaluation, strict, emit)
        metadata = _metadata(source, test_counts) | blocks
        write_artifact(content, metadata, output)
    emit(f"wrote {output}; serving {blocks['serve']['graph']}: {blocks['serve']['reason']}")
    return metadata


def _normalize_checkpoint(source: Source, content: Path) -> None:
    """Re-save as safetensors with the fast tokenizer and id2label holding the queue ids."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    model = AutoModelForSequenceClassification.from_pretrained(source.folder)
    model.config.id2label = {i: str(label) for i, label in enumerate(source.labels)}
    model.config.label2id = {str(label): i for i, label in enumerate(source.labels)}
    model.save_pretrained(content, safe_serialization=True)
    tokenizer.save_pretrained(content)
    if not (content / "tokenizer.json").is_file():
        raise ArtifactError(
            f"{source.folder}: no fast tokenizer (tokenizer.json) could be made for this model"
        )


def _metadata(source: Source, test_counts: Counter | None) -> dict:
    prior = source.metadata if source.kind == "gata-ft" else {}
    labels = [
        {
            "class_id": i,
            "label": label,
            "train_count": (prior["labels"][i]["train_count"] if prior else None),
            "test_count": (
                test_counts.get(label, 0)
                if test_counts is not None
                else (prior["labels"][i]["test_count"] if prior else None)
            ),
        }
        for i, label in enumerate(source.labels)
    ]
    metadata = {
        "format_version": FORMAT_VERSION,
        "gata_ft_version": __version__,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "task": "text-classification",
        "base_model": {"name": None, "source": None},
        "max_length": source.max_length,
        "text": {"pattern": text_pattern().pattern, "normalized": False},
        "labels": labels,
        "hyperparameters": None,
        "training": None,
        "metrics": None,
        "data": None,
        "libraries": library_versions(),
        "upgraded_from": {
            "kind": source.kind,
            "format_version": (source.metadata or {}).get("format_version"),
            "sha256": source.sha256,
        },
    }
    metadata.update({key: prior[key] for key in CARRIED if key in prior})
    return metadata
