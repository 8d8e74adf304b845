"""The artifact contract: metadata written and read once, the format check, verification."""

import json
import re
import tarfile

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


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ("[" * 100_000, "found nesting too deep to read"),  # hostile: no RecursionError
        ("1" * 5_000, "expected JSON, found invalid JSON"),  # a number past Python's limit
        (json.dumps({**minimal_metadata(), "files": {"x": "abc"}}),
         "files: expected an object of {name: {sha256: ...}}"),
    ],
)  # fmt: skip
def test_hostile_metadata_is_an_artifact_error(tmp_path, metadata, message):
    (tmp_path / "metadata.json").write_text(metadata)
    tarball = tmp_path / "model.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "metadata.json", arcname="metadata.json")
    with pytest.raises(ArtifactError, match=re.escape(message)):
        artifact.verify_tarball(tarball)


def test_not_a_tarball(tmp_path):
    bad = tmp_path / "model.tar.gz"
    bad.write_bytes(b"nope")
    with pytest.raises(
        ArtifactError, match=r"expected a gzip-compressed tar archive, cannot open it"
    ):
        artifact.verify_tarball(bad)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: [1, 2, 3], "expected metadata.json to hold a JSON object, found list"),
        (lambda m: {**m, "format_version": 1}, "expected artifact format_version 2, found 1; "),
        (lambda m: {k: v for k, v in m.items() if k != "serve"},
         "metadata.json: serve.graph: expected one of onnx/model.onnx, "
         "onnx/model_quantized.onnx, onnx/model_quantized_vnni.onnx, found no such field"),
        (lambda m: {**m, "serve": {"graph": "../../../../etc/passwd"}},
         "metadata.json: serve.graph: expected one of onnx/model.onnx, onnx/model_quantized.onnx, "
         "onnx/model_quantized_vnni.onnx, found '../../../../etc/passwd'"),
        (lambda m: {**m, "max_length": "lots"},
         'metadata.json: max_length: expected a positive integer, found "lots"'),
        (lambda m: {**m, "labels": [{"label": -4}]},
         "metadata.json: labels.0.label: expected a non-negative integer queue id, found -4"),
        (lambda m: {**m, "labels": []}, "metadata.json: labels: expected 1 or more, found none"),
        (lambda m: {**m, "calibration": {"fitted": True, "threshold": "high"}},
         'metadata.json: calibration.threshold: expected a probability, found "high"'),
        (lambda m: {**m, "serve": {**m["serve"], "escalate": {"graph": "x.onnx", "below": 0.5}}},
         "metadata.json: serve.escalate.graph: expected onnx/model.onnx, found 'x.onnx'"),
        (lambda m: {**m, "serve": {**m["serve"],
                                   "escalate": {"graph": "onnx/model.onnx", "below": 2}}},
         "metadata.json: serve.escalate.below: expected a probability, found 2"),
        (lambda m: {**m, "serve": {**m["serve"], "escalate": {"graph": "onnx/model.onnx"}}},
         "metadata.json: serve.escalate.below: expected a probability, found no such field"),
    ],
)  # fmt: skip
def test_malformed_metadata_names_the_field(change, message):
    with pytest.raises(ArtifactError) as info:
        artifact.ArtifactInfo.of(change(minimal_metadata()), "model")
    assert str(info.value).startswith("model: " + message)


def test_escalations_are_read_per_int8_graph():
    escalate = {"graph": "onnx/model.onnx", "below": 0.5}
    metadata = minimal_metadata()
    metadata["serve"] = {**metadata["serve"], "escalate": escalate,
                         "vnni": {"graph": "onnx/model_quantized_vnni.onnx",
                                  "escalate": {**escalate, "below": 0.4}}}  # fmt: skip
    info = artifact.ArtifactInfo.of(metadata, "model")
    assert info.escalations == {
        "onnx/model_quantized.onnx": ("onnx/model.onnx", 0.5),
        "onnx/model_quantized_vnni.onnx": ("onnx/model.onnx", 0.4),
    }
    assert artifact.ArtifactInfo.of(minimal_metadata(), "model").escalations == {}


def test_metadata_is_read_into_the_fields_readers_use():
    info = artifact.ArtifactInfo.of(
        {**minimal_metadata(), "calibration": {"fitted": True, "threshold": 0.8}}, "model"
    )
    assert info.labels == (5, 16066574298652)
    assert (info.max_length, info.text_pattern) == (64, "^[a-z]+$")
    assert (info.serve_graph, info.threshold, info.calibrated) == (
        "onnx/model_quantized.onnx",
        0.8,
        True,
    )
