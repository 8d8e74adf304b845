"""The artifact contract: what model.tar.gz holds, its metadata (written and read once), its format.

Shared by the training job, `gata-ft export`, the runtime and the CLI, so it
imports nothing heavier than the standard library and `gata_ft.archive`
(jsonschema only when metadata is validated before writing).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import platform
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from functools import cache
from importlib import metadata as importlib_metadata
from pathlib import Path

from gata_ft import __version__
from gata_ft.archive import Limits, checked_members, open_tarball, pack, sha256_file, sha256_stream
from gata_ft.errors import ArtifactError
from gata_ft.resources import schema_path

FORMAT_VERSION = 2  # 1: checkpoint only (gata-ft 0.1 train); 2: adds onnx/ and golden.json
METADATA = "metadata.json"
METADATA_SCHEMA = "metadata.schema.json"
TOKENIZER = "tokenizer.json"
GOLDEN = "golden.json"
ONNX_DIR = "onnx"
FP32_GRAPH = "onnx/model.onnx"
INT8_GRAPH = "onnx/model_quantized.onnx"
VNNI_GRAPH = "onnx/model_quantized_vnni.onnx"  # for CPUs with VNNI: full 8-bit weights
RECIPE = "onnx/recipe.json"
SCOPE = "scope.npz"  # out-of-scope statistics (gata_ft.scope)
GRAPHS = {"int8": INT8_GRAPH, "int8-vnni": VNNI_GRAPH, "fp32": FP32_GRAPH}
# What the runtime reads; the checkpoint beside them is for PyTorch loaders.
RUNTIME_FILES = frozenset({METADATA, TOKENIZER, GOLDEN, SCOPE, *GRAPHS.values()})
LIBRARIES = (
    "torch",
    "transformers",
    "tokenizers",
    "accelerate",
    "datasets",
    "evaluate",
    "scikit-learn",
    "numpy",
    "safetensors",
    "onnx",
    "onnxruntime",
    "optimum",
    "optimum-onnx",
)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        with contextlib.suppress(importlib_metadata.PackageNotFoundError):
            versions[name] = importlib_metadata.version(name)
    return versions


def label_entries(labels, train_counts=None, test_counts=None) -> list[dict]:
    """The `labels` block: class id, original queue id, and its rows in each split."""

    def count(counts, label):
        return None if counts is None else counts.get(label, 0)

    return [
        {
            "class_id": i,
            "label": label,
            "train_count": count(train_counts, label),
            "test_count": count(test_counts, label),
        }
        for i, label in enumerate(labels)
    ]


def compose_metadata(
    *,
    labels: list[dict],
    max_length: int,
    text: dict,
    export: dict,
    base_model: dict | None = None,
    hyperparameters: dict | None = None,
    training: dict | None = None,
    metrics: dict | None = None,
    data: dict | None = None,
    calibration: dict | None = None,
    upgraded_from: dict | None = None,
) -> dict:
    """metadata.json, described by schemas/metadata.schema.json: the one place that writes it.

    `export` holds the export stage's blocks (onnx, serve, parity); the file
    table is added when the tarball is written.
    """
    metadata = {
        "format_version": FORMAT_VERSION,
        "gata_ft_version": __version__,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "task": "text-classification",
        "base_model": base_model or {"name": None, "source": None},
        "max_length": max_length,
        "text": text,
        "labels": labels,
        "hyperparameters": hyperparameters,
        "training": training,
        "metrics": metrics,
        "libraries": library_versions(),
        "data": data,
    }
    if calibration is not None:
        metadata["calibration"] = calibration
    metadata.update(export)
    if upgraded_from is not None:
        metadata["upgraded_from"] = upgraded_from
    return metadata


@dataclass(frozen=True)
class ArtifactInfo:
    """What a reader of metadata.json needs, checked: the one place that reads it."""

    labels: tuple[int, ...]
    max_length: int
    text_pattern: str
    serve_graph: str
    threshold: float | None
    calibrated: bool  # a calibration was fitted (threshold None: route nothing)
    metadata: dict
    distance_threshold: float | None = None  # in scope at most this far from a queue
    vnni_graph: str | None = None  # the graph to serve on CPUs with VNNI, when shipped
    fallback_label: int | None = None  # where tickets that are not routed go
    # graph -> (graph that scores again, probability below which it does): serve.escalate
    escalations: dict[str, tuple[str, float]] = dataclass_field(default_factory=dict)

    @classmethod
    def of(cls, metadata: object, where: Path | str) -> ArtifactInfo:
        """Check the format version and the fields readers use; ArtifactError names the field."""
        if not isinstance(metadata, dict):
            raise ArtifactError(
                f"{where}: expected {METADATA} to hold a JSON object, "
                f"found {type(metadata).__name__}"
            )
        version = metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"{where}: expected artifact format_version {FORMAT_VERSION}, found {version!r}; "
                "upgrade it with `gata-ft export MODEL -o NEW.tar.gz`"
            )
        field = FieldReader(metadata, where)
        labels = field.labels()
        graph = field("serve.graph", str, f"one of {', '.join(sorted(GRAPHS.values()))}")
        if graph not in GRAPHS.values():
            raise ArtifactError(
                f"{where}: {METADATA}: serve.graph: expected one of "
                f"{', '.join(sorted(GRAPHS.values()))}, found {graph!r}"
            )
        vnni = (metadata.get("serve") or {}).get("vnni") or None
        vnni_graph = None
        if vnni is not None:
            vnni_graph = field("serve.vnni.graph", str, "onnx/model_quantized_vnni.onnx")
            if vnni_graph != VNNI_GRAPH:
                raise ArtifactError(
                    f"{where}: {METADATA}: serve.vnni.graph: expected {VNNI_GRAPH}, found "
                    f"{vnni_graph!r}"
                )
        escalations = {}
        for prefix, block, source in (("serve", metadata.get("serve"), graph),
                                      ("serve.vnni", vnni, vnni_graph)):  # fmt: skip
            if isinstance(block, dict) and block.get("escalate") is not None:
                again = field(f"{prefix}.escalate.graph", str, FP32_GRAPH)
                if again != FP32_GRAPH:
                    raise ArtifactError(
                        f"{where}: {METADATA}: {prefix}.escalate.graph: expected {FP32_GRAPH}, "
                        f"found {again!r}"
                    )
                below = field(f"{prefix}.escalate.below", float, "a probability", minimum=0)
                if below > 1:
                    raise ArtifactError(
                        f"{where}: {METADATA}: {prefix}.escalate.below: expected a probability, "
                        f"found {below!r}"
                    )
                if source != FP32_GRAPH and below > 0:  # 0: nothing is ever below it
                    escalations[source] = (again, below)
        calibration = metadata.get("calibration") or {}
        threshold = distance = fallback = None
        if calibration.get("threshold") is not None:
            threshold = field("calibration.threshold", float, "a probability", minimum=0)
        if calibration.get("fallback_label") is not None:
            fallback = field("calibration.fallback_label", int, "a queue id", minimum=0)
        if (calibration.get("scope") or {}).get("distance_threshold") is not None:
            distance = field("calibration.scope.distance_threshold", float, "a distance", minimum=0)
        return cls(
            labels=labels,
            max_length=field("max_length", int, "a positive integer", minimum=1),
            text_pattern=field("text.pattern", str, "a regular expression"),
            serve_graph=graph,
            threshold=threshold,
            calibrated=bool(calibration.get("fitted")),
            metadata=metadata,
            distance_threshold=distance,
            fallback_label=fallback,
            vnni_graph=vnni_graph,
            escalations=escalations,
        )

    @classmethod
    def read(cls, folder: Path) -> ArtifactInfo:
        """The metadata of an extracted artifact folder."""
        path = folder / METADATA
        if not path.is_file():
            raise ArtifactError(f"{folder}: no {METADATA}: not a gata-ft model")
        _check_metadata_size(path.stat().st_size, path)
        with path.open("rb") as f:
            return cls.of(load_json(f, path), folder)


class FieldReader:
    """Reads a dotted field of metadata, or raises an ArtifactError that names it."""

    def __init__(self, metadata: dict, where: Path | str):
        self.metadata, self.where = metadata, where

    def labels(self) -> tuple[int, ...]:
        """The queue ids of `labels`, in class order: at least one."""
        entries = self("labels", list, 'a list of {"label": queue id}')
        labels = tuple(
            self(f"labels.{i}.label", int, "a non-negative integer queue id", minimum=0)
            for i in range(len(entries))
        )
        if not labels:
            raise ArtifactError(f"{self.where}: {METADATA}: labels: expected 1 or more, found none")
        return labels

    def __call__(self, dotted: str, kind: type, expected: str, minimum: float | None = None):
        value: object = self.metadata
        for part in dotted.split("."):
            if isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            elif isinstance(value, dict) and part in value:
                value = value[part]
            else:
                raise ArtifactError(
                    f"{self.where}: {METADATA}: {dotted}: expected {expected}, found no such field"
                )
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and minimum is not None:
            ok = value >= minimum
        if not ok:
            shown = json.dumps(value)[:80]
            raise ArtifactError(
                f"{self.where}: {METADATA}: {dotted}: expected {expected}, found {shown}"
            )
        return value


def file_table(folder: Path) -> dict[str, dict[str, object]]:
    """sha256 and size of every file under `folder`, by relative POSIX path."""
    table = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name != METADATA:
            table[name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return table


@cache
def _metadata_validator():
    from jsonschema import Draft202012Validator

    schema = json.loads(schema_path(METADATA_SCHEMA).read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def validate_metadata(metadata: dict) -> None:
    errors = sorted(_metadata_validator().iter_errors(metadata), key=lambda e: list(e.path))
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "(top level)"
        raise ArtifactError(
            f"metadata.json does not match {METADATA_SCHEMA} at {where}: {errors[0].message}"
        )


def write_artifact(content: Path, metadata: dict, destination: Path) -> Path:
    """Pack `content` and its metadata.json into `destination`, atomically.

    The file table (sha256 of every packed file) is added to `metadata`, which
    is validated against schemas/metadata.schema.json first.
    """
    metadata = {**metadata, "files": file_table(content)}
    validate_metadata(metadata)
    (content / METADATA).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return pack(content, destination)


def read_tarball_metadata(path: Path) -> dict:
    with open_tarball(path) as tar:
        # checked_members, not getmember: the member cap holds and ./metadata.json is found
        found = [m for m in checked_members(tar, path, Limits.from_env()) if m.name == METADATA]
        if not found:
            raise ArtifactError(f"{path}: no {METADATA} at the root of the tarball")
        member = found[-1]  # as getmember: the last of equal names wins
        data = tar.extractfile(member)
        if data is None:
            raise ArtifactError(f"{path}: {METADATA} is not a regular file")
        _check_metadata_size(member.size, f"{path}: {METADATA}")
        return load_json(data, f"{path}: {METADATA}")


def _check_metadata_size(size: int, where) -> None:
    cap = Limits.from_env().metadata_bytes
    if size > cap:
        raise ArtifactError(
            f"{where}: expected at most {cap / 2**20:,.0f} MB of metadata, found "
            f"{size / 2**20:,.0f} MB; raise GATA_MAX_METADATA_MB if this artifact is genuine"
        )


def _sha256_table(metadata: dict, where) -> dict[str, str]:
    """The file table as name -> sha256 (empty when absent); ArtifactError for another shape."""
    table = metadata.get("files", {})
    if not isinstance(table, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) for e in table.values()
    ):
        raise ArtifactError(
            f"{where}: {METADATA}: files: expected an object of {{name: {{sha256: ...}}}}, "
            "found another shape"
        )
    return {name: entry["sha256"] for name, entry in table.items()}


def verify_files(folder: Path, metadata: dict, names) -> None:
    """Check each named file of an extracted artifact against its sha256 in the file table."""
    table = _sha256_table(metadata, folder)
    if not table:
        raise ArtifactError(f"{folder}: {METADATA}: files: expected the file table, found none")
    for name in names:
        if name not in table:
            raise ArtifactError(
                f"{folder}: {name}: expected an entry in {METADATA}'s file table, found none"
            )
        if sha256_file(folder / name) != table[name]:
            raise ArtifactError(
                f"{folder / name}: does not match its sha256 in {METADATA}: the file was "
                "changed after the export; re-export the model (gata-ft export)"
            )


def load_json(stream, where) -> object:
    """JSON from a binary stream; ArtifactError naming `where` for anything unreadable."""
    try:
        return json.load(io.TextIOWrapper(stream, encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, huge integers
        raise ArtifactError(f"{where}: expected JSON, found invalid JSON: {e}") from e
    except RecursionError:
        raise ArtifactError(f"{where}: expected JSON, found nesting too deep to read") from None


def verify_tarball(path: Path) -> dict:
    """Check the format version and every file's sha256; return the metadata."""
    metadata = read_tarball_metadata(path)
    ArtifactInfo.of(metadata, path)
    expected = _sha256_table(metadata, path)
    seen = set()
    with open_tarball(path) as tar:
        for member in checked_members(tar, path, Limits.from_env()):
            if member.name == METADATA or member.isdir():  # `tar -C folder .` lists folders
                continue
            if member.name not in expected:
                raise ArtifactError(f"{path}: {member.name} is not listed in {METADATA}")
            data = tar.extractfile(member)
            if data is None:
                raise ArtifactError(f"{path}: {member.name} is not a regular file")
            if sha256_stream(data) != expected[member.name]:
                raise ArtifactError(f"{path}: {member.name} does not match its sha256")
            seen.add(member.name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ArtifactError(f"{path}: files listed in {METADATA} are missing: {missing}")
    return metadata
