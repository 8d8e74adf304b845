"""The parity gate: int8 against PyTorch fp32 on the test set, trying the recipe's fallbacks."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from gata_ft.artifact import FP32_GRAPH, INT8_GRAPH, TOKENIZER
from gata_ft.errors import ExportError
from gata_ft.export.golden import golden_texts
from gata_ft.export.onnx import most_sensitive_nodes, node_names, quantize
from gata_ft.export.recipe import Recipe, Thresholds, Variant
from gata_ft.export.reference import onnx_scores, torch_scores
from gata_ft.inference import OnnxClassifier
from gata_ft.metrics import Scores, softmax, unsure
from gata_ft.paired import Comparison, compare
from gata_ft.scope import RoutingRule, Scope

log = logging.getLogger("gata_ft")
SLACK = 1e-9  # 2 of 40 tickets is 5 points, not 5.000000000000004


@dataclass(frozen=True)
class EvalSet:
    """Texts and class ids to check parity on (the test split)."""

    texts: list[str]
    class_ids: list[int]
    labels: tuple[int, ...]  # original label of each class id
    routing: tuple[RoutingRule, Scope] | None = None  # int8 must route as fp32 does


def gate_failures(result: Comparison, limits: Thresholds, labels) -> list[str]:
    """Why a candidate fails the parity gate (empty: it passes).

    Overall, non-inferiority: the upper confidence bounds of the accuracy and
    macro-F1 drops must stay within the recipe's limits. Per label, an exact
    McNemar test on the tickets whose outcome changed, Holm-corrected across the
    labels with changed tickets (family-wise: the gate asks whether any queue is
    harmed, and a false alarm costs the int8 graph): a label fails when int8 is
    significantly worse on it.
    """
    failures = []
    level = f"{100 * (1 - limits.alpha):.0f}% upper bound"
    for name, drop, bound, limit in (
        ("accuracy", result.accuracy_drop, result.accuracy_drop_bound, limits.max_accuracy_drop),
        ("macro F1", result.f1_drop, result.f1_drop_bound, limits.max_macro_f1_drop),
    ):
        if bound > limit + SLACK:
            failures.append(
                f"{name} drop up to {bound:.2f} points ({level}; measured {drop:.2f}), "
                f"limit {limit}"
            )
    for test in result.harmed:
        failures.append(
            f"label {labels[test.class_id]}: {test.worse} of its {test.tickets} tickets went "
            f"wrong, {test.better} right (exact McNemar p = {test.p:.2g}, Holm {test.p_holm:.2g}"
            f" <= {limits.alpha})"
        )
    return failures


def worst_label(result: Comparison, labels) -> str:
    """The label with the smallest Holm-adjusted p-value where int8 lost tickets."""
    losing = [t for t in result.labels if t.worse > t.better]
    if not losing:
        return "-"
    test = min(losing, key=lambda t: (t.p_holm, -t.worse))
    return f"{labels[test.class_id]} -{test.worse}+{test.better} p={test.p_holm:.2g}"


@dataclass
class Attempt:
    variant: str
    settings: dict
    excluded_nodes: list[str]
    scores: dict
    agreement: float
    failures: list[str]
    route_agreement: float | None = None  # same routing decision and queue as PyTorch fp32
    escalated: float | None = None  # share of tickets scored again by the fp32 graph
    int8_agreement: float | None = None  # the int8 graph alone, before escalation

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class GateInputs:
    """What the gate compares: the checkpoint (PyTorch), the graph to quantize, the test set."""

    content: Path  # the checkpoint folder (PyTorch) that receives onnx/
    source: Path  # the (fused) fp32 graph each variant quantizes
    max_length: int
    recipe: Recipe
    evaluation: EvalSet
    work: Path  # scratch space for the variants
    target: str = INT8_GRAPH  # where the chosen graph goes, relative to content

    @property
    def tokenizer_file(self) -> Path:
        return self.content / TOKENIZER


def escalation_block(recipe: Recipe) -> dict:
    """The serve block's `escalate` entry for an int8 graph of `recipe` (empty: none)."""
    if recipe.escalate_below is None:
        return {}
    return {"escalate": {"graph": FP32_GRAPH, "below": recipe.escalate_below}}


def route_actions(logits, features, routing) -> np.ndarray | None:
    """What the router does with each ticket: the class it routes to, or -1 (not routed)."""
    if routing is None:
        return None
    rule, scope = routing
    probabilities = softmax(np.asarray(logits, dtype=np.float64))
    distances = scope.distance(features) if features is not None else None
    routed = rule.route(probabilities, distances)
    return np.where(routed, probabilities.argmax(-1), -1)


def variant_record(variant: Variant, excluded: list[str]) -> dict:
    return {
        "variant": variant.label,
        "preset": variant.preset,
        "per_channel": variant.per_channel,
        "reduce_range": variant.reduce_range,
        "excluded_nodes": excluded,
    }


def excluded_nodes(variant: Variant, source: Path, work: Path, sample: dict | None) -> list[str]:
    """The recipe's excluded node patterns, plus the most damaging nodes when it asks for them."""
    excluded = node_names(source, variant.nodes_to_exclude)
    if variant.exclude_most_sensitive and sample is not None:
        plain = replace(variant, exclude_most_sensitive=0)
        first = quantize(source, plain, excluded, work)
        excluded += most_sensitive_nodes(
            source, first, sample, variant.exclude_most_sensitive, skip=excluded
        )
    return excluded


def gate(inputs: GateInputs, strict: bool, emit: Callable[[str], None]):
    """Quantize each variant of the recipe until one passes; returns (parity, serve, chosen)."""
    evaluation, recipe = inputs.evaluation, inputs.recipe
    truth = np.asarray(evaluation.class_ids)
    n = len(evaluation.labels)
    reference_logits, reference_features = torch_scores(
        inputs.content, evaluation.texts, inputs.max_length
    )
    reference_pred = reference_logits.argmax(-1)
    reference = Scores.of(reference_pred, truth, n)
    reference_actions = route_actions(reference_logits, reference_features, evaluation.routing)
    fp32_logits, fp32_features = onnx_scores(
        inputs.content / FP32_GRAPH, inputs.tokenizer_file, evaluation.texts, inputs.max_length
    )  # fp32 scores do not depend on the batch (no dynamic quantization)
    fp32_pred = fp32_logits.argmax(-1)
    fp32 = Scores.of(fp32_pred, truth, n)
    fp32_agreement = float((fp32_pred == reference_pred).mean())
    if fp32_agreement < 0.999:
        raise ExportError(
            f"the fp32 ONNX graph agrees with PyTorch on only {100 * fp32_agreement:.2f}% of "
            "the test tickets (expected 99.9% or more): the export is broken"
        )
    alpha = recipe.parity.alpha
    fp32_result = compare(reference_pred, fp32_pred, truth, n, alpha)
    rows = [("PyTorch fp32", None, None, "-"), ("ONNX fp32", fp32_result, None, "-")]

    attempts: list[Attempt] = []
    graphs: list[Path] = []
    notes: list[str] = []
    sample = OnnxClassifier(inputs.source, inputs.tokenizer_file, inputs.max_length).encode(
        golden_texts(evaluation.texts)
    )
    for i, variant in enumerate(recipe.variants):
        excluded = excluded_nodes(variant, inputs.source, inputs.work / f"probe{i}", sample)
        graphs.append(quantize(inputs.source, variant, excluded, inputs.work / f"int8-{i}"))
        logits, features = onnx_scores(
            graphs[-1], inputs.tokenizer_file, evaluation.texts, inputs.max_length, 1
        )
        escalated = int8_agreement = None
        if recipe.escalate_below is not None:  # gate what the runtime serves: int8, then fp32
            int8_agreement = float((logits.argmax(-1) == reference_pred).mean())
            again = unsure(softmax(logits), recipe.escalate_below)
            escalated = float(again.mean())
            logits = np.where(again[:, None], fp32_logits, logits)
            if features is not None and fp32_features is not None:
                features = np.where(again[:, None], fp32_features, features)
        pred = logits.argmax(-1)
        result = compare(reference_pred, pred, truth, n, alpha)
        failures = gate_failures(result, recipe.parity, evaluation.labels)
        route_agreement = None
        if reference_actions is not None:
            actions = route_actions(logits, features, evaluation.routing)
            route_agreement = float((actions == reference_actions).mean())
            if route_agreement < recipe.parity.min_route_agreement - SLACK:
                failures.append(
                    f"routes {100 * route_agreement:.2f}% of tickets as PyTorch fp32 does "
                    f"(limit {100 * recipe.parity.min_route_agreement:.1f}%)"
                )
        attempt = Attempt(
            variant.label,
            variant_record(variant, excluded),
            excluded,
            _scores_dict(result.candidate, evaluation.labels) | _bounds(result, evaluation.labels),
            result.agreement,
            failures,
            route_agreement,
            escalated,
            int8_agreement,
        )
        attempts.append(attempt)
        verdict = "passes" if attempt.passed else "fails: " + "; ".join(failures)
        name = f"ONNX int8 {recipe.name} ({variant.label})"
        if escalated is not None:
            name += " + fp32"
            notes.append(
                f"{name}: tickets whose int8 top probability is below "
                f"{recipe.escalate_below:g} are scored again by the fp32 graph "
                f"({100 * escalated:.1f}% of them; int8 alone agrees with PyTorch on "
                f"{100 * int8_agreement:.2f}%)"
            )
        rows.append((name, result, route_agreement, verdict))
        if attempt.passed:
            break
    emit(_parity_table(rows, reference, recipe.parity, evaluation))
    for note in notes:
        emit(note)

    # The last attempt is the one that passed; when none did, ship the most
    # accurate int8 graph for inspection, and serve fp32.
    best = len(attempts) - 1
    if not attempts[best].passed:
        best = max(range(len(attempts)), key=lambda j: attempts[j].scores["accuracy"])
    shutil.copy2(graphs[best], inputs.content / inputs.target)
    chosen = attempts[best].settings
    if attempts[best].passed:
        serve = {
            "graph": inputs.target,
            "precision": "int8",
            "reason": f"int8 ({chosen['variant']}) passed the parity gate of recipe {recipe.name}",
            **escalation_block(recipe),
        }
    else:
        why = "; ".join(f"{a.variant}: {', '.join(a.failures)}" for a in attempts)
        message = f"no int8 variant of recipe {recipe.name} passed the parity gate ({why})"
        if strict:
            raise ExportError(message + "; failing because --strict-parity is set")
        if inputs.target == INT8_GRAPH:
            log.warning("%s; SERVING THE FP32 GRAPH INSTEAD", message)
            emit(f"WARNING: {message}. The fp32 graph {FP32_GRAPH} will be served.")
        serve = {"graph": FP32_GRAPH, "precision": "fp32", "reason": message}
    parity = {
        "checked": True,
        "texts": len(evaluation.texts),
        "thresholds": asdict(recipe.parity),
        "pytorch_fp32": _scores_dict(reference, evaluation.labels),
        "onnx_fp32": {**_scores_dict(fp32, evaluation.labels), "agreement": fp32_agreement},
        "method": (
            "non-inferiority: one-sided upper bounds of the accuracy drop (exact, on the "
            "changed tickets) and of the macro-F1 drop (paired bootstrap, 1000 resamples) "
            "within the limits; per label, exact McNemar on the changed tickets, "
            "Holm-corrected across the labels with changed tickets"
        ),
        "attempts": [asdict(a) | {"passed": a.passed} for a in attempts],
        "passed": attempts[best].passed,
    }
    return parity, serve, chosen


def _scores_dict(scores: Scores, labels) -> dict:
    return {
        "accuracy": scores.accuracy,
        "macro_f1": scores.f1_macro,
        "recall": {str(labels[c]): float(scores.recall[c]) for c in np.flatnonzero(scores.support)},
    }


def _bounds(result: Comparison, labels) -> dict:
    return {
        "accuracy_drop_bound": result.accuracy_drop_bound,
        "macro_f1_drop_bound": result.f1_drop_bound,
        "changed": {"worse": result.worse, "better": result.better},
        "harmed_labels": [labels[t.class_id] for t in result.harmed],
        "undecidable_labels": [labels[t.class_id] for t in result.undecidable],
    }


def _parity_table(rows, reference: Scores, limits: Thresholds, evaluation: EvalSet) -> str:
    level = f"{100 * (1 - limits.alpha):.0f}%"
    lines = [
        f"parity on {len(evaluation.texts)} test tickets (gate: the {level} upper bounds of the "
        f"accuracy and macro-F1 drops within {limits.max_accuracy_drop} / "
        f"{limits.max_macro_f1_drop} points; no label significantly worse, exact McNemar on "
        f"changed tickets, Holm-corrected, alpha {limits.alpha})",
        f"{'model':<40}{'accuracy':>9}{'macro F1':>9}{'drop <=':>8}{'F1 <=':>7}"
        f"{'worst label (lost+gained, Holm p)':>38}{'agree':>8}{'routes':>8}",
    ]
    for name, result, routes, verdict in rows:
        scores = reference if result is None else result.candidate
        line = f"{name:<40}{scores.accuracy:>9.4f}{scores.f1_macro:>9.4f}"
        if result is None:
            line += f"{'-':>8}{'-':>7}{'-':>38}{'-':>8}{'-':>8}"
        else:
            route = "-" if routes is None else f"{routes:.4f}"
            line += (
                f"{result.accuracy_drop_bound:>8.2f}{result.f1_drop_bound:>7.2f}"
                f"{worst_label(result, evaluation.labels):>38}{result.agreement:>8.4f}{route:>8}"
            )
            undecidable = len(result.undecidable)
            if undecidable:
                verdict += f" ({undecidable} labels lost tickets too few to decide)"
        lines.append(line + (f"  {verdict}" if verdict != "-" else ""))
    return "\n".join(lines)
