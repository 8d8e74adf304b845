"""The export stage's output: both formats, graphs that match PyTorch, golden samples."""

import json

import numpy as np
from conftest import FIXED

from gata_ft.artifact import verify_tarball
from gata_ft.export.reference import torch_logits
from gata_ft.inference import OnnxClassifier
from gata_ft.metrics import softmax


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
    assert "ONNX int8 avx2 (base)" in trained_artifact["log"]
    assert "ONNX int8 avx512_vnni (base)" in trained_artifact["log"]  # the companion, gated too


def test_int8_graphs_keep_the_residual_add_apart_from_its_layer_norm(trained_artifact):
    import onnx

    graphs = sorted((trained_artifact["dir"] / "onnx").glob("model_quantized*.onnx"))
    assert graphs
    for graph in graphs:
        ops = {n.op_type for n in onnx.load(str(graph), load_external_data=False).graph.node}
        assert "BiasGelu" in ops, graph.name  # onnxruntime's fusions ran
        assert "LayerNormalization" in ops, graph.name
        assert "SkipLayerNormalization" not in ops, graph.name


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
