"""Tarballs: atomic writing, checksums and extraction that refuses anything but plain files.

Knows nothing of what a gata-ft artifact holds (that is `artifact.py`); stdlib only.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gata_ft.errors import ArtifactError
from gata_ft.files import atomic_path


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return sha256_stream(f)


def sha256_stream(stream: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def pack(content: Path, destination: Path) -> Path:
    """Write every file under `content` into the gzip tarball `destination`, atomically.

    Readers never see a partial tarball: it is written beside the destination,
    flushed to disk and renamed.
    """
    with atomic_path(destination) as partial, partial.open("wb") as raw:
        # compresslevel 1: weights barely compress, and level 9 costs minutes on bert-base.
        with tarfile.open(fileobj=raw, mode="w:gz", compresslevel=1) as tar:
            for path in sorted(p for p in content.rglob("*") if p.is_file()):
                _add(tar, path, path.relative_to(content).as_posix())
        raw.flush()
        os.fsync(raw.fileno())
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


def member_sizes(path: Path) -> dict[str, int]:
    """Size of each member, by name, read from the headers (nothing is extracted)."""
    with open_tarball(path) as tar:
        members = checked_members(tar, path, Limits.from_env())
        return {member.name: member.size for member in members}


@dataclass(frozen=True)
class Limits:
    """Caps on what a tarball may hold, so that a hostile one cannot fill the disk or memory.

    Raise them with GATA_MAX_EXTRACT_MB, GATA_MAX_MEMBERS and GATA_MAX_METADATA_MB.
    """

    extract_bytes: int = 8192 * 2**20  # a bert-large artifact unpacks to about 3.5 GB
    members: int = 10_000  # an artifact has about 20
    metadata_bytes: int = 64 * 2**20  # metadata.json of 1,000 queues is under 2 MB

    @classmethod
    def from_env(cls) -> Limits:
        def read(name: str, default: int, unit: int) -> int:
            raw = os.environ.get(name, "")
            if not raw:
                return default
            if not raw.isdigit():
                raise ArtifactError(f"{name}: expected a whole number, found {raw!r}")
            return int(raw) * unit

        default = cls()
        return cls(
            read("GATA_MAX_EXTRACT_MB", default.extract_bytes, 2**20),
            read("GATA_MAX_MEMBERS", default.members, 1),
            read("GATA_MAX_METADATA_MB", default.metadata_bytes, 2**20),
        )


def checked_members(tar: tarfile.TarFile, path: Path, limits: Limits) -> list[tarfile.TarInfo]:
    """Every member, refusing links, devices, names that point outside, and too many members.

    Names are normalised (no `./`, no empty components), so `only` and metadata
    lookups match tarballs made with `tar -C folder .` as well as ours.
    """
    members = []
    try:
        for member in tar:
            members.append(member)
            if len(members) > limits.members:
                raise ArtifactError(
                    f"{path}: expected at most {limits.members:,} members, found more; "
                    "raise GATA_MAX_MEMBERS if this tarball is genuine"
                )
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ArtifactError(f"{path}: the archive is truncated or corrupt: {e}") from e
    for member in members:
        name = member.name
        parts = Path(name).parts  # without "." and empty components
        if name.startswith(("/", "\\")) or ".." in parts:
            raise ArtifactError(f"{path}: refusing to extract {name!r}: it points outside")
        if member.isfile() and not parts:
            raise ArtifactError(f"{path}: refusing to extract {name!r}: a file with no name")
        if not (member.isfile() or member.isdir()):
            kind = "a link" if member.issym() or member.islnk() else "a device or special file"
            raise ArtifactError(f"{path}: refusing to extract {name!r}: it is {kind}")
        # `tar -C folder .` writes ./metadata.json: the same file as metadata.json
        member.name = "/".join(parts) or "."
    return members


def safe_extract(
    path: Path, destination: Path, only: set[str] | None = None, limits: Limits | None = None
) -> list[str]:
    """Extract a tarball we did not write, refusing anything but plain files and folders.

    Absolute names, `..`, links and devices are refused by name before a byte
    is written; Python's `data` filter then applies the same rules again. The
    members' declared sizes must fit `limits` (a gzip bomb is refused before it
    is written). With `only`, just those member names are extracted.
    """
    limits = limits or Limits.from_env()
    with open_tarball(path) as tar:
        members = checked_members(tar, path, limits)
        if only is not None:
            members = [m for m in members if m.name in only]
        total = sum(m.size for m in members if m.isfile())
        if total > limits.extract_bytes:
            raise ArtifactError(
                f"{path}: expected at most {limits.extract_bytes / 2**20:,.0f} MB unpacked, "
                f"found members of {total / 2**20:,.0f} MB; raise GATA_MAX_EXTRACT_MB if this "
                "tarball is genuine"
            )
        # The data filter exists from Python 3.11.4 (Debian bookworm ships 3.11.2);
        # without it, the checks above are the whole defence, and they suffice.
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        try:
            tar.extractall(destination, members=members, **extra)  # noqa: S202 - checked above
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise ArtifactError(f"{path}: the archive is truncated or corrupt: {e}") from e
    return [m.name for m in members if m.isfile()]
