"""int8 fidelity and speed on one or many-queue models: each quantization against PyTorch fp32.

For each case (a shipped model.tar.gz and a labelled test channel) and each
candidate graph: top-1 agreement with PyTorch fp32 (one ticket per call, as the
router serves), accuracy and macro-F1 drop, the old gate's decision (point
drops within 1 point, no label with 20+ tickets losing more than 5 points of
recall) and the new gate's (upper bounds within 1 point, no label significantly
worse: exact McNemar, Holm), size, and batch-1 p50 latency beside ONNX fp32 and
PyTorch, measured in this one run. The CPU model and flags are printed first.

Run: make bench-int8 (after make bench-calibration and make bench-routing), or
python bench/int8.py --case NAME=MODEL.tar.gz:TEST_DIR ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from machine import describe

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build" / "bench"
SHARED = REPO.parent / "shared" / "data" / "banking77"
OOS = BUILD / "routing/banking77-oos-seed0"
DEFAULT_CASES = [
    f"BANKING77 (77 queues)={BUILD / 'calibration/balanced/model/model.tar.gz'}:{SHARED / 'test'}",
    f"BANKING77-OOS (61 queues)={OOS / 'job-split/model/model.tar.gz'}:{OOS / 'test'}",
    f"CLINC150 (151 queues, 30 test tickets each)="
    f"{BUILD / 'routing/clinc150-seed0/job-split/model/model.tar.gz'}:"
    f"{REPO.parent / 'extra-data/clinc150/test'}",
]


def candidates(folder: Path, work: Path):
    """(name, graph path) of each int8 candidate, built from the artifact's fp32 graph."""
    from gata_ft.export.onnx import node_names, optimize, quantize
    from gata_ft.export.recipe import Recipe, Variant

    onnx_dir = folder / "onnx"
    unfused = optimize(onnx_dir, 2, work / "unfused", fuse_attention=False)
    fused = optimize(onnx_dir, 2, work / "fused", fuse_attention=True)
    avx2, vnni = Recipe.load("avx2").variants[0], Recipe.load("avx512_vnni").variants[0]
    yield (
        "int8 avx2 (default, portable): s7 weights, unfused",
        quantize(unfused, avx2, [], work / "avx2"),
    )
    yield (
        "int8 avx512_vnni (VNNI CPUs): s8, fused attention",
        quantize(fused, vnni, [], work / "vnni"),
    )
    yield (
        "int8 s8 weights, unfused (VNNI CPUs)",
        quantize(unfused, Variant("s8", "avx512", True, False), [], work / "s8"),
    )
    edges = node_names(unfused, [r"/layer\.0/", r"/layer\.5/", r"/layer\.11/"])
    yield "int8 s7, first and last layers fp32", quantize(unfused, avx2, edges, work / "edges")
    try:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:  # needs the onnx-ir package
        print(f"skipping weight-only int8: {e}", file=sys.stderr)
        return
    out = work / "weight-only.onnx"
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(onnx_dir / "model.onnx")), bits=8, block_size=128, is_symmetric=True,
        accuracy_level=4,
    )  # fmt: skip
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), True)
    yield "weight-only int8 (MatMulNBits, block 128), fp32 activations", out


def old_gate(reference, candidate, truth, k: int) -> bool:
    """The gate before: point drops within 1 point, no 20+ ticket label 5+ points of recall."""
    from gata_ft.metrics import Scores

    before, after = Scores.of(reference, truth, k), Scores.of(candidate, truth, k)
    if 100 * (before.accuracy - after.accuracy) > 1 + 1e-9:
        return False
    if 100 * (before.f1_macro - after.f1_macro) > 1 + 1e-9:
        return False
    gated = before.support >= 20
    return not (100 * (before.recall - after.recall)[gated] > 5 + 1e-9).any()


def latency(predict, texts) -> tuple[float, float]:
    """Batch-1 (p50, mean) in ms over 300 tickets, after 20 to warm up."""
    for text in texts[:20]:
        predict(text)
    times = []
    for text in texts[20:320]:
        started = time.perf_counter()
        predict(text)
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times)), 1000 * float(np.mean(times))


SERVED = ("int8 avx2", "int8 avx512_vnni")  # the recipes' graphs, which escalate


def run_case(name: str, artifact: Path, test: Path, threads: int) -> list[dict]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from gata_ft.archive import safe_extract
    from gata_ft.export.parity import gate_failures
    from gata_ft.export.recipe import Recipe
    from gata_ft.export.reference import torch_logits
    from gata_ft.inference import STOP_SPINNING, OnnxClassifier
    from gata_ft.metrics import softmax, unsure
    from gata_ft.paired import compare

    torch.set_num_threads(threads)
    rows_out = []
    with tempfile.TemporaryDirectory() as scratch:
        folder, work = Path(scratch) / "model", Path(scratch) / "work"
        safe_extract(artifact, folder)
        meta = json.loads((folder / "metadata.json").read_text())
        labels = [e["label"] for e in meta["labels"]]
        rows = [json.loads(line) for line in (test / "data.json").open()]
        texts = [r["text"] for r in rows]
        truth = np.array([labels.index(r["label"]) for r in rows])
        max_length, k = meta["max_length"], len(labels)
        reference = torch_logits(folder, texts, max_length).argmax(-1)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()

        def torch_one(text):
            batch = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
            with torch.inference_mode():
                return model(**batch).logits

        # test files are often grouped by label: time a seeded sample of the whole set
        sample = [texts[i] for i in np.random.default_rng(0).permutation(len(texts))[:320]]
        pytorch_ms, _ = latency(torch_one, sample)
        recipe = Recipe.load("avx2")
        limits, below = recipe.parity, recipe.escalate_below
        fp32_graph = folder / "onnx" / "model.onnx"
        graphs = [("ONNX fp32", fp32_graph), *candidates(folder, work)]
        fp32_ms = fp32_logits = None
        for label, graph in graphs:
            classifier = OnnxClassifier(graph, folder / "tokenizer.json", max_length, threads)
            logits = np.concatenate([classifier.logits([t]) for t in texts])
            fp32_logits = logits if fp32_logits is None else fp32_logits
            ms, _ = latency(lambda t, c=classifier: c.logits([t]), sample)
            fp32_ms = fp32_ms or ms
            size = sum(p.stat().st_size for p in graph.parent.glob(graph.name + "*"))
            ways = [(label, logits.argmax(-1), ms, None, None)]
            if label.startswith(SERVED):  # as served: unsure answers scored again in fp32
                again_rows = unsure(softmax(logits), below)
                # as the runtime loads them: neither session left spinning after its run
                first = OnnxClassifier(graph, folder / "tokenizer.json", max_length, threads,
                                       STOP_SPINNING)  # fmt: skip
                again = OnnxClassifier(fp32_graph, folder / "tokenizer.json", max_length,
                                       threads, STOP_SPINNING)  # fmt: skip

                def cascade(t, c=first, again=again):
                    scores = c.logits([t])
                    return again.logits([t]) if unsure(softmax(scores), below)[0] else scores

                p50, mean = latency(cascade, sample)
                ways.append((f"{label} + fp32 below {below:g}",
                             np.where(again_rows, fp32_logits.argmax(-1), logits.argmax(-1)),
                             p50, mean, float(again_rows.mean())))  # fmt: skip
            for way, predicted, ms, mean, escalated in ways:
                result = compare(reference, predicted, truth, k)
                new = not gate_failures(result, limits, labels)
                rows_out.append({
                    "case": name, "graph": way, "agreement": result.agreement,
                    "accuracy": result.candidate.accuracy, "drop": result.accuracy_drop,
                    "f1_drop": result.f1_drop, "drop_bound": result.accuracy_drop_bound,
                    "old_gate": old_gate(reference, predicted, truth, k), "new_gate": new,
                    "mb": size / 1e6, "ms": ms, "x_fp32": fp32_ms / ms,
                    "x_pytorch": pytorch_ms / ms, "escalated": escalated, "mean_ms": mean,
                })  # fmt: skip
            print(f"measured {name}: {label}", file=sys.stderr, flush=True)
        print(f"\n== {name}: {len(texts)} test tickets, {k} queues; PyTorch fp32 accuracy "
              f"{(reference == truth).mean():.4f}, batch 1 p50 {pytorch_ms:.2f} ms")  # fmt: skip
        print(f"{'graph':<62}{'agree':>7}{'acc':>8}{'drop':>6}{'F1 drop':>8}{'bound':>6}"
              f"{'old':>6}{'new':>6}{'MB':>6}{'b1 ms':>7}{'x fp32':>7}{'x torch':>8}")  # fmt: skip
        for r in rows_out:
            old, new = ("pass" if r[g] else "FAIL" for g in ("old_gate", "new_gate"))
            print(f"{r['graph']:<62}{r['agreement']:>7.4f}{r['accuracy']:>8.4f}{r['drop']:>6.2f}"
                  f"{r['f1_drop']:>8.2f}{r['drop_bound']:>6.2f}{old:>6}{new:>6}{r['mb']:>6.1f}"
                  f"{r['ms']:>7.2f}{r['x_fp32']:>7.2f}{r['x_pytorch']:>8.2f}")  # fmt: skip
            if r["escalated"] is not None:
                print(f"{'':<4}{100 * r['escalated']:.1f}% of tickets scored again in fp32; "
                      f"mean {r['mean_ms']:.2f} ms ({fp32_ms / r['mean_ms']:.2f}x ONNX fp32's "
                      f"p50, {pytorch_ms / r['mean_ms']:.2f}x PyTorch's)")  # fmt: skip
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", help="NAME=MODEL.tar.gz:TEST_DIR")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    print(describe())
    results = []
    for case in args.case or DEFAULT_CASES:
        name, rest = case.split("=", 1)
        artifact, test = rest.rsplit(":", 1)
        if not Path(artifact).is_file() or not (Path(test) / "data.json").is_file():
            print(f"skipping {name}: {artifact} or {test} not found", file=sys.stderr)
            continue
        results += run_case(name, Path(artifact), Path(test), args.threads)
    out = BUILD / "int8.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
