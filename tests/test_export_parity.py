"""The parity gate: hand-computed cases and the fallbacks on a real export."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from gata_ft.artifact import verify_tarball
from gata_ft.cli import cli
from gata_ft.export.parity import gate_failures
from gata_ft.export.recipe import Recipe, Thresholds
from gata_ft.paired import compare


def run_export(*args):
    return CliRunner().invoke(cli, ["export", *map(str, args)], catch_exceptions=False)


def test_gate_on_a_hand_computed_case():
    truth = np.array([0] * 20 + [1] * 20 + [2] * 5)
    candidate_pred = truth.copy()
    candidate_pred[:2] = 1  # class 0 loses 2 of 20: recall -10 points, yet p = 0.25
    candidate_pred[40] = 0  # class 2 loses one of 5
    result = compare(truth, candidate_pred, truth, 3)
    bound = 100 * 3 / 45  # all 3 changed tickets were lost: the upper bound of the share is 1
    assert result.accuracy_drop_bound == pytest.approx(bound)
    failures = gate_failures(result, Thresholds(), labels=(7, 8, 9))
    assert failures == [
        f"accuracy drop up to {bound:.2f} points (95% upper bound; measured 6.67), limit 1.0",
        f"macro F1 drop up to {result.f1_drop_bound:.2f} points (95% upper bound; measured "
        f"{result.f1_drop:.2f}), limit 1.0",
    ]  # no label is shown to be harmed: 2 of 20 lost is within noise
    assert gate_failures(compare(truth, truth, truth, 3), Thresholds(), (7, 8, 9)) == []
    many = np.repeat(np.arange(3), 200)
    harmed = many.copy()
    harmed[:12] = 1  # label 7 loses 12 of 200: p = 0.5**12
    result = compare(many, harmed, many, 3)
    assert result.accuracy_drop_bound < 5.0
    failures = gate_failures(result, Thresholds(max_accuracy_drop=5.0, max_macro_f1_drop=5.0),
                             (7, 8, 9))  # fmt: skip
    assert failures == [
        f"label 7: 12 of its 200 tickets went wrong, 0 right (exact McNemar p = "
        f"{0.5**12:.2g}, Holm {0.5**12:.2g} <= 0.05)"
    ]


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


@pytest.mark.job
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


@pytest.mark.job
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


def test_a_damaged_int8_graph_fails_the_gate(tmp_path, trained_artifact):
    """One queue's head row scaled down in the shipped int8 graph: the gate must notice."""
    import onnx
    from onnx import numpy_helper

    from gata_ft.examples import write_example
    from gata_ft.export.reference import onnx_logits

    folder = trained_artifact["dir"]
    data = write_example(tmp_path / "data", train_per_queue=1, test_per_queue=30)
    rows = [json.loads(line) for line in (data / "test" / "data.json").open()]
    labels = [
        entry["label"] for entry in json.loads((folder / "metadata.json").read_text())["labels"]
    ]
    texts, truth = [r["text"] for r in rows], np.array([labels.index(r["label"]) for r in rows])
    graph = onnx.load(str(folder / "onnx" / "model_quantized.onnx"))
    scale = next(
        t for t in graph.graph.initializer if t.name == "classifier.weight_Transposed_scale"
    )
    bias = next(t for t in graph.graph.initializer if t.name == "classifier.bias")
    reference = onnx_logits(folder / "onnx" / "model.onnx", folder / "tokenizer.json", texts, 64, 1)
    victim = int(np.bincount(reference.argmax(-1)).argmax())  # a queue fp32 predicts often
    values, offsets = numpy_helper.to_array(scale).copy(), numpy_helper.to_array(bias).copy()
    values[victim] *= 0.01  # the queue's row of the head, scaled
    offsets[victim] -= 20.0
    scale.CopyFrom(numpy_helper.from_array(values, scale.name))
    bias.CopyFrom(numpy_helper.from_array(offsets, bias.name))
    damaged = tmp_path / "damaged.onnx"
    onnx.save(graph, str(damaged))
    predicted = onnx_logits(damaged, folder / "tokenizer.json", texts, 64, 1).argmax(-1)
    result = compare(reference.argmax(-1), predicted, truth, len(labels))
    failures = gate_failures(result, Recipe.load("avx2").parity, labels)
    assert failures[0].startswith("accuracy drop up to ")
    assert any(f.startswith(f"label {labels[victim]}: ") for f in failures)
    assert victim in [t.class_id for t in result.harmed]
