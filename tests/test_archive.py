"""Tarballs: atomic packing and extraction that refuses anything but plain files."""

import io
import tarfile
from pathlib import Path

import pytest
from test_artifact import minimal_metadata

from gata_ft import archive, artifact
from gata_ft.errors import ArtifactError


def test_failure_while_packing_leaves_no_partial_file(tmp_path, content, monkeypatch):
    def broken_add(tar, path, name):
        raise OSError("disk full")

    monkeypatch.setattr(archive, "_add", broken_add)
    (tmp_path / "model").mkdir()
    with pytest.raises(OSError, match="disk full"):
        artifact.write_artifact(content, minimal_metadata(), tmp_path / "model" / "model.tar.gz")
    assert list((tmp_path / "model").iterdir()) == []


def _crafted(tmp_path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    path = tmp_path / "crafted.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("config.json")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"{}"))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


def _member(name, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (_member("../evil.sh"), "refusing to extract '../evil.sh': it points outside"),
        (_member("a/../../evil.sh"), "refusing to extract 'a/../../evil.sh': it points outside"),
        (_member("/etc/cron.d/evil"), "refusing to extract '/etc/cron.d/evil': it points outside"),
        (_member("./../evil.sh"), "refusing to extract './../evil.sh': it points outside"),
        (_member("./"), "refusing to extract './': a file with no name"),
        (_member("././."), "refusing to extract '././.': a file with no name"),
        (
            _member("model.safetensors", tarfile.SYMTYPE, "/etc/passwd"),
            "refusing to extract 'model.safetensors': it is a link",
        ),
        (
            _member("hard", tarfile.LNKTYPE, "config.json"),
            "refusing to extract 'hard': it is a link",
        ),
        (
            _member("dev", tarfile.CHRTYPE),
            "refusing to extract 'dev': it is a device or special file",
        ),
        (
            _member("fifo", tarfile.FIFOTYPE),
            "refusing to extract 'fifo': it is a device or special file",
        ),
    ],
)
def test_safe_extract_refuses_crafted_members_and_writes_nothing(tmp_path, member, reason):
    crafted = _crafted(tmp_path, member, b"#!/bin/sh\n")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArtifactError) as info:
        archive.safe_extract(crafted, out)
    assert str(info.value) == f"{crafted}: {reason}"
    assert list(out.iterdir()) == []
    assert not (tmp_path / "evil.sh").exists()


def test_safe_extract_reports_a_truncated_archive(tmp_path, content):
    target = artifact.write_artifact(content, minimal_metadata(), tmp_path / "model.tar.gz")
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(target.read_bytes()[:200])
    with pytest.raises(ArtifactError, match=r"the archive is truncated or corrupt"):
        archive.safe_extract(truncated, tmp_path / "out")


def test_dot_slash_names_are_the_same_files(tmp_path):
    crafted = _crafted(tmp_path, _member(".//onnx/./model.onnx"), b"graph")
    names = archive.safe_extract(crafted, tmp_path / "out", only={"onnx/model.onnx"})
    assert names == ["onnx/model.onnx"]
    assert (tmp_path / "out" / "onnx" / "model.onnx").read_bytes() == b"graph"


def test_safe_extract_extracts_a_good_archive(tmp_path, content):
    target = artifact.write_artifact(content, minimal_metadata(), tmp_path / "model.tar.gz")
    names = archive.safe_extract(target, tmp_path / "out")
    assert "onnx/model.onnx" in names
    assert (tmp_path / "out" / "onnx" / "model_quantized.onnx").read_bytes() == b"int8"
