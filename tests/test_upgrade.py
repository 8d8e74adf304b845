"""`gata-ft export`: checkpoints, gata-ft tarballs and the old job's tarballs, upgraded."""

import json
import tarfile

import pytest
from click.testing import CliRunner

from gata_ft.archive import safe_extract
from gata_ft.artifact import verify_tarball
from gata_ft.cli import cli


def run_export(*args):
    return CliRunner().invoke(cli, ["export", *map(str, args)], catch_exceptions=False)


def old_job_tarball(folder, path, labels):
    """A tarball as the old gata-finetune job wrote it: pickled weights, LABEL_i, label_mapping."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    old = path.parent / "old-checkpoint"
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    model.config.id2label = {i: f"LABEL_{i}" for i in range(len(labels))}
    model.config.label2id = {f"LABEL_{i}": i for i in range(len(labels))}
    model.save_pretrained(old, safe_serialization=False)
    AutoTokenizer.from_pretrained(folder).save_pretrained(old)
    (old / "tokenizer.json").unlink()  # the old job kept only vocab.txt
    (old / "metadata.json").write_text(
        json.dumps({"label_mapping": {str(label): i for i, label in enumerate(labels)}})
    )
    with tarfile.open(path, "w:gz") as tar:
        for file in sorted(old.iterdir()):
            tar.add(file, arcname=file.name)
    return path


@pytest.mark.job
def test_export_upgrades_an_old_job_tarball(tmp_path, trained_artifact):
    folder = trained_artifact["dir"]
    metadata = verify_tarball(trained_artifact["tarball"])
    labels = [entry["label"] for entry in metadata["labels"]]
    old = old_job_tarball(folder, tmp_path / "old.tar.gz", labels)
    before = old.read_bytes()
    out = tmp_path / "new.tar.gz"
    result = run_export(old, "-o", out, "--test", trained_artifact["data"] / "test")
    assert result.exit_code == 0, result.output
    assert old.read_bytes() == before  # the input is never modified
    upgraded = verify_tarball(out)
    assert upgraded["format_version"] == 2
    assert upgraded["upgraded_from"]["kind"] == "gata-finetune"
    assert [entry["label"] for entry in upgraded["labels"]] == labels
    # the old job truncated at 512, or at the model's positions when it has fewer (the
    # tiny model: 128); recording 512 would let the runtime feed positions it lacks
    assert upgraded["max_length"] == 128
    assert upgraded["training"] is None
    assert upgraded["parity"]["checked"] is True
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        config = json.load(tar.extractfile("config.json"))
    assert {
        "model.safetensors",
        "tokenizer.json",
        "onnx/model.onnx",
        "onnx/model_quantized.onnx",
    } <= names
    assert "pytorch_model.bin" not in names
    assert config["id2label"] == {str(i): str(label) for i, label in enumerate(labels)}
    # same weights, same predictions as the trained model
    assert upgraded["parity"]["pytorch_fp32"]["accuracy"] == pytest.approx(
        metadata["parity"]["pytorch_fp32"]["accuracy"]
    )


@pytest.mark.job
def test_export_without_test_data_records_parity_unchecked(tmp_path, trained_artifact):
    out = tmp_path / "again.tar.gz"
    result = run_export(trained_artifact["tarball"], "-o", out)
    assert result.exit_code == 0, result.output
    metadata = verify_tarball(out)
    assert metadata["parity"] == {
        "checked": False,
        "reason": "no test data was given (gata-ft export --test DIR)",
    }
    assert metadata["upgraded_from"]["kind"] == "gata-ft"
    assert metadata["training"] == verify_tarball(trained_artifact["tarball"])["training"]
    assert metadata["onnx"]["golden"] is None


@pytest.mark.job
def test_export_from_a_checkpoint_folder(tmp_path, trained_artifact):
    out = tmp_path / "from-dir.tar.gz"
    folder = tmp_path / "ckpt"
    safe_extract(trained_artifact["tarball"], folder)
    (folder / "metadata.json").unlink()  # a bare Hugging Face checkpoint
    result = run_export(folder, "-o", out, "--max-length", "64")
    assert result.exit_code == 0, result.output
    metadata = verify_tarball(out)
    assert metadata["upgraded_from"] == {
        "kind": "checkpoint",
        "format_version": None,
        "sha256": None,
    }
    assert metadata["max_length"] == 64


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"\x1f\x8b garbage"), "cannot open it"),
        (lambda p: p.write_bytes(b""), "cannot open it"),
    ],
)
def test_corrupt_input_is_a_clear_error(tmp_path, make, message):
    bad = tmp_path / "bad.tar.gz"
    make(bad)
    result = run_export(bad, "-o", tmp_path / "out.tar.gz")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {bad}: ")
    assert message in result.stderr
    assert not (tmp_path / "out.tar.gz").exists()


def test_incomplete_tarball_is_a_clear_error(tmp_path, trained_artifact):
    partial = tmp_path / "partial.tar.gz"
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(trained_artifact["dir"] / "config.json", arcname="config.json")
    result = run_export(partial, "-o", tmp_path / "out.tar.gz")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {partial}: expected model.safetensors or pytorch_model.bin beside config.json, "
        "found neither: the checkpoint is incomplete\n"
    )


def test_checkpoint_without_queue_ids_is_refused(tmp_path, trained_artifact):
    folder = tmp_path / "generic"
    safe_extract(trained_artifact["tarball"], folder)
    (folder / "metadata.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {k: f"LABEL_{k}" for k in config["id2label"]}
    (folder / "config.json").write_text(json.dumps(config))
    result = run_export(folder, "-o", tmp_path / "out.tar.gz")
    assert result.exit_code == 1
    assert (
        "config.json's id2label must map class ids to queue ids (integers), found LABEL_0"
        in result.stderr
    )


def test_output_rules(tmp_path, trained_artifact):
    same = run_export(trained_artifact["tarball"], "-o", trained_artifact["tarball"])
    assert same.exit_code == 1
    assert "is the input; the input is never modified" in same.stderr
    existing = tmp_path / "exists.tar.gz"
    existing.write_bytes(b"keep me")
    result = run_export(trained_artifact["tarball"], "-o", existing)
    assert result.exit_code == 1
    assert "already exists; pass --force to replace it" in result.stderr
    assert existing.read_bytes() == b"keep me"


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("config.json", "{not json", "config.json: expected JSON, found invalid JSON"),
        ("config.json", "[1, 2, 3]", "config.json: expected a JSON object, found list"),
        ("config.json", '{"id2label": [1, 2]}', "the model has 2 outputs but 10 labels are"),
        ("metadata.json", "[" * 100_000, "metadata.json: expected JSON, found"),
        ("metadata.json", '{"format_version": 2, "labels": 7}',
         'metadata.json: labels: expected a list of {"label": queue id}, found 7'),
        ("metadata.json", '{"label_mapping": [1, 2]}', "label_mapping: expected integer labels"),
    ],
)  # fmt: skip
def test_a_malformed_source_folder_is_one_error_line(tmp_path, trained_artifact, file, content,
                                                     message):  # fmt: skip
    folder = tmp_path / "source"
    safe_extract(trained_artifact["tarball"], folder)
    (folder / file).write_text(content)
    result = CliRunner().invoke(cli, ["export", str(folder), "-o", str(tmp_path / "out.tar.gz")])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith(f"Error: {folder}: ")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "out.tar.gz").exists()
