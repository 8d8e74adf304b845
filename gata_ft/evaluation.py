"""Score a shipped model on labelled tickets through the torch-free runtime and the graph it serves.

The figures come from the same code as the training job's report: the per-queue
report (`reports.build_report`), ECE and NLL, the routing report at the
artifact's own thresholds, and the out-of-scope figures (`metrics`).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from gata_ft import metrics
from gata_ft.data import LabelMap, Split
from gata_ft.errors import DataError
from gata_ft.reports import build_report
from gata_ft.runtime import Model


def evaluate(model: Model, split: Split, batch_size: int = 1) -> dict:
    """The report of `model` on `split` (one ticket per call by default, as the router serves).

    Tickets whose label the model does not know (a queue added since) cannot be
    predicted right: they are counted apart, by label, and left out of the scores.
    """
    known = set(model.labels)
    unknown = Counter(label for label in split.labels if label not in known)
    rows = [i for i, label in enumerate(split.labels) if label in known]
    if not rows:
        shown = ", ".join(str(label) for label in sorted(unknown)[:10])
        raise DataError(
            f"{split.path}: expected tickets labelled with the model's queues, found none "
            f"({len(unknown)} labels the model does not know: {shown})"
        )
    label_map = LabelMap(model.labels)
    texts = [split.texts[i] for i in rows]
    truth = np.asarray(label_map.class_ids([split.labels[i] for i in rows]))
    probabilities, distances = model.score(texts, batch_size)
    probabilities = probabilities.astype(np.float64)
    loss = metrics.nll(probabilities, truth)
    report = build_report(np.log(np.clip(probabilities, 1e-12, 1)), truth, label_map, loss)
    result = {
        "model": {
            "graph": model.graph,
            "labels": len(model.labels),
            "escalate": None
            if model.escalation is None
            else {"graph": model.escalation[0], "below": model.escalation[1]},
        },
        "data": {"file": str(split.path), "sha256": split.sha256, "rows": len(split)},
        "tickets": len(rows),
        "unknown_labels": {str(label): n for label, n in sorted(unknown.items())},
        "metrics": report.to_dict(),
        "calibration": {
            "ece": metrics.ece(probabilities, truth),
            "nll": loss,
            "ece_bins": metrics.ECE_BINS,
        },
        "routing": None,
    }
    if model.routes:
        predicted = probabilities.argmax(-1)
        routed = np.array(
            [
                bool(model.route_of(float(p.max()), model.labels[int(p.argmax())], d))
                for p, d in zip(probabilities, distances, strict=True)
            ],
            dtype=bool,
        )
        routing = metrics.routing_report(routed, predicted == truth, truth, model.labels)
        target = (model.metadata.get("calibration") or {}).get("target_accuracy")
        interval = routing["interval"]
        fallback = None
        if model.fallback_label is not None:
            fallback = label_map.class_ids([model.fallback_label])[0]
        scope = None if distances[0] is None else np.asarray(distances, dtype=float)
        result["routing"] = {
            **routing,
            "threshold": model.threshold,
            "target_accuracy": target,
            "meets_target": None if interval is None or target is None else interval[1] >= target,
            "out_of_scope": metrics.out_of_scope_figures(
                truth, probabilities, scope, routed, fallback
            ),
        }
    return result


def describe(result: dict) -> list[str]:
    """The lines `gata-ft evaluate` prints."""
    m = result["metrics"]
    lines = [
        f"{result['tickets']} tickets through {_served(result['model'])}: accuracy "
        f"{m['accuracy']:.4f}, macro F1 {m['f1_macro']:.4f}, weighted F1 {m['f1']:.4f}; "
        f"ECE {result['calibration']['ece']:.4f}, NLL {result['calibration']['nll']:.4f}"
    ]
    if result["unknown_labels"]:
        shown = ", ".join(f"{k} ({v})" for k, v in result["unknown_labels"].items())
        lines.append(
            f"left out: {sum(result['unknown_labels'].values())} tickets whose labels the "
            f"model does not know: {shown}"
        )
    routing = result["routing"]
    if routing is not None:
        interval = routing["interval"]
        shown = "" if interval is None else (
            f" (95% interval {100 * interval[0]:.2f}%-{100 * interval[1]:.2f}%)"
        )  # fmt: skip
        accuracy = "-" if routing["accuracy"] is None else f"{100 * routing['accuracy']:.2f}%"
        lines.append(
            f"routing at the model's thresholds: {100 * routing['coverage']:.1f}% of tickets at "
            f"{accuracy} accuracy{shown}; target {routing['target_accuracy']}, "
            f"meets it: {routing['meets_target']}"
        )
        outside = routing["out_of_scope"]
        if outside and outside.get("tickets"):
            lines.append(
                f"out of scope: {outside['tickets']} tickets carry the fallback label; "
                f"{100 * outside['routed']:.1f}% of them are routed"
            )
    return lines


def _served(model: dict) -> str:
    escalate = model.get("escalate")
    if escalate is None:
        return model["graph"]
    return f"{model['graph']} ({escalate['graph']} below {escalate['below']:g})"
