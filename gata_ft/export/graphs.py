"""The export stage: a checkpoint folder gains onnx/ (fp32 and int8 graphs) and golden.json."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from gata_ft import files
from gata_ft.artifact import FP32_GRAPH, INT8_GRAPH, ONNX_DIR, RECIPE, VNNI_GRAPH
from gata_ft.export.golden import golden_texts, write_golden
from gata_ft.export.onnx import (
    SIDE_FILES,
    add_features_output,
    export_fp32,
    optimize,
    quantize,
)
from gata_ft.export.parity import (
    EvalSet,
    GateInputs,
    escalation_block,
    excluded_nodes,
    gate,
    variant_record,
)
from gata_ft.export.recipe import Recipe
from gata_ft.inference import UNFUSED


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
    the fp32 graph is served instead; `strict` makes that a failure. A recipe
    with a `companion` (avx2: avx512_vnni) also ships the companion's int8 graph,
    gated on its own, for the runtime to serve on CPUs that have VNNI.
    """
    onnx_dir = content / ONNX_DIR
    graphs = {"fp32": FP32_GRAPH, "int8": INT8_GRAPH}
    with tempfile.TemporaryDirectory(prefix="gata-ft-onnx-") as scratch:
        work = Path(scratch)
        exported = export_fp32(content, work / "fp32", recipe.opset)
        add_features_output(exported)  # before fusion and int8: both graphs carry it
        onnx_dir.mkdir()
        shutil.copy2(exported, content / FP32_GRAPH)
        for name in SIDE_FILES:
            if (work / "fp32" / name).is_file():
                shutil.copy2(work / "fp32" / name, onnx_dir / name)
        emit(f"exported {FP32_GRAPH} (opset {recipe.opset}), validated against PyTorch by Optimum")
        fp32 = work / "fp32"
        parity, serve, chosen = _int8(content, fp32, work / "main", recipe, INT8_GRAPH,
                                      evaluation, strict, max_length, emit)  # fmt: skip
        if recipe.companion:
            companion = Recipe.load(recipe.companion)
            result = _int8(content, fp32, work / "companion", companion, VNNI_GRAPH,
                           evaluation, False, max_length, emit)  # fmt: skip
            if result[0]["checked"]:
                parity["companion"] = result[0]
            if result[1]["graph"] == VNNI_GRAPH:
                graphs["int8_vnni"] = VNNI_GRAPH
                serve["vnni"] = {**result[1], "recipe": companion.name, "quantization": result[2]}
            else:
                (content / VNNI_GRAPH).unlink(missing_ok=True)
                serve["vnni"] = None
                emit(f"not shipping a VNNI graph: {result[1]['reason']}")
        files.write_text(content / RECIPE, json.dumps(recipe.source, indent=2) + "\n")

    texts = golden_texts(evaluation.texts) if evaluation is not None else []
    golden = write_golden(content, texts, max_length, list(graphs.values()))
    return {
        "onnx": {
            "opset": recipe.opset,
            "recipe": recipe.name,
            "graphs": graphs,
            "quantization": chosen,
            "golden": golden,
            "unfused": list(UNFUSED),  # the runtime notices a model exported before this
        },
        "serve": serve,
        "parity": parity,
    }


def _int8(content, fp32, work, recipe, target, evaluation, strict, max_length, emit):
    """Quantize with `recipe` into content/target: gated with test data, as is without."""
    work.mkdir(parents=True, exist_ok=True)
    source = optimize(fp32, recipe.optimization_level, work / "optimized", recipe.fuse_attention)
    if evaluation is None:
        variant = recipe.variants[0]
        excluded = excluded_nodes(variant, source, work / "probe", sample=None)
        shutil.copy2(quantize(source, variant, excluded, work / "int8"), content / target)
        parity = {"checked": False, "reason": "no test data was given (gata-ft export --test DIR)"}
        serve = {"graph": target, "precision": "int8", "reason": "parity not checked",
                 **escalation_block(recipe)}  # fmt: skip
        return parity, serve, variant_record(variant, excluded)
    inputs = GateInputs(content, source, max_length, recipe, evaluation, work, target)
    return gate(inputs, strict, emit)
