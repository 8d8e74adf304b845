"""The export stage: a checkpoint folder gains onnx/ (fp32 and int8 graphs) and golden.json."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from gata_ft.artifact import FP32_GRAPH, INT8_GRAPH, ONNX_DIR, RECIPE
from gata_ft.export.golden import golden_texts, write_golden
from gata_ft.export.onnx import (
    SIDE_FILES,
    add_features_output,
    export_fp32,
    optimize,
    quantize,
)
from gata_ft.export.parity import EvalSet, GateInputs, excluded_nodes, gate, variant_record
from gata_ft.export.recipe import Recipe


def add_onnx(
    content: Path,
    max_length: int,
    recipe: Recipe,
    evaluation: EvalSet | None,
    strict: bool,
    emit: Callable[[str], None],
) -> dict:
    """Write onnx/ (fp32 and int8 graphs) and golden.json into `content`, a checkpoint folder.

    Returns the metadata blocks `onnx`, `serve` and `parity`. With `evaluation`,
    int8 must pass the recipe's parity gate (trying its fallbacks in order), or
    the fp32 graph is served instead; `strict` makes that a failure.
    """
    onnx_dir = content / ONNX_DIR
    with tempfile.TemporaryDirectory(prefix="gata-ft-onnx-") as scratch:
        work = Path(scratch)
        exported = export_fp32(content, work / "fp32", recipe.opset)
        add_features_output(exported)  # before fusion and int8: both graphs carry it
        onnx_dir.mkdir()
        shutil.copy2(exported, content / FP32_GRAPH)
        for name in SIDE_FILES:
            if (work / "fp32" / name).is_file():
                shutil.copy2(work / "fp32" / name, onnx_dir / name)
        source = optimize(
            work / "fp32", recipe.optimization_level, work / "optimized", recipe.fuse_attention
        )
        emit(f"exported {FP32_GRAPH} (opset {recipe.opset}), validated against PyTorch by Optimum")

        if evaluation is None:
            variant = recipe.variants[0]
            excluded = excluded_nodes(variant, source, work / "probe", sample=None)
            int8 = quantize(source, variant, excluded, work / "int8")
            shutil.copy2(int8, content / INT8_GRAPH)
            parity = {
                "checked": False,
                "reason": "no test data was given (gata-ft export --test DIR)",
            }
            serve = {"graph": INT8_GRAPH, "precision": "int8", "reason": "parity not checked"}
            chosen = variant_record(variant, excluded)
            texts = []
        else:
            inputs = GateInputs(content, source, max_length, recipe, evaluation, work)
            parity, serve, chosen = gate(inputs, strict, emit)
            texts = golden_texts(evaluation.texts)
        (content / RECIPE).write_text(json.dumps(recipe.source, indent=2) + "\n")

    golden = write_golden(content, texts, max_length)
    return {
        "onnx": {
            "opset": recipe.opset,
            "recipe": recipe.name,
            "graphs": {"fp32": FP32_GRAPH, "int8": INT8_GRAPH},
            "quantization": chosen,
            "golden": golden,
        },
        "serve": serve,
        "parity": parity,
    }
