"""README.md at the artifact's root: a Hugging Face model card, written from metadata.json alone.

YAML front matter (model-index metrics, pipeline_tag, base model, license,
tags) in JSON-compatible flow style, so that any YAML reader parses it; then the
intended use, the label table, the data, routing, parity, promotion and limits.
"""

from __future__ import annotations

import json
from pathlib import Path

CARD = "README.md"


def _yaml(value) -> str:
    return json.dumps(value, ensure_ascii=False)  # JSON scalars and lists are YAML flow values


def _front_matter(metadata: dict) -> list[str]:
    base = (metadata.get("base_model") or {}).get("name")
    test = (metadata.get("metrics") or {}).get("test") or {}
    figures = [
        ("accuracy", "Accuracy", test.get("accuracy"), None),
        ("f1", "Macro F1", test.get("f1_macro"), {"average": "macro"}),
        ("f1", "Weighted F1", test.get("f1"), {"average": "weighted"}),
    ]
    tags = ["gata-ft", "ticket-routing", "onnx", "text-classification"]
    lines = [
        "---",
        "language: en",
        "license: other",
        "library_name: transformers",
        "pipeline_tag: text-classification",
        f"tags: {_yaml(tags)}",
    ]
    if base:
        lines.append(f"base_model: {_yaml(base)}")
    metrics = [
        {"type": kind, "name": name, "value": round(value, 6), **({"args": args} if args else {})}
        for kind, name, value, args in figures
        if value is not None
    ]
    if metrics:
        data = (metadata.get("data") or {}).get("test") or {}
        dataset = {"type": "custom", "name": "test channel", "revision": data.get("sha256", "")}
        lines += [
            "model-index:",
            "- name: " + _yaml("gata-ft ticket router"),
            "  results:",
            "  - task: " + _yaml({"type": "text-classification", "name": "Ticket routing"}),
            "    dataset: " + _yaml(dataset),
            "    metrics:",
            *(f"    - {_yaml(m)}" for m in metrics),
        ]
    return [*lines, "---"]


def serving(serve: dict) -> str:
    """What the runtime serves, in one line: the graph, why, its VNNI companion and escalation."""
    parts = [f"serving {serve.get('graph')}: {serve.get('reason')}"]
    vnni = serve.get("vnni") or {}
    if vnni:
        parts.append(f"on CPUs with VNNI {vnni.get('graph')}")
    rules = {block.get("graph"): _escalation(block) for block in (serve, vnni) if block}
    if len(set(rules.values())) == 1:  # one rule for every graph, as the recipes set it
        parts.append(next(iter(rules.values())))
    else:
        parts += [f"{graph}: {rule}" for graph, rule in rules.items() if rule]
    return "; ".join(part for part in parts if part)


def _escalation(block: dict) -> str:
    rule = block.get("escalate") or {}
    if not rule.get("below", 0) > 0:  # 0 or absent: none (as the runtime reads it)
        return ""
    return (
        f"tickets whose int8 top probability is below {rule['below']:g} are scored again "
        f"by {rule['graph']}"
    )


def render(metadata: dict) -> str:
    """The card's text."""
    lines = _front_matter(metadata)
    test = (metadata.get("metrics") or {}).get("test") or {}
    per_class = test.get("per_class") or {}
    lines += [
        "",
        "# Ticket router (gata-ft)",
        "",
        "## Intended use",
        "",
        "Routes support tickets (short English texts, normalised as in training: lower case, "
        "`a-z`, digits, `. ? !`) to the queues below. Serve `onnx/` with `gata_ft.runtime` "
        "(no PyTorch): a router acts on each prediction's `queue`, which is the predicted "
        "queue when `route` is true and the fallback queue otherwise. The checkpoint at the "
        "root loads with `AutoModelForSequenceClassification.from_pretrained`.",
        "",
        "## Labels",
        "",
        "| class | queue id | training rows | test rows | test F1 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for entry in metadata["labels"]:
        f1 = (per_class.get(str(entry["label"])) or {}).get("f1")
        lines.append(
            f"| {entry['class_id']} | {entry['label']} | {entry.get('train_count', '-')} | "
            f"{entry.get('test_count', '-')} | {'-' if f1 is None else f'{f1:.4f}'} |"
        )
    lines += ["", "## Data", ""]
    for name, block in (metadata.get("data") or {}).items():
        lines.append(f"- {name}: {block.get('rows')} rows, sha256 `{block.get('sha256')}`")
    if not metadata.get("data"):
        lines.append("- not recorded (exported from a checkpoint without training data)")
    lines += ["", "## Routing", ""]
    lines += _routing(metadata.get("calibration") or {})
    lines += ["", "## Parity of the int8 graph", ""]
    parity, serve = metadata.get("parity") or {}, metadata.get("serve") or {}
    lines.append(f"- {serving(serve)}")
    if parity.get("checked"):
        lines.append(f"- gate on {parity.get('texts')} test tickets: "
                     f"{'passed' if parity.get('passed') else 'failed'}")  # fmt: skip
    else:
        lines.append(f"- not checked: {parity.get('reason')}")
    promotion = metadata.get("promotion")
    if promotion:
        verdict = f"- verdict: **{promotion['verdict']}**: " + "; ".join(promotion["reasons"])
        lines += ["", "## Promotion", "", verdict]
    lines += [
        "",
        "## Limitations",
        "",
        "- Trained on the labelled tickets above; traffic that drifts from them (new queues, "
        "other label shares, tickets no queue owns) lowers accuracy; routing keeps its promise "
        "only under the assumption recorded under Routing.",
        "- Texts are cut at `max_length` tokens "
        f"({metadata.get('max_length')}); English, lower-case text only.",
        "- The test figures are from the test channel, which also picked the best checkpoint.",
        "",
        "## License",
        "",
        "The weights derive from the base model and the training data; their licences apply.",
        "",
    ]
    return "\n".join(lines)


def _routing(calibration: dict) -> list[str]:
    if not calibration.get("fitted"):
        return ["- not calibrated: no routing threshold"]
    test = calibration.get("routing_test") or {}
    scope = calibration.get("scope") or {}
    lines = [
        f"- target accuracy {calibration.get('target_accuracy')}; probability threshold "
        f"{calibration.get('threshold')}; out-of-scope distance threshold "
        f"{scope.get('distance_threshold')}; fallback queue {calibration.get('fallback_label')}",
        f"- fitted on the {calibration.get('source')} ({calibration.get('calibration_rows')} "
        f"rows); assumption: {json.dumps(calibration.get('assumption'))}",
    ]
    if test:
        lines.append(
            f"- test set: {test.get('coverage', 0) * 100:.1f}% routed at accuracy "
            f"{test.get('accuracy')} (95% interval {test.get('interval')}); meets target: "
            f"{calibration.get('meets_target')}"
        )
    return lines


def write(content: Path, metadata: dict) -> Path:
    path = content / CARD
    path.write_text(render(metadata), encoding="utf-8")
    return path
