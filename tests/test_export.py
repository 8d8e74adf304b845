"""The export stage: ONNX graphs, the parity gate, golden samples and `gata-ft export`."""

import json
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXED, write_hyperparameters

from gata_ft.archive import safe_extract
from gata_ft.artifact import verify_tarball
from gata_ft.cli import cli
from gata_ft.errors import ConfigError
from gata_ft.export.parity import gate_failures
from gata_ft.export.recipe import Recipe, Thresholds
from gata_ft.export.reference import torch_logits
from gata_ft.inference import OnnxClassifier
from gata_ft.metrics import Scores, softmax


def run_export(*args):
    return CliRunner().invoke(cli, ["export", *map(str, args)], catch_exceptions=False)


def test_recipes_load_as_data():
    names = {}
    for name in ("avx2", "avx512_vnni", "arm64"):
        recipe = Recipe.load(name)
        names[name] = recipe.variants[0].preset
        assert recipe.variants[0].label == "base"
        assert len(recipe.variants) >= 3
        assert recipe.parity == Thresholds(1.0, 1.0, 5.0, 20)
    assert names == {"avx2": "avx512", "avx512_vnni": "avx512_vnni", "arm64": "arm64"}
    avx2 = Recipe.load("avx2")
    assert avx2.variants[0].reduce_range is True  # no saturation on CPUs without VNNI
    assert avx2.variants[2].exclude_most_sensitive == 6
    assert avx2.variants[3].preset == "avx2"


def test_unknown_recipe_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        Recipe.load("sse4")
    assert str(info.value) == (
        "recipe 'sse4': expected one of arm64, avx2, avx512_vnni or a path to a recipe "
        ".json file, found no such recipe"
    )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**Recipe.load("avx2").source, "quantization": {"per_chanel": True}}))
    with pytest.raises(ConfigError, match=r"unknown quantization settings \['per_chanel'\]"):
        Recipe.load(bad)


def test_gate_on_a_hand_computed_case():
    truth = np.array([0] * 20 + [1] * 20 + [2] * 5)
    reference = Scores.of(truth.copy(), truth, 3)
    candidate_pred = truth.copy()
    candidate_pred[:2] = 1  # class 0 loses 2 of 20: recall -10 points
    candidate_pred[40] = 0  # class 2 (5 tickets, below min support) loses one
    candidate = Scores.of(candidate_pred, truth, 3)
    failures = gate_failures(reference, candidate, Thresholds(), labels=(7, 8, 9))
    assert failures == [
        "accuracy 6.67 points below fp32 (limit 1.0)",
        f"macro F1 {100 * (1 - candidate.f1_macro):.2f} points below fp32 (limit 1.0)",
        "recall of label 7 10.00 points below fp32 (limit 5.0)",
    ]
    assert gate_failures(reference, reference, Thresholds(), labels=(7, 8, 9)) == []
    exactly_at_limit = truth.copy()
    exactly_at_limit[:1] = 1  # 1 of 20 is 5.0 points: at the limit, not over it
    at_limit = Scores.of(exactly_at_limit, truth, 3)
    assert not any(
        "recall" in f for f in gate_failures(reference, at_limit, Thresholds(), (7, 8, 9))
    )


def test_training_job_tarball_holds_both_formats(trained_artifact):
    folder = trained_artifact["dir"]
    metadata = verify_tarball(trained_artifact["tarball"])
    assert (folder / "model.safetensors").is_file()
    assert (folder / "onnx" / "model.onnx").is_file()
    assert (folder / "onnx" / "model_quantized.onnx").is_file()
    assert json.loads((folder / "onnx" / "recipe.json").read_text())["name"] == "avx2"
    assert metadata["serve"]["graph"] == "onnx/model_quantized.onnx"
    assert metadata["parity"]["passed"] is True
    assert "parity on 40 test tickets" in trained_artifact["log"]
    assert "ONNX int8 (base)" in trained_artifact["log"]


def test_onnx_graphs_match_pytorch_on_fixed_inputs(trained_artifact):
    folder = trained_artifact["dir"]
    reference = torch_logits(folder, FIXED, max_length=64)
    tokenizer = folder / "tokenizer.json"
    fp32 = OnnxClassifier(folder / "onnx" / "model.onnx", tokenizer, 64).logits(FIXED)
    int8 = OnnxClassifier(folder / "onnx" / "model_quantized.onnx", tokenizer, 64).logits(FIXED)
    np.testing.assert_allclose(fp32, reference, atol=1e-4)
    assert list(fp32.argmax(-1)) == list(reference.argmax(-1))
    assert list(int8.argmax(-1)) == list(reference.argmax(-1))
    assert len(set(reference.argmax(-1))) > 1  # the model tells the tickets apart


def test_golden_samples_reproduce_with_the_shipped_tokenizer(trained_artifact):
    folder = trained_artifact["dir"]
    golden = json.loads((folder / "golden.json").read_text())
    assert 0 < len(golden["texts"]) <= 32
    for graph, expected in golden["probabilities"].items():
        model = OnnxClassifier(folder / graph, folder / "tokenizer.json", 64)
        assert golden["batch_size"] == 1
        got = softmax(np.concatenate([model.logits([text]) for text in golden["texts"]]))
        np.testing.assert_allclose(got, expected, atol=golden["tolerance"])


def impossible_recipe(tmp_path):
    """The default recipe with a gate no int8 graph can pass: 1 point better than fp32."""
    source = Recipe.load("avx2").source
    strict = {
        **source,
        "name": "impossible",
        "parity": {**source["parity"], "max_accuracy_drop": -1.0},
    }
    path = tmp_path / "impossible.json"
    path.write_text(json.dumps(strict))
    return path


def test_failing_gate_tries_every_fallback_then_serves_fp32(tmp_path, trained_artifact):
    out = tmp_path / "out.tar.gz"
    test_dir = trained_artifact["data"] / "test"
    result = run_export(
        trained_artifact["tarball"],
        "-o",
        out,
        "--test",
        test_dir,
        "--recipe",
        impossible_recipe(tmp_path),
    )
    assert result.exit_code == 0, result.output
    metadata = verify_tarball(out)
    assert metadata["serve"]["graph"] == "onnx/model.onnx"
    assert metadata["serve"]["precision"] == "fp32"
    assert metadata["serve"]["reason"].startswith(
        "no int8 variant of recipe impossible passed the parity gate"
    )
    attempts = metadata["parity"]["attempts"]
    assert [a["variant"] for a in attempts] == [
        "base",
        "classifier head and pooler in fp32",
        "the 6 most damaging nodes in fp32",
        "u8 weights (avx2 preset)",
    ]
    assert all(not a["passed"] and a["failures"][0].startswith("accuracy ") for a in attempts)
    # the fallbacks really change the graph: nodes were kept in fp32
    base = attempts[0]["excluded_nodes"]
    assert len(attempts[2]["excluded_nodes"]) == len(base) + 6
    assert len(set(attempts[2]["excluded_nodes"])) == len(base) + 6
    assert metadata["parity"]["passed"] is False
    # scores come from real predictions on the 40 test tickets
    assert metadata["parity"]["pytorch_fp32"]["accuracy"] == pytest.approx(
        metadata["metrics"]["test"]["accuracy"], abs=1e-9
    )
    assert "WARNING: no int8 variant of recipe impossible passed the parity gate" in result.stdout


def test_strict_parity_fails_instead(tmp_path, trained_artifact):
    out = tmp_path / "out.tar.gz"
    result = run_export(
        trained_artifact["tarball"], "-o", out, "--test", trained_artifact["data"] / "test",
        "--recipe", impossible_recipe(tmp_path), "--strict-parity",
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.startswith(
        "Error: no int8 variant of recipe impossible passed the parity gate"
    )
    assert result.stderr.rstrip().endswith("failing because --strict-parity is set")
    assert not out.exists()


def test_strict_parity_in_the_training_job(sm_env, tiny_hyperparameters, tmp_path):
    write_hyperparameters(
        sm_env,
        {
            **tiny_hyperparameters,
            "export_recipe": str(impossible_recipe(tmp_path)),
            "strict_parity": "true",
        },
    )
    result = CliRunner().invoke(cli, ["train"])
    assert result.exit_code == 1
    assert (
        "failing because --strict-parity is set"
        in (sm_env["SM_OUTPUT_DIR"] / "failure").read_text()
    )
    assert list(sm_env["SM_MODEL_DIR"].iterdir()) == []


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
    assert upgraded["max_length"] == 512  # the old job's truncation
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
