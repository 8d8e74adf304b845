"""Optimum's ONNX export, onnxruntime's CPU fusions and dynamic int8 quantization."""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gata_ft.errors import ExportError
from gata_ft.export.recipe import Variant
from gata_ft.inference import FEATURES, session

log = logging.getLogger("gata_ft")
# Files Optimum writes beside the graph that a loader of onnx/ needs.
SIDE_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
_QUANTIZABLE = {"MatMul", "Attention", "Gather", "EmbedLayerNormalization"}


def export_fp32(checkpoint: Path, onnx_dir: Path, opset: int) -> Path:
    """Optimum's exporter: dynamic batch and sequence axes, validated against PyTorch."""
    from optimum.exporters.onnx import main_export

    try:
        with warnings.catch_warnings():
            # The TorchScript exporter warns about tracing constants and its own
            # deprecation on every BERT; Optimum's validation is the real check.
            warnings.simplefilter("ignore")
            main_export(
                str(checkpoint),
                output=onnx_dir,
                task="text-classification",
                opset=opset,
                device="cpu",
                do_validation=True,
                library_name="transformers",
                local_files_only=True,
            )
    except Exception as e:  # Optimum raises ValueError/AtolError/OSError subclasses
        raise ExportError(f"ONNX export of {checkpoint} failed: {type(e).__name__}: {e}") from e
    return onnx_dir / "model.onnx"


def add_features_output(graph: Path) -> int:
    """Expose the classifier's input (BERT: the pooler output) as a second output, `features`.

    Appended after `logits`, so loaders that read outputs by name or take the
    first one (ORTModelForSequenceClassification, pipeline) see no change; the
    dimension names match `logits` (io-binding needs them). Returns the width.
    """
    import onnx

    model = onnx.load(str(graph))
    producer = next((n for n in model.graph.node if "logits" in n.output), None)
    weights = {t.name: t for t in model.graph.initializer}
    if producer is None or producer.op_type not in ("Gemm", "MatMul"):
        raise ExportError(
            f"{graph}: expected the logits to come from a Gemm or MatMul (the classifier), "
            f"found {producer.op_type if producer else 'no node'}"
        )
    weight = weights.get(producer.input[1])
    trans_b = any(a.name == "transB" and a.i == 1 for a in producer.attribute)
    if weight is None:
        raise ExportError(f"{graph}: the classifier's weight {producer.input[1]} is not stored")
    width = weight.dims[1] if trans_b else weight.dims[0]
    logits = next(o for o in model.graph.output if o.name == "logits")
    batch = logits.type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_param or batch.dim_value
    model.graph.node.append(
        onnx.helper.make_node("Identity", [producer.input[0]], [FEATURES], name="gata_ft_features")
    )
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(FEATURES, onnx.TensorProto.FLOAT, [batch_dim, width])
    )
    onnx.save(model, str(graph))
    return int(width)


def optimize(onnx_dir: Path, level: int, work: Path, fuse_attention: bool = True) -> Path:
    """ORT transformer fusions (attention, layer norm, bias GELU) before quantization.

    With `fuse_attention`, onnxruntime runs int8 attention (QAttention): faster,
    but its packed Q/K/V weights share one scale, which costs accuracy. The
    residual add stays apart from its layer norm: onnxruntime's fused kernel is
    the slower one on a CPU (inference.UNFUSED).
    """
    if level == 0:
        return onnx_dir / "model.onnx"
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import OptimizationConfig

    optimizer = ORTOptimizer.from_pretrained(onnx_dir, file_names=["model.onnx"])
    config = OptimizationConfig(
        optimization_level=level,
        optimize_for_gpu=False,
        disable_attention_fusion=not fuse_attention,
        disable_skip_layer_norm_fusion=True,
        disable_bias_skip_layer_norm_fusion=True,
    )
    optimizer.optimize(config, save_dir=work, file_suffix="optimized")
    # The quantizer needs every tensor's type; ONNX's own shape inference stops at
    # onnxruntime's fused operators, symbolic shape inference knows them.
    fused = onnx.load(str(work / "model_optimized.onnx"))
    try:
        # On failure it saves a debug model into the working directory: keep that in work/.
        with contextlib.chdir(work):
            typed = SymbolicShapeInference.infer_shapes(
                fused, auto_merge=True, guess_output_rank=True
            )
    except Exception as e:  # onnxruntime raises a bare Exception here
        log.warning("fused graph cannot be typed (%s): quantizing the unfused graph", e)
        return onnx_dir / "model.onnx"
    onnx.save(typed, str(work / "model_typed.onnx"))
    return work / "model_typed.onnx"


def quantize(graph: Path, variant: Variant, excluded: list[str], out: Path) -> Path:
    """Dynamic int8 quantization of `graph` with the recipe's AutoQuantizationConfig preset."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    kwargs = {"is_static": False, "per_channel": variant.per_channel, "nodes_to_exclude": excluded}
    if variant.preset in ("avx2", "avx512"):  # the other presets fix the weight range
        kwargs["reduce_range"] = variant.reduce_range
    config = getattr(AutoQuantizationConfig, variant.preset)(**kwargs)
    quantizer = ORTQuantizer.from_pretrained(graph.parent, file_name=graph.name)
    out.mkdir(parents=True, exist_ok=True)
    quantizer.quantize(config, save_dir=out, file_suffix="quantized")
    return out / f"{graph.stem}_quantized.onnx"


def node_names(graph: Path, patterns: Sequence[str]) -> list[str]:
    """Names of the quantizable nodes whose names match any of the regex patterns."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    return [
        node.name
        for node in model.graph.node
        if node.op_type in _QUANTIZABLE and any(re.search(p, node.name) for p in patterns)
    ]


def most_sensitive_nodes(
    fp32: Path, int8: Path, feed: dict, k: int, skip: Sequence[str] = ()
) -> list[str]:
    """The k quantized nodes that add the most error: output error minus input error.

    Both graphs run on the same batch with every quantizable node's input and
    output exposed; a node's own damage is how much its relative error grows.
    """
    import onnx

    model = onnx.load(str(fp32))
    nodes = [
        n
        for n in model.graph.node
        if n.op_type in _QUANTIZABLE and n.op_type != "Gather" and n.name not in skip
    ]
    tensors = sorted({t for n in nodes for t in (n.input[0], n.output[0])})

    def run(path: Path) -> dict[str, np.ndarray]:
        graph = onnx.load(str(path))
        produced = {o for n in graph.graph.node for o in n.output}
        names = [t for t in tensors if t in produced]
        existing = {o.name for o in graph.graph.output}
        for name in names:
            if name not in existing:
                graph.graph.output.append(onnx.ValueInfoProto(name=name))
        outputs = session(graph.SerializeToString()).run(names, feed)
        return dict(zip(names, outputs, strict=True))

    reference, quantized = run(fp32), run(int8)

    def error(name: str) -> float:
        if name not in reference or name not in quantized:
            return 0.0
        a, b = reference[name].astype(np.float64), quantized[name].astype(np.float64)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))

    damage = sorted(((error(n.output[0]) - error(n.input[0]), n.name) for n in nodes), reverse=True)
    return [name for _, name in damage[:k]]
