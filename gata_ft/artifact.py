"""The model.tar.gz layout: metadata, checksums, atomic writing and verified reading."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import platform
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import BinaryIO

from gata_ft.errors import ArtifactError
from gata_ft.resources import schema_path

FORMAT_VERSION = 2  # 1: checkpoint only (gata-ft 0.1 train); 2: adds onnx/ and golden.json
METADATA = "metadata.json"
METADATA_SCHEMA = "metadata.schema.json"
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


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return _sha256_stream(f)


def _sha256_stream(stream: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


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
    is validated against schemas/metadata.schema.json first. Readers never see
    a partial tarball: it is written beside the destination and renamed.
    """
    metadata = {**metadata, "files": file_table(content)}
    validate_metadata(metadata)
    (content / METADATA).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")

    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".{destination.name}.partial-{os.getpid()}")
    try:
        with partial.open("wb") as raw:
            # compresslevel 1: weights barely compress, and level 9 costs minutes on bert-base.
            with tarfile.open(fileobj=raw, mode="w:gz", compresslevel=1) as tar:
                for path in sorted(p for p in content.rglob("*") if p.is_file()):
                    _add(tar, path, path.relative_to(content).as_posix())
            raw.flush()
            os.fsync(raw.fileno())
        partial.replace(destination)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync_dir(destination.parent)
    return destination


def _add(tar: tarfile.TarFile, path: Path, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.size = path.stat().st_size
    info.mode = 0o644
    info.mtime = int(path.stat().st_mtime)
    with path.open("rb") as f:
        tar.addfile(info, f)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def open_tarball(path: Path) -> Iterator[tarfile.TarFile]:
    try:
        tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ArtifactError(
            f"{path}: expected a gzip-compressed tar archive, cannot open it: {e}"
        ) from e
    with tar:
        try:
            yield tar
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise ArtifactError(f"{path}: the archive is truncated or corrupt: {e}") from e


def read_tarball_metadata(path: Path) -> dict:
    with open_tarball(path) as tar:
        try:
            member = tar.getmember(METADATA)
        except KeyError:
            raise ArtifactError(f"{path}: no {METADATA} at the root of the tarball") from None
        data = tar.extractfile(member)
        if data is None:
            raise ArtifactError(f"{path}: {METADATA} is not a regular file")
        return json.load(io.TextIOWrapper(data, encoding="utf-8"))


def verify_tarball(path: Path) -> dict:
    """Check the format version and every file's sha256; return the metadata."""
    metadata = read_tarball_metadata(path)
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: expected artifact format_version {FORMAT_VERSION}, found {version!r}"
        )
    expected = metadata.get("files", {})
    seen = set()
    with open_tarball(path) as tar:
        for member in tar:
            if member.name == METADATA:
                continue
            if member.name not in expected:
                raise ArtifactError(f"{path}: {member.name} is not listed in {METADATA}")
            data = tar.extractfile(member)
            if data is None:
                raise ArtifactError(f"{path}: {member.name} is not a regular file")
            if _sha256_stream(data) != expected[member.name]["sha256"]:
                raise ArtifactError(f"{path}: {member.name} does not match its sha256")
            seen.add(member.name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ArtifactError(f"{path}: files listed in {METADATA} are missing: {missing}")
    return metadata


def safe_extract(path: Path, destination: Path, only: set[str] | None = None) -> list[str]:
    """Extract a tarball we did not write, refusing anything but plain files and folders.

    Absolute names, `..`, links and devices are refused by name before a byte
    is written; Python's `data` filter then applies the same rules again.
    With `only`, just those member names are extracted.
    """
    with open_tarball(path) as tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ArtifactError(f"{path}: the archive is truncated or corrupt: {e}") from e
        for member in members:
            name = member.name
            parts = Path(name).parts
            if name.startswith(("/", "\\")) or ".." in parts:
                raise ArtifactError(f"{path}: refusing to extract {name!r}: it points outside")
            if not (member.isfile() or member.isdir()):
                kind = "a link" if member.issym() or member.islnk() else "a device or special file"
                raise ArtifactError(f"{path}: refusing to extract {name!r}: it is {kind}")
        if only is not None:
            members = [m for m in members if m.name in only]
        # The data filter exists from Python 3.11.4 (Debian bookworm ships 3.11.2);
        # without it, the checks above are the whole defence, and they suffice.
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        try:
            tar.extractall(destination, members=members, **extra)  # noqa: S202 - checked above
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ArtifactError(f"{path}: the archive is truncated or corrupt: {e}") from e
    return [m.name for m in members if m.isfile()]
