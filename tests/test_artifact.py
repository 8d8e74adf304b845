import io
import json
import tarfile
from pathlib import Path

import pytest

from gata_ft import archive, artifact
from gata_ft.errors import ArtifactError


def minimal_metadata():
    return {
        "format_version": 2,
        "gata_ft_version": "0.1.0",
        "created_at": "2026-11-25T00:00:00+00:00",
        "task": "text-classification",
        "base_model": {"name": "x", "source": "directory"},
        "max_length": 64,
        "text": {"pattern": "^[a-z]+$", "normalized": False},
        "labels": [
            {"class_id": 0, "label": 5, "train_count": 3, "test_count": 1},
            {"class_id": 1, "label": 16066574298652, "train_count": 2, "test_count": 0},
        ],
        "hyperparameters": {"values": {}, "user_set": []},
        "training": {
            "device": "cpu",
            "precision": "fp32",
            "num_processes": 1,
            "global_step": 3,
            "epochs": 1.0,
            "train_loss": 0.5,
            "best_checkpoint_step": 3,
            "resumed_from_step": None,
            "runtime_seconds": 1.0,
        },
        "metrics": {
            "test": {
                **dict.fromkeys(
                    [
                        "accuracy",
                        "precision",
                        "recall",
                        "f1",
                        "precision_macro",
                        "recall_macro",
                        "f1_macro",
                    ],
                    1.0,
                ),
                "per_class": {},
            }
        },
        "onnx": {
            "opset": 18,
            "recipe": "avx2",
            "graphs": {"fp32": "onnx/model.onnx", "int8": "onnx/model_quantized.onnx"},
            "quantization": {
                "variant": "base",
                "preset": "avx512",
                "per_channel": True,
                "reduce_range": True,
                "excluded_nodes": [],
            },
            "golden": None,
        },
        "serve": {"graph": "onnx/model_quantized.onnx", "precision": "int8", "reason": "test"},
        "parity": {"checked": False, "reason": "test"},
        "libraries": {"python": "3.11", "torch": "2", "transformers": "4", "tokenizers": "0"},
        "data": {
            "train": {"sha256": "0" * 64, "rows": 5, "normalized_rows": 0},
            "test": {"sha256": "1" * 64, "rows": 1, "normalized_rows": 0},
        },
    }


@pytest.fixture
def content(tmp_path):
    folder = tmp_path / "content"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"fp32")
    (folder / "onnx" / "model_quantized.onnx").write_bytes(b"int8")
    return folder


def test_written_tarball_verifies_and_lists_every_file(tmp_path, content):
    target = artifact.write_artifact(
        content, minimal_metadata(), tmp_path / "model" / "model.tar.gz"
    )
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.tar.gz"]
    metadata = artifact.verify_tarball(target)
    assert sorted(metadata["files"]) == [
        "config.json",
        "model.safetensors",
        "onnx/model.onnx",
        "onnx/model_quantized.onnx",
        "tokenizer.json",
    ]
    assert metadata["files"]["model.safetensors"]["size"] == 7
    with tarfile.open(target) as tar:
        assert sorted(tar.getnames()) == [
            "config.json",
            "metadata.json",
            "model.safetensors",
            "onnx/model.onnx",
            "onnx/model_quantized.onnx",
            "tokenizer.json",
        ]
        assert all(m.uid == 0 and m.mode == 0o644 for m in tar)


def test_invalid_metadata_writes_nothing(tmp_path, content):
    metadata = minimal_metadata()
    metadata["labels"][0]["label"] = -1
    with pytest.raises(ArtifactError) as info:
        artifact.write_artifact(content, metadata, tmp_path / "model" / "model.tar.gz")
    assert str(info.value) == (
        "metadata.json does not match metadata.schema.json at labels/0/label: "
        "-1 is less than the minimum of 0"
    )
    assert not (tmp_path / "model").exists() or not any((tmp_path / "model").iterdir())


def test_failure_while_packing_leaves_no_partial_file(tmp_path, content, monkeypatch):
    def broken_add(tar, path, name):
        raise OSError("disk full")

    monkeypatch.setattr(archive, "_add", broken_add)
    (tmp_path / "model").mkdir()
    with pytest.raises(OSError, match="disk full"):
        artifact.write_artifact(content, minimal_metadata(), tmp_path / "model" / "model.tar.gz")
    assert list((tmp_path / "model").iterdir()) == []


def test_tampered_file_is_detected(tmp_path, content):
    target = artifact.write_artifact(content, minimal_metadata(), tmp_path / "model.tar.gz")
    metadata = json.loads((content / "metadata.json").read_text())
    (content / "model.safetensors").write_bytes(b"WEIGHTS")
    tampered = tmp_path / "tampered.tar.gz"
    with tarfile.open(tampered, "w:gz") as tar:
        for name in [*sorted(metadata["files"]), "metadata.json"]:
            tar.add(content / name, arcname=name)
    assert metadata["files"]["model.safetensors"]["sha256"] != archive.sha256_file(
        content / "model.safetensors"
    )
    with pytest.raises(ArtifactError, match=r"model.safetensors does not match its sha256$"):
        artifact.verify_tarball(tampered)
    assert artifact.verify_tarball(target)["format_version"] == 2


def test_not_a_tarball(tmp_path):
    bad = tmp_path / "model.tar.gz"
    bad.write_bytes(b"nope")
    with pytest.raises(
        ArtifactError, match=r"expected a gzip-compressed tar archive, cannot open it"
    ):
        artifact.verify_tarball(bad)


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


def test_safe_extract_extracts_a_good_archive(tmp_path, content):
    target = artifact.write_artifact(content, minimal_metadata(), tmp_path / "model.tar.gz")
    names = archive.safe_extract(target, tmp_path / "out")
    assert "onnx/model.onnx" in names
    assert (tmp_path / "out" / "onnx" / "model_quantized.onnx").read_bytes() == b"int8"
