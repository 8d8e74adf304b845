"""Calibration and routing on BANKING77 with MiniLM, and class weighting on an imbalanced copy.

1. `gata-ft train` on BANKING77 with a 10% calibration split and target accuracy 0.97
   (other options as in bench/banking77-hyperparameters.json, class weighting on by default):
   test ECE and NLL before/after temperature scaling; share of test tickets routed at the
   recommended threshold, and their accuracy.
2. The same on an imbalanced training set made from BANKING77 (seeded): label r of a
   seeded order keeps 100^(-r/76) of its rows (at least 3: 131 to 3 rows per label, 44x);
   trained for 20 epochs with class_weighting off and on, evaluated on the untouched
   (balanced) test set, where every queue counts the same, and on a copy of the test set
   made imbalanced with the same shares (at least 1 row per label), which looks like the
   traffic the model was trained for. The second evaluation runs the shipped ONNX graph
   through gata_ft.runtime.
Run: make bench-calibration (about 30 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

from machine import describe

from gata_ft.sagemaker import local_env

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "banking77"
WORK = REPO / "build" / "bench" / "calibration"
BASE = json.loads((REPO / "bench" / "banking77-hyperparameters.json").read_text())


def imbalanced_copy(source: Path, target: Path, seed: int = 0) -> dict[int, int]:
    """Write imbalanced train and test channels; return training rows per label."""
    channels = {
        name: [json.loads(line) for line in (source / name / "data.json").open()]
        for name in ("train", "test")
    }
    labels = sorted({r["label"] for r in channels["train"]})
    rng = random.Random(seed)
    order = labels[:]
    rng.shuffle(order)
    keep_share = {label: 100 ** (-rank / (len(order) - 1)) for rank, label in enumerate(order)}
    counts = {}
    for channel, floor in (("train", 3), ("test", 1)):
        rows, kept = channels[channel], []
        for label in labels:
            mine = [r for r in rows if r["label"] == label]
            rng.shuffle(mine)
            n = max(floor, round(keep_share[label] * len(mine)))
            kept += mine[:n]
            if channel == "train":
                counts[label] = n
        rng.shuffle(kept)
        (target / channel).mkdir(parents=True, exist_ok=True)
        (target / channel / "data.json").write_text("".join(json.dumps(r) + "\n" for r in kept))
    return counts


def evaluate_shipped(artifact: Path, channel: Path, meta: dict) -> dict:
    """Accuracy, macro F1, ECE and routing of the shipped graph on another test channel."""
    import numpy as np

    from gata_ft import metrics
    from gata_ft.archive import safe_extract
    from gata_ft.runtime import Model

    folder = artifact.parent / "extracted"
    if not folder.is_dir():
        safe_extract(artifact, folder)
    model = Model.load(folder, escalate=False)  # the int8 graph alone, as in the README table
    rows = [json.loads(line) for line in (channel / "data.json").open()]
    index = {label: i for i, label in enumerate(model.labels)}
    truth = np.array([index[r["label"]] for r in rows])
    # one ticket per call, as the router serves (int8 scales depend on the batch)
    predictions = [model.predict([r["text"]])[0] for r in rows]
    logits = np.concatenate([model.classifier.logits([r["text"]]) for r in rows]).astype(float)
    temperature = meta["calibration"]["temperature"]
    before, after = metrics.softmax(logits * temperature), metrics.softmax(logits)  # T folded in
    predicted = after.argmax(-1)
    routed = np.array([bool(p.route) for p in predictions])
    report = metrics.routing_report(routed, predicted == truth, truth, model.labels)
    scores = metrics.Scores.of(predicted, truth, len(model.labels))
    return {
        "rows": len(rows),
        "accuracy": scores.accuracy,
        "f1_macro": scores.f1_macro,
        "ece_before": metrics.ece(before, truth),
        "ece_after": metrics.ece(after, truth),
        "coverage": report["coverage"],
        "routed_accuracy": report["accuracy"],
    }


def run_job(name: str, train: Path, hyperparameters: dict) -> dict:
    work = WORK / name
    artifact = work / "model" / "model.tar.gz"
    if not artifact.is_file():
        (work / "config").mkdir(parents=True, exist_ok=True)
        (work / "model").mkdir(parents=True, exist_ok=True)
        (work / "config" / "hyperparameters.json").write_text(json.dumps(hyperparameters))
        env = {**os.environ, **local_env(work, train, DATA / "test")}
        with (work / "train.log").open("w") as log:
            code = subprocess.call([sys.executable, "-m", "gata_ft", "train"], env=env, stdout=log)
        if code:
            sys.exit(f"{name}: training failed; see {work / 'train.log'}")
    from gata_ft.artifact import verify_tarball

    return verify_tarball(artifact)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--balanced-only", action="store_true", help="skip the imbalanced runs")
    args = parser.parse_args()
    hyper = {**BASE, "calibration_split": "0.1", "target_accuracy": str(args.target)}
    print(describe())

    balanced = run_job("balanced", DATA / "train", hyper)

    def routing(meta):
        c = meta["calibration"]
        test, r = c["test"], c["routing_test"]
        accuracy = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        threshold = "none" if c["threshold"] is None else f"{c['threshold']:.4f}"
        return (f"T {c['temperature']:.3f}  ECE {test['ece_before']:.4f} -> {test['ece_after']:.4f}"
                f"  NLL {test['nll_before']:.4f} -> {test['nll_after']:.4f}  threshold {threshold}"
                f"  routed {100 * r['coverage']:.1f}% at accuracy {accuracy}")  # fmt: skip

    print(f"BANKING77, all-MiniLM-L6-v2, target accuracy {args.target}, 10% calibration split")
    m = balanced["metrics"]["test"]
    print(f"balanced training set: accuracy {m['accuracy']:.4f}, macro F1 {m['f1_macro']:.4f}")
    print(f"  {routing(balanced)}")
    if args.balanced_only:
        return
    counts = imbalanced_copy(DATA, WORK / "imbalanced-data")
    # A fifth of the rows: 20 epochs give about the optimizer steps of the balanced run's 8/2.
    small = {**hyper, "num_train_epochs": "20"}
    runs = {
        "off": run_job(
            "imbalanced-unweighted",
            WORK / "imbalanced-data" / "train",
            {**small, "class_weighting": "false"},
        ),
        "on": run_job(
            "imbalanced-weighted",
            WORK / "imbalanced-data" / "train",
            {**small, "class_weighting": "true"},
        ),
    }

    sizes = sorted(counts.values())
    print(f"imbalanced training set: {sum(sizes)} rows, {sizes[-1]} to {sizes[0]} per label "
          f"({sizes[-1] / sizes[0]:.0f}x); test set unchanged")  # fmt: skip
    print(f"{'class_weighting':<18}{'accuracy':>9}{'macro F1':>10}{'weighted F1':>12}"
          f"{'min recall':>11}")  # fmt: skip
    for key, meta in runs.items():
        t = meta["metrics"]["test"]
        worst = min(row["recall"] for row in t["per_class"].values())
        print(f"{key:<18}{t['accuracy']:>9.4f}{t['f1_macro']:>10.4f}{t['f1']:>12.4f}{worst:>11.4f}")
        print(f"  {routing(meta)}")
    traffic = WORK / "imbalanced-data" / "test"
    shipped = {
        key: evaluate_shipped(WORK / name / "model" / "model.tar.gz", traffic, runs[key])
        for key, name in (("off", "imbalanced-unweighted"), ("on", "imbalanced-weighted"))
    }
    print(f"imbalanced test set (same shares, {shipped['off']['rows']} rows), shipped graph "
          f"through gata_ft.runtime, one ticket per call")  # fmt: skip
    for key, r in shipped.items():
        accuracy = "-" if r["routed_accuracy"] is None else f"{r['routed_accuracy']:.4f}"
        print(f"{key:<18}accuracy {r['accuracy']:.4f}  macro F1 {r['f1_macro']:.4f}  ECE "
              f"{r['ece_before']:.4f} -> {r['ece_after']:.4f}  routed {100 * r['coverage']:.1f}%"
              f" at accuracy {accuracy}")  # fmt: skip


if __name__ == "__main__":
    main()
