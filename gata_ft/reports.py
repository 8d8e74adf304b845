"""The job's report: the Trainer's metrics, the per-queue table, and the files and plots it writes.

Every figure comes from `gata_ft.metrics`; this module only arranges them.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from gata_ft import files
from gata_ft.data import LabelMap
from gata_ft.metrics import ECE_BINS, SCALARS, Curve, Scores, bin_of, ece, top1

MODULE_DIR = Path(__file__).resolve().parent / "metric_modules" / "routing_metrics"


@cache
def _module():
    import evaluate

    # Loaded by path: no Hub look-up, so it works under network isolation.
    return evaluate.load(str(MODULE_DIR), keep_in_memory=True)


def compute(predictions, references, num_classes: int) -> dict:
    """All metrics for class-id predictions against class-id references (the evaluate module)."""
    return _module().compute(
        predictions=[int(p) for p in predictions],
        references=[int(r) for r in references],
        num_classes=num_classes,
    )


def trainer_metrics(num_classes: int):
    """A `compute_metrics` for the Hugging Face Trainer: scalar metrics only."""

    def compute_metrics(eval_pred) -> dict[str, float]:
        logits, references = eval_pred
        result = compute(np.argmax(logits, axis=-1), references, num_classes)
        return {name: result[name] for name in SCALARS}

    return compute_metrics


def format_log_dict(logs: dict) -> str:
    """A Trainer log as a Python-dict line whose numbers SageMaker's regexes can read.

    Fixed-point floats: `'eval_loss': 1.2e-05` would be scraped as 1.2.
    """
    parts = []
    for key, value in logs.items():
        if isinstance(value, float | np.floating):
            parts.append(f"'{key}': {float(value):.6f}")
        elif isinstance(value, int | np.integer):
            parts.append(f"'{key}': {int(value)}")
    return "{" + ", ".join(parts) + "}"


@dataclass(frozen=True)
class Report:
    """Metrics of one evaluation, keyed by original label ids."""

    scalars: dict[str, float]
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    labels: tuple[int, ...]

    def to_dict(self) -> dict:
        return {
            **self.scalars,
            "per_class": self.per_class,
            "confusion_matrix": {"labels": list(self.labels), "matrix": self.confusion},
        }


def build_report(logits: np.ndarray, class_ids, label_map: LabelMap, loss: float | None) -> Report:
    scores = Scores.of(np.argmax(logits, axis=-1), class_ids, len(label_map))
    scalars = scores.scalars()
    if loss is not None:
        scalars = {"loss": float(loss), **scalars}
    per_class = {
        str(label): {
            "precision": float(scores.precision[i]),
            "recall": float(scores.recall[i]),
            "f1": float(scores.f1[i]),
            "support": int(scores.support[i]),
        }
        for i, label in enumerate(label_map.labels)
    }
    return Report(scalars, per_class, scores.confusion.tolist(), label_map.labels)


def format_report(report: Report, max_confusions: int = 10) -> str:
    """Per-class table and the most frequent confusions, for the job log."""
    lines = [f"{'label':>20} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    for label, row in report.per_class.items():
        lines.append(
            f"{label:>20} {row['precision']:9.4f} {row['recall']:9.4f} "
            f"{row['f1']:9.4f} {row['support']:8d}"
        )
    s = report.scalars
    lines.append(
        f"{'macro avg':>20} {s['precision_macro']:9.4f} {s['recall_macro']:9.4f} "
        f"{s['f1_macro']:9.4f}"
    )
    lines.append(f"{'weighted avg':>20} {s['precision']:9.4f} {s['recall']:9.4f} {s['f1']:9.4f}")
    lines.append(f"{'accuracy':>20} {s['accuracy']:9.4f}")
    matrix = np.asarray(report.confusion)
    if len(report.labels) <= 12:
        lines.append("confusion matrix (rows: true label, columns: predicted label)")
        width = max(8, *(len(str(label)) + 1 for label in report.labels))
        lines.append(" " * 20 + "".join(f"{label:>{width}}" for label in report.labels))
        for label, row in zip(report.labels, matrix, strict=True):
            lines.append(f"{label:>20}" + "".join(f"{n:>{width}}" for n in row))
    else:
        off = matrix.copy()
        np.fill_diagonal(off, 0)
        order = np.argsort(off, axis=None)[::-1][:max_confusions]
        pairs = [np.unravel_index(k, off.shape) for k in order if off.flat[k] > 0]
        lines.append("most frequent confusions (full matrix in confusion_matrix.csv):")
        for t, p in pairs:
            lines.append(
                f"  true {report.labels[t]} -> predicted {report.labels[p]}: {off[t, p]} tickets"
            )
    return "\n".join(lines)


def write_reports(report: Report, out_dir: Path) -> list[Path]:
    """metrics.json, confusion_matrix.csv and confusion_matrix.png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.json"
    files.write_text(metrics_path, json.dumps(report.to_dict(), indent=2) + "\n")
    csv_path = out_dir / "confusion_matrix.csv"
    with (
        files.atomic_path(csv_path) as partial,
        partial.open("w", newline="", encoding="utf-8") as f,
    ):
        writer = csv.writer(f)
        writer.writerow(["true\\predicted", *report.labels])
        for label, row in zip(report.labels, report.confusion, strict=True):
            writer.writerow([label, *row])
    png_path = out_dir / "confusion_matrix.png"
    plot_confusion(report, png_path)
    return [metrics_path, csv_path, png_path]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(report: Report, path: Path) -> None:
    plt = _pyplot()
    matrix = np.asarray(report.confusion, dtype=float)
    n = len(report.labels)
    # Colour by the share of each true label's tickets, so that small queues
    # show their errors as clearly as large ones; annotate raw counts.
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.35 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = [str(label) for label in report.labels]
    ax.set_xticks(range(n), ticks, rotation=90, fontsize=8 if n <= 30 else 5)
    ax.set_yticks(range(n), ticks, fontsize=8 if n <= 30 else 5)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(f"Confusion matrix (accuracy {report.scalars['accuracy']:.4f})")
    if n <= 20:
        for (t, p), count in np.ndenumerate(matrix):
            if count:
                color = "white" if shares[t, p] > 0.5 else "black"
                ax.text(p, t, int(count), ha="center", va="center", color=color, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true label's tickets")
    fig.tight_layout()
    with files.atomic_path(path) as partial:
        fig.savefig(partial, dpi=100, format="png")
    plt.close(fig)


def plot_reliability(before: np.ndarray, after: np.ndarray, labels, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), sharey=True)
    edges = np.linspace(0, 1, ECE_BINS + 1)
    for ax, probs, title in ((axes[0], before, "before"), (axes[1], after, "after")):
        confidence, correct = top1(probs, labels)
        which = bin_of(confidence, ECE_BINS)
        accs = [correct[which == b].mean() if (which == b).any() else 0 for b in range(ECE_BINS)]
        ax.bar(edges[:-1], accs, width=1 / ECE_BINS, align="edge", edgecolor="black", alpha=0.7)
        ax.plot([0, 1], [0, 1], "--", color="gray")
        ax.set_title(f"{title} temperature scaling (ECE {ece(probs, labels):.4f})")
        ax.set_xlabel("confidence")
    axes[0].set_ylabel("accuracy")
    fig.tight_layout()
    with files.atomic_path(path) as partial:
        fig.savefig(partial, dpi=100, format="png")
    plt.close(fig)


def plot_coverage(curves: dict[str, Curve], threshold, target: float, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name, curve in curves.items():
        ax.plot(curve.coverage, curve.accuracy, label=name)
    ax.axhline(target, color="gray", linestyle="--", label=f"target accuracy {target}")
    ax.set_xlabel("share of tickets routed automatically")
    ax.set_ylabel("accuracy of the routed tickets")
    shown = "none" if threshold is None else f"{threshold:.3f}"
    ax.set_title(f"Coverage and accuracy (recommended threshold {shown})")
    ax.legend()
    fig.tight_layout()
    with files.atomic_path(path) as partial:
        fig.savefig(partial, dpi=100, format="png")
    plt.close(fig)


def _percent(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def describe_calibration(result: dict) -> list[str]:
    """The lines the job prints about calibration and routing (from the calibration block)."""
    t, rows = result["test"], result["calibration_rows"]
    held = f"{rows} held-out rows" if result["source"] == "calibration split" else (
        f"{rows} rows of the calibration channel"
    )  # fmt: skip
    lines = [
        f"calibration: temperature {result['temperature']:.4f} fitted on {held}; "
        f"test ECE {t['ece_before']:.4f} -> {t['ece_after']:.4f}, "
        f"NLL {t['nll_before']:.4f} -> {t['nll_after']:.4f}"
    ]
    if t["nll_after"] > t["nll_before"]:
        lines.append(
            f"WARNING: temperature scaling made the test NLL worse ({t['nll_before']:.4f} -> "
            f"{t['nll_after']:.4f}): the {result['source']} does not look like the test tickets "
            "(another label mix, or tickets no queue owns), so probabilities can be over- or "
            "under-confident on such traffic"
        )
    target, threshold = result["target_accuracy"], result["threshold"]
    if threshold is None:
        lines.append(
            f"routing: no threshold reaches {target} accuracy on the {result['source']}; "
            "nothing would be routed automatically"
        )
        return lines
    test = result["routing_test"]
    interval = test["interval"]
    shown = "" if interval is None else (
        f" (95% interval {_percent(interval[0])}-{_percent(interval[1])})"
    )  # fmt: skip
    lines.append(
        f"routing: threshold {threshold:.4f} for accuracy {target}{_scope_terms(result)}; on "
        f"the test set it routes {100 * test['coverage']:.1f}% of tickets automatically at "
        f"{_percent(test['accuracy'])} accuracy{shown}"
    )
    outside = test.get("out_of_scope")
    if outside and outside["tickets"]:
        aurocs = ", ".join(
            f"{name} {outside[f'auroc_{name}']:.3f}"
            for name in ("distance", "probability")
            if outside.get(f"auroc_{name}") is not None
        )
        lines.append(
            f"out of scope: {outside['tickets']} test tickets carry the fallback label "
            f"{result['fallback_label']}; {_percent(outside['routed'], 1)} of them are routed "
            f"(AUROC of the scores against them: {aurocs})"
        )
    if result["meets_target"] is False:
        lines.append(
            f"WARNING: {routing_shortfall(result)}. Give the job a calibration channel of "
            "recent labelled traffic (tickets no queue owns under fallback_label), or set "
            "expected_out_of_scope to the share of such traffic"
        )
    return lines


def _scope_terms(result: dict) -> str:
    scope, assumption = result.get("scope"), result.get("assumption") or {}
    terms = []
    if scope and scope["distance_threshold"] is not None:
        terms.append(
            f"in scope (distance at most {scope['distance_threshold']:.1f}, which rejects "
            f"{_percent(scope['rejected_in_scope'], 1)} of in-scope held-out tickets)"
        )
    if "expected_out_of_scope" in assumption:
        share = assumption["expected_out_of_scope"]
        assumed = f"assuming {_percent(share, 0)} of traffic out of scope"
        if share and assumption.get("out_of_scope_pass_rate") is not None:
            assumed += (
                f", {_percent(assumption['out_of_scope_pass_rate'], 1)} of it routed (as "
                f"{assumption['misrouted_rows']} misrouted held-out tickets are)"
            )
        terms.append(assumed)
    return "".join(f" and {t}" if i == 0 else f"; {t}" for i, t in enumerate(terms))


def routing_shortfall(result: dict) -> str:
    test = result["routing_test"]
    low, high = test["interval"]
    return (
        f"the routed accuracy on the test set, {_percent(test['accuracy'])} (95% interval "
        f"{_percent(low)}-{_percent(high)}) on {100 * test['coverage']:.1f}% of tickets, is "
        f"below the target {result['target_accuracy']}"
    )
