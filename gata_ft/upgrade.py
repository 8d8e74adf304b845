"""What `gata-ft export` reads: a checkpoint folder, a gata-ft tarball, or an old job's tarball.

Inputs: a Hugging Face checkpoint folder; a model.tar.gz from gata-ft (any
format version); or a tarball of the previous gata-finetune job (checkpoint
files at the root, metadata.json with `label_mapping`, no ONNX). The input
is only read; tarballs are extracted with `archive.safe_extract`.
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from gata_ft.archive import safe_extract, sha256_file
from gata_ft.artifact import (
    METADATA,
    SCOPE,
    TOKENIZER,
    ArtifactInfo,
    FieldReader,
    label_entries,
    load_json,
)
from gata_ft.data import LabelMap
from gata_ft.errors import ArtifactError
from gata_ft.scope import RoutingRule, Scope

OLD_JOB_MAX_LENGTH = 512  # gata-finetune padded and truncated every ticket to 512 tokens
# Metadata that a gata-ft artifact carries over into its upgrade unchanged.
# The temperature is in the weights and scope.npz is copied: the calibration block still holds.
CARRIED = ("base_model", "text", "hyperparameters", "training", "metrics", "data", "calibration")


@dataclass(frozen=True)
class Source:
    kind: str  # "gata-ft", "gata-finetune" or "checkpoint"
    folder: Path
    metadata: dict | None
    labels: tuple[int, ...]
    max_length: int
    sha256: str | None

    @property
    def label_map(self) -> LabelMap:
        return LabelMap(self.labels)


def read_source(path: Path, scratch: Path, max_length: int | None) -> Source:
    """Identify the input, extract it if it is a tarball, and find its labels."""
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
        metadata = _json_object(folder / METADATA, path)
    config = _json_object(folder / "config.json", path)

    if metadata and "format_version" in metadata:
        kind = "gata-ft"
        field = FieldReader(metadata, path)  # format 1 too: not ArtifactInfo, which wants 2
        labels = field.labels()
        length = field("max_length", int, "a positive integer", minimum=1)
    elif metadata and "label_mapping" in metadata:
        kind = "gata-finetune"
        labels = _labels_from_mapping(path, metadata["label_mapping"])
        length = metadata.get("max_length", OLD_JOB_MAX_LENGTH)
    else:
        kind = "checkpoint"
        labels = _labels_from_config(path, config)
        length = OLD_JOB_MAX_LENGTH
    id2label = config.get("id2label") or {}
    if not isinstance(id2label, dict | list):
        raise ArtifactError(
            f"{path}: config.json: id2label: expected an object, found {str(id2label)[:100]}"
        )
    outputs = len(id2label)
    if outputs and outputs != len(labels):
        raise ArtifactError(
            f"{path}: the model has {outputs} outputs but {len(labels)} labels are recorded"
        )
    return Source(kind, folder, metadata, labels, max_length or length, digest)


def _json_object(file: Path, path: Path) -> dict:
    """A JSON object from a file of the input; ArtifactError naming the file otherwise."""
    with file.open("rb") as stream:
        value = load_json(stream, f"{path}: {file.name}")
    if not isinstance(value, dict):
        raise ArtifactError(
            f"{path}: {file.name}: expected a JSON object, found {type(value).__name__}"
        )
    return value


def _labels_from_mapping(path: Path, mapping: dict) -> tuple[int, ...]:
    """gata-finetune's label_mapping, in either direction: {label: class id} or the reverse."""
    try:
        pairs = {int(k): int(v) for k, v in mapping.items()}
    except (AttributeError, TypeError, ValueError) as e:
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
    except (KeyError, TypeError, ValueError):
        values = id2label.values() if isinstance(id2label, dict) else [repr(id2label)]
        shown = ", ".join(str(v) for v in list(values)[:3])
        raise ArtifactError(
            f"{path}: config.json's id2label must map class ids to queue ids (integers), "
            f"found {shown}...; export a gata-ft or gata-finetune tarball instead, whose "
            "metadata records the labels"
        ) from None


def normalize_checkpoint(source: Source, content: Path) -> None:
    """Re-save as safetensors with the fast tokenizer and id2label holding the queue ids."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    label_map = source.label_map
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    model = AutoModelForSequenceClassification.from_pretrained(source.folder)
    model.config.id2label = label_map.id2label
    model.config.label2id = label_map.label2id
    model.save_pretrained(content, safe_serialization=True)
    tokenizer.save_pretrained(content)
    if not (content / TOKENIZER).is_file():
        raise ArtifactError(
            f"{source.folder}: no fast tokenizer (tokenizer.json) could be made for this model"
        )


def carried_routing(source: Source, content: Path) -> tuple[RoutingRule, Scope] | None:
    """A gata-ft source's routing rule and out-of-scope statistics, copied into `content`."""
    if source.kind != "gata-ft" or not (source.folder / SCOPE).is_file():
        return None
    shutil.copy2(source.folder / SCOPE, content / SCOPE)
    info = ArtifactInfo.of(source.metadata, source.folder)
    fallback = None
    if info.fallback_label is not None:
        fallback = source.label_map.class_ids([info.fallback_label])[0]
    rule = RoutingRule(info.threshold, info.distance_threshold, fallback)
    return rule, Scope.load(content / SCOPE)


def carried_metadata(source: Source, test_counts: Counter | None) -> dict:
    """The metadata blocks an upgrade keeps from its input, as `compose_metadata` arguments."""
    prior = source.metadata if source.kind == "gata-ft" else {}
    train_counts = test_before = None
    if prior:
        train_counts = {e["label"]: e["train_count"] for e in prior["labels"]}
        test_before = {e["label"]: e["test_count"] for e in prior["labels"]}
    blocks = {
        "labels": label_entries(
            source.labels, train_counts, test_counts if test_counts is not None else test_before
        ),
        "upgraded_from": {
            "kind": source.kind,
            "format_version": (source.metadata or {}).get("format_version"),
            "sha256": source.sha256,
        },
    }
    blocks.update({key: prior[key] for key in CARRIED if key in prior})
    return blocks
