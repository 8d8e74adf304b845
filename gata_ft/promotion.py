"""Champion and challenger: the new model against the one in service, on the same test tickets.

Verdict:
- keep: the new model is significantly worse (two-sided exact McNemar on the
  tickets where exactly one model is right, p < alpha), or it misses its
  routing target on the test set while the model in service meets its own;
- promote: significantly better, or not significantly different while its
  routing meets its target and routes at least (coverage of the model in
  service - 2 points) of the tickets;
- inconclusive: anything else (say, no difference and less routing).
"""

from __future__ import annotations

import numpy as np

from gata_ft import metrics
from gata_ft.data import Split
from gata_ft.paired import mcnemar_p
from gata_ft.runtime import Model

ALPHA = 0.05
COVERAGE_SLACK = 0.02  # routed share the new model may give up and still be promoted
DRIFT_FACTOR = 2.0  # a queue's training share that moved by more than this is reported
MIN_DRIFT_ROWS = 20  # ... when the queue has this many training rows on either side


def _outcomes(model: Model, split: Split) -> dict:
    probabilities, distances = model.score(split.texts, batch_size=1)
    predicted = [model.labels[int(i)] for i in probabilities.argmax(-1)]
    correct = np.array([p == t for p, t in zip(predicted, split.labels, strict=True)])
    routed = np.array(
        [
            bool(model.route_of(float(row.max()), label, d))
            for row, label, d in zip(probabilities, predicted, distances, strict=True)
        ]
    )
    hits, sent = int((correct & routed).sum()), int(routed.sum())
    target = (model.metadata.get("calibration") or {}).get("target_accuracy")
    interval = metrics.accuracy_interval(hits, sent) if sent else None
    return {
        "correct": correct,
        "figures": {
            "accuracy": float(correct.mean()),
            "routed": sent / len(split),
            "routed_accuracy": hits / sent if sent else None,
            "routed_interval": list(interval) if interval else None,
            "target_accuracy": target,
            "meets_target": None if interval is None or target is None else interval[1] >= target,
        },
    }


def drift(new: dict, baseline: dict) -> dict:
    """Labels added and removed, and training shares that moved by more than DRIFT_FACTOR."""

    def shares(metadata):
        counts = {e["label"]: e.get("train_count") or 0 for e in metadata["labels"]}
        total = sum(counts.values()) or 1
        return counts, {label: n / total for label, n in counts.items()}

    new_counts, new_shares = shares(new)
    old_counts, old_shares = shares(baseline)
    moved = []
    for label in sorted(set(new_counts) & set(old_counts)):
        if max(new_counts[label], old_counts[label]) < MIN_DRIFT_ROWS:
            continue
        a, b = old_shares[label], new_shares[label]
        factor = max(a, b) / max(min(a, b), 1e-12)
        if factor > DRIFT_FACTOR:
            moved.append({"label": label, "share_before": a, "share_now": b, "factor": factor})
    return {
        "added": sorted(set(new_counts) - set(old_counts)),
        "removed": sorted(set(old_counts) - set(new_counts)),
        "moved": moved,
        "factor": DRIFT_FACTOR,
    }


def compare_models(new: Model, baseline: Model, split: Split, alpha: float = ALPHA) -> dict:
    """The promotion block: both models' figures, the paired test, drift, verdict and reasons."""
    now, before = _outcomes(new, split), _outcomes(baseline, split)
    gained = int((now["correct"] & ~before["correct"]).sum())
    lost = int((~now["correct"] & before["correct"]).sum())
    p = mcnemar_p(lost, gained, side="two")
    a, b = now["figures"], before["figures"]
    reasons, verdict = [], "inconclusive"
    delta = a["accuracy"] - b["accuracy"]
    test = f"{gained} tickets now right, {lost} now wrong (exact McNemar p = {p:.3g})"
    if p < alpha and lost > gained:
        verdict = "keep"
        reasons.append(f"the new model is significantly worse: {test}")
    elif a["meets_target"] is False and b["meets_target"] is not False:
        verdict = "keep"
        reasons.append("the new model's routing misses its target on the test set")
    elif p < alpha:
        verdict = "promote"
        reasons.append(f"the new model is significantly better: {test}")
    elif a["meets_target"] is not False and a["routed"] >= b["routed"] - COVERAGE_SLACK:
        verdict = "promote"
        reasons.append(f"no significant difference ({test}); its routing meets its target "
                       f"and routes {100 * a['routed']:.1f}% of tickets against "
                       f"{100 * b['routed']:.1f}%")  # fmt: skip
    else:
        routed = f"{100 * a['routed']:.1f}% of tickets against {100 * b['routed']:.1f}%"
        reasons.append(f"no significant difference ({test}), and it routes {routed}")
    changes = drift(new.metadata, baseline.metadata)
    return {
        "verdict": verdict,
        "reasons": reasons,
        "tickets": len(split),
        "new": a,
        "baseline": {**b, "created_at": baseline.metadata.get("created_at")},
        "delta_accuracy": delta,
        "mcnemar": {"now_right": gained, "now_wrong": lost, "p": p, "alpha": alpha},
        "drift": changes,
    }


def describe(block: dict) -> list[str]:
    """The lines the job prints: the metric line for SageMaker's regexes, then the verdict."""
    a, b, drift_ = block["new"], block["baseline"], block["drift"]
    lines = [
        "{" + f"'promotion_delta_accuracy': {block['delta_accuracy']:.6f}, "
        f"'promotion_new_accuracy': {a['accuracy']:.6f}, "
        f"'promotion_baseline_accuracy': {b['accuracy']:.6f}" + "}",
        f"promotion: {block['verdict'].upper()}: " + "; ".join(block["reasons"]),
    ]
    if drift_["added"] or drift_["removed"]:
        lines.append(f"drift: labels added {drift_['added']}, removed {drift_['removed']}")
    for moved in drift_["moved"]:
        lines.append(
            f"WARNING: queue {moved['label']}'s share of the training data moved from "
            f"{100 * moved['share_before']:.1f}% to {100 * moved['share_now']:.1f}% "
            f"(more than {drift_['factor']:g}x)"
        )
    return lines
