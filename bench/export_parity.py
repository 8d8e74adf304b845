"""PyTorch fp32 vs ONNX fp32 vs ONNX int8 on BANKING77: accuracy, agreement, size, CPU latency.

Uses the model that `make bench-banking77` trained (build/bench/banking77), exports it
with `gata-ft export --test` for each recipe, and measures everything side by side in
one run on this machine. Run: make bench-export
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "banking77"
WORK = REPO / "build" / "bench" / "banking77"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", type=Path, default=WORK / "model" / "model.tar.gz")
    parser.add_argument(
        "--recipes", default=f"avx2,avx512_vnni,{REPO / 'bench' / 'first-try-recipe.json'}"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--single", type=int, default=300, help="texts timed one at a time")
    parser.add_argument("--batches", type=int, default=40, help="batches of 32 timed")
    args = parser.parse_args()
    if not args.model.is_file():
        sys.exit(f"{args.model} not found: run `make bench-banking77` first")

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from gata_ft.archive import safe_extract
    from gata_ft.artifact import verify_tarball
    from gata_ft.data import read_split
    from gata_ft.inference import OnnxClassifier

    torch.set_num_threads(args.threads)
    test = read_split(args.data / "test", "test")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        exported = {}
        for recipe in args.recipes.split(","):
            name = Path(recipe).stem
            out = WORK / f"export-{name}.tar.gz"
            if not out.is_file():
                command = [sys.executable, "-m", "gata_ft", "export", str(args.model),
                           "-o", str(out), "--test", str(args.data / "test"),
                           "--recipe", recipe]  # fmt: skip
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            folder = Path(scratch) / name
            safe_extract(out, folder)
            exported[name] = (verify_tarball(out), folder)

        metadata, folder = next(iter(exported.values()))
        labels = [entry["label"] for entry in metadata["labels"]]
        truth = np.array([labels.index(label) for label in test.labels])
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        max_length = metadata["max_length"]

        def torch_predict(texts):
            batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True,
                              return_tensors="pt")  # fmt: skip
            with torch.inference_mode():
                return model(**batch).logits.numpy()

        candidates = [("PyTorch fp32", torch_predict, folder / "model.safetensors")]
        fp32 = OnnxClassifier(folder / "onnx/model.onnx", folder / "tokenizer.json", max_length,
                              intra_op_threads=args.threads)  # fmt: skip
        candidates.append(("ONNX fp32", fp32.logits, folder / "onnx/model.onnx"))
        for recipe, (meta, recipe_folder) in exported.items():
            graph = recipe_folder / meta["onnx"]["graphs"]["int8"]
            int8 = OnnxClassifier(graph, recipe_folder / "tokenizer.json", max_length,
                                  intra_op_threads=args.threads)  # fmt: skip
            gate = "passes" if meta["parity"]["passed"] else "fails"
            label = f"ONNX int8, {recipe} ({meta['onnx']['quantization']['variant']}, {gate})"
            candidates.append((label, int8.logits, graph))

        reference = None
        for name, predict, path in candidates:
            # one ticket per call, as the router serves: dynamic int8 scores depend on the batch
            predictions = np.array([predict([text])[0].argmax() for text in test.texts])
            reference = predictions if reference is None else reference
            b1 = latencies(predict, [[t] for t in test.texts[: args.single]])
            batches = [test.texts[i * 32 : (i + 1) * 32] for i in range(args.batches)]
            b32 = latencies(predict, batches)
            rows.append(
                {
                    "model": name,
                    "accuracy": float((predictions == truth).mean()),
                    "agreement": float((predictions == reference).mean()),
                    "size_mb": path.stat().st_size / 1e6,
                    "b1_p50": b1[0],
                    "b1_p95": b1[1],
                    "b32_p50": b32[0],
                    "b32_p95": b32[1],
                }
            )
            print(f"measured {name}", file=sys.stderr, flush=True)

    base = rows[0]
    print(f"BANKING77 test ({len(test)} tickets), all-MiniLM-L6-v2 fine-tuned by gata-ft; "
          f"{args.threads} threads; latency includes tokenization")  # fmt: skip
    header = (f"{'model':<50}{'accuracy':>9}{'agree':>8}{'MB':>7}{'b1 p50':>8}{'b1 p95':>8}"
              f"{'b32 p50':>9}{'b32 p95':>9}{'x b1':>6}{'x b32':>7}")  # fmt: skip
    print(header)
    for r in rows:
        print(
            f"{r['model']:<50}{r['accuracy']:>9.4f}{r['agreement']:>8.4f}{r['size_mb']:>7.1f}"
            f"{r['b1_p50']:>8.2f}{r['b1_p95']:>8.2f}{r['b32_p50']:>9.1f}{r['b32_p95']:>9.1f}"
            f"{base['b1_p50'] / r['b1_p50']:>6.1f}{base['b32_p50'] / r['b32_p50']:>7.1f}"
        )
    print("latencies in ms; x: p50 speed-up over PyTorch fp32; agree: top-1 agreement with it")
    print(json.dumps(rows))


def latencies(predict, batches) -> tuple[float, float]:
    """p50 and p95 in milliseconds, after a warm-up of 5 calls."""
    for batch in batches[:5]:
        predict(batch)
    times = []
    for batch in batches:
        started = time.perf_counter()
        predict(batch)
        times.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


if __name__ == "__main__":
    main()
