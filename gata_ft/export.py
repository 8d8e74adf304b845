"""ONNX export with Optimum, dynamic int8 quantization from a recipe, and the parity gate."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from gata_ft.errors import ConfigError, GataError
from gata_ft.resources import resource_dir
from gata_ft.runtime import OnnxClassifier, softmax

log = logging.getLogger("gata_ft")
DEFAULT_RECIPE = "avx2"
FP32_GRAPH = "onnx/model.onnx"
INT8_GRAPH = "onnx/model_quantized.onnx"
GOLDEN = "golden.json"
GOLDEN_COUNT = 32
GOLDEN_TOLERANCE = 1e-3
# Files Optimum writes beside the graph that a loader of onnx/ needs.
_ONNX_SIDE_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
_QUANTIZABLE = {"MatMul", "Attention", "Gather", "EmbedLayerNormalization"}


class ExportError(GataError):
    """The ONNX export, quantization or parity gate failed."""


@dataclass(frozen=True)
class Variant:
    """One way to quantize: the recipe's base settings, or one of its fallbacks."""

    label: str
    preset: str
    per_channel: bool
    reduce_range: bool = False
    nodes_to_exclude: tuple[str, ...] = ()
    exclude_most_sensitive: int = 0


@dataclass(frozen=True)
class Thresholds:
    """The parity gate, in percentage points below fp32."""

    max_accuracy_drop: float = 1.0
    max_macro_f1_drop: float = 1.0
    max_class_recall_drop: float = 5.0
    min_class_support: int = 20


@dataclass(frozen=True)
class Recipe:
    """A named export recipe from export/<name>.json: how to quantize for one CPU family."""

    name: str
    description: str
    preset: str
    opset: int
    optimization_level: int
    fuse_attention: bool
    variants: tuple[Variant, ...]
    parity: Thresholds
    source: dict = field(repr=False, compare=False)

    @classmethod
    def load(cls, name_or_path: str | Path) -> Recipe:
        path = Path(name_or_path)
        if not path.suffix:
            path = resource_dir("export") / f"{name_or_path}.json"
        if not path.is_file():
            known = sorted(p.stem for p in resource_dir("export").glob("*.json"))
            raise ConfigError(
                f"recipe {str(name_or_path)!r}: expected one of {', '.join(known)} "
                "or a path to a recipe .json file, found no such recipe"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            base = {"preset": data["preset"], **data["quantization"]}
            variants = [Variant(label="base", **_variant_fields(base))]
            for fallback in data.get("fallbacks", []):  # each overrides the base settings
                overrides = _variant_fields({k: v for k, v in fallback.items() if k != "label"})
                variants.append(replace(variants[0], label=fallback["label"], **overrides))
            recipe = cls(
                name=data["name"],
                description=data.get("description", ""),
                preset=data["preset"],
                opset=int(data["opset"]),
                optimization_level=int(data["optimization_level"]),
                fuse_attention=bool(data.get("fuse_attention", True)),
                variants=tuple(variants),
                parity=Thresholds(**data.get("parity", {})),
                source=data,
            )
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            raise ConfigError(f"recipe {path}: {type(e).__name__}: {e}") from e
        for variant in recipe.variants:
            if variant.preset not in ("avx2", "avx512", "avx512_vnni", "arm64"):
                raise ConfigError(
                    f"recipe {path}: preset expected avx2, avx512, avx512_vnni or arm64, "
                    f"found {variant.preset!r}"
                )
        return recipe


def _variant_fields(data: dict) -> dict:
    allowed = {
        "preset",
        "per_channel",
        "reduce_range",
        "nodes_to_exclude",
        "exclude_most_sensitive",
    }
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"unknown quantization settings {sorted(unknown)}")
    fields_ = dict(data)
    if "nodes_to_exclude" in fields_:
        fields_["nodes_to_exclude"] = tuple(fields_["nodes_to_exclude"])
    return fields_


@dataclass(frozen=True)
class EvalSet:
    """Texts and class ids to check parity on (the test split)."""

    texts: list[str]
    class_ids: list[int]
    labels: tuple[int, ...]  # original label of each class id


@dataclass(frozen=True)
class Scores:
    accuracy: float
    macro_f1: float
    recall: dict[int, float]  # class id -> recall
    support: dict[int, int]

    @classmethod
    def of(cls, predictions: np.ndarray, truth: np.ndarray, num_classes: int) -> Scores:
        from sklearn.metrics import f1_score

        recall, support = {}, {}
        for c in range(num_classes):
            mask = truth == c
            support[c] = int(mask.sum())
            if support[c]:
                recall[c] = float((predictions[mask] == c).mean())
        macro_f1 = float(f1_score(truth, predictions, average="macro", zero_division=0))
        return cls(float((predictions == truth).mean()), macro_f1, recall, support)


def gate_failures(reference: Scores, candidate: Scores, limits: Thresholds, labels) -> list[str]:
    """Why `candidate` fails the parity gate against `reference` (empty: it passes)."""
    failures = []
    slack = 1e-9  # 2 of 40 tickets is 5 points, not 5.000000000000004
    drop = 100 * (reference.accuracy - candidate.accuracy)
    if drop > limits.max_accuracy_drop + slack:
        failures.append(f"accuracy {drop:.2f} points below fp32 (limit {limits.max_accuracy_drop})")
    drop = 100 * (reference.macro_f1 - candidate.macro_f1)
    if drop > limits.max_macro_f1_drop + slack:
        failures.append(f"macro F1 {drop:.2f} points below fp32 (limit {limits.max_macro_f1_drop})")
    for c, recall in reference.recall.items():
        if reference.support[c] < limits.min_class_support:
            continue
        drop = 100 * (recall - candidate.recall.get(c, 0.0))
        if drop > limits.max_class_recall_drop + slack:
            failures.append(
                f"recall of label {labels[c]} {drop:.2f} points below fp32 "
                f"(limit {limits.max_class_recall_drop})"
            )
    return failures


def worst_recall_drop(reference: Scores, candidate: Scores, limits: Thresholds, labels):
    """(points, label) of the largest per-class recall drop among gated classes."""
    drops = [
        (100 * (recall - candidate.recall.get(c, 0.0)), labels[c])
        for c, recall in reference.recall.items()
        if reference.support[c] >= limits.min_class_support
    ]
    return max(drops, default=(0.0, None))


def export_fp32(checkpoint: Path, onnx_dir: Path, opset: int) -> Path:
    """Optimum's exporter: dynamic batch and sequence axes, validated against PyTorch."""
    from optimum.exporters.onnx import main_export

    try:
        with warnings.catch_warnings():
            # The TorchScript exporter warns about tracing constants and its own
            # deprecation on every BERT; Optimum's validation is the real check.
            warnings.simplefilter("ignore")
            main_export(
                str(checkpoint),
                output=onnx_dir,
                task="text-classification",
                opset=opset,
                device="cpu",
                do_validation=True,
                library_name="transformers",
                local_files_only=True,
            )
    except Exception as e:  # Optimum raises ValueError/AtolError/OSError subclasses
        raise ExportError(f"ONNX export of {checkpoint} failed: {type(e).__name__}: {e}") from e
    return onnx_dir / "model.onnx"


def optimize(onnx_dir: Path, level: int, work: Path, fuse_attention: bool = True) -> Path:
    """ORT transformer fusions (attention, skip layer norm, bias GELU) before quantization.

    With `fuse_attention`, onnxruntime runs int8 attention (QAttention): faster,
    but its packed Q/K/V weights share one scale, which costs accuracy.
    """
    if level == 0:
        return onnx_dir / "model.onnx"
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import OptimizationConfig

    optimizer = ORTOptimizer.from_pretrained(onnx_dir, file_names=["model.onnx"])
    config = OptimizationConfig(
        optimization_level=level,
        optimize_for_gpu=False,
        disable_attention_fusion=not fuse_attention,
    )
    optimizer.optimize(config, save_dir=work, file_suffix="optimized")
    # The quantizer needs every tensor's type; ONNX's own shape inference stops at
    # onnxruntime's fused operators, symbolic shape inference knows them.
    fused = onnx.load(str(work / "model_optimized.onnx"))
    try:
        # On failure it saves a debug model into the working directory: keep that in work/.
        with contextlib.chdir(work):
            typed = SymbolicShapeInference.infer_shapes(
                fused, auto_merge=True, guess_output_rank=True
            )
    except Exception as e:  # onnxruntime raises a bare Exception here
        log.warning("fused graph cannot be typed (%s): quantizing the unfused graph", e)
        return onnx_dir / "model.onnx"
    onnx.save(typed, str(work / "model_typed.onnx"))
    return work / "model_typed.onnx"


def quantize(graph: Path, variant: Variant, excluded: list[str], out: Path) -> Path:
    """Dynamic int8 quantization of `graph` with the recipe's AutoQuantizationConfig preset."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    kwargs = {"is_static": False, "per_channel": variant.per_channel, "nodes_to_exclude": excluded}
    if variant.preset in ("avx2", "avx512"):  # the other presets fix the weight range
        kwargs["reduce_range"] = variant.reduce_range
    config = getattr(AutoQuantizationConfig, variant.preset)(**kwargs)
    quantizer = ORTQuantizer.from_pretrained(graph.parent, file_name=graph.name)
    out.mkdir(parents=True, exist_ok=True)
    quantizer.quantize(config, save_dir=out, file_suffix="quantized")
    return out / f"{graph.stem}_quantized.onnx"


def node_names(graph: Path, patterns: Sequence[str]) -> list[str]:
    """Names of the quantizable nodes whose names match any of the regex patterns."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    return [
        node.name
        for node in model.graph.node
        if node.op_type in _QUANTIZABLE and any(re.search(p, node.name) for p in patterns)
    ]


def most_sensitive_nodes(
    fp32: Path, int8: Path, feed: dict, k: int, skip: Sequence[str] = ()
) -> list[str]:
    """The k quantized nodes that add the most error: output error minus input error.

    Both graphs run on the same batch with every quantizable node's input and
    output exposed; a node's own damage is how much its relative error grows.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(fp32))
    nodes = [
        n
        for n in model.graph.node
        if n.op_type in _QUANTIZABLE and n.op_type != "Gather" and n.name not in skip
    ]
    tensors = sorted({t for n in nodes for t in (n.input[0], n.output[0])})

    def run(path: Path) -> dict[str, np.ndarray]:
        graph = onnx.load(str(path))
        produced = {o for n in graph.graph.node for o in n.output}
        names = [t for t in tensors if t in produced]
        existing = {o.name for o in graph.graph.output}
        for name in names:
            if name not in existing:
                graph.graph.output.append(onnx.ValueInfoProto(name=name))
        session = ort.InferenceSession(
            graph.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        outputs = session.run(names, feed)
        return dict(zip(names, outputs, strict=True))

    reference, quantized = run(fp32), run(int8)

    def error(name: str) -> float:
        if name not in reference or name not in quantized:
            return 0.0
        a, b = reference[name].astype(np.float64), quantized[name].astype(np.float64)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))

    damage = sorted(((error(n.output[0]) - error(n.input[0]), n.name) for n in nodes), reverse=True)
    return [name for _, name in damage[:k]]


def torch_logits(checkpoint: Path, texts: Sequence[str], max_length: int, batch_size: int = 64):
    """PyTorch fp32 scores in the order given (batches sorted by length for speed)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    result = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in index],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            result[index] = model(**batch).logits.float().numpy()
    return result


def onnx_logits(
    graph: Path, tokenizer_file: Path, texts, max_length: int, batch_size: int = 64
) -> np.ndarray:
    """ONNX scores in the order given.

    int8 graphs are quantized dynamically: each batch's activation range, padding
    included, sets the scales, so a ticket's int8 scores depend on its batch-mates.
    The gate scores int8 one ticket at a time, as the router serves them.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    classifier = OnnxClassifier(graph, tokenizer_file, max_length)
    logits = classifier.logits([texts[i] for i in order], batch_size=batch_size)
    result = np.empty_like(logits)
    result[order] = logits
    return result


@dataclass
class Attempt:
    variant: str
    settings: dict
    excluded_nodes: list[str]
    scores: dict
    agreement: float
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures


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
    onnx_dir = content / "onnx"
    tokenizer_file = content / "tokenizer.json"
    with tempfile.TemporaryDirectory(prefix="gata-ft-onnx-") as scratch:
        work = Path(scratch)
        exported = export_fp32(content, work / "fp32", recipe.opset)
        onnx_dir.mkdir()
        shutil.copy2(exported, onnx_dir / "model.onnx")
        for name in _ONNX_SIDE_FILES:
            if (work / "fp32" / name).is_file():
                shutil.copy2(work / "fp32" / name, onnx_dir / name)
        source = optimize(
            work / "fp32", recipe.optimization_level, work / "optimized", recipe.fuse_attention
        )
        emit(f"exported {FP32_GRAPH} (opset {recipe.opset}), validated against PyTorch by Optimum")

        if evaluation is None:
            variant = recipe.variants[0]
            excluded = node_names(source, variant.nodes_to_exclude)
            int8 = quantize(source, variant, excluded, work / "int8")
            shutil.copy2(int8, onnx_dir / "model_quantized.onnx")
            parity = {
                "checked": False,
                "reason": "no test data was given (gata-ft export --test DIR)",
            }
            serve = {"graph": INT8_GRAPH, "precision": "int8", "reason": "parity not checked"}
            chosen = _variant_record(variant, excluded)
            golden_texts = []
        else:
            parity, serve, chosen = _gate(
                content,
                source,
                onnx_dir,
                tokenizer_file,
                max_length,
                recipe,
                evaluation,
                strict,
                emit,
                work,
            )
            golden_texts = _golden_texts(evaluation)
        (onnx_dir / "recipe.json").write_text(json.dumps(recipe.source, indent=2) + "\n")

    golden = write_golden(content, golden_texts, tokenizer_file, max_length)
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


def _variant_record(variant: Variant, excluded: list[str]) -> dict:
    return {
        "variant": variant.label,
        "preset": variant.preset,
        "per_channel": variant.per_channel,
        "reduce_range": variant.reduce_range,
        "excluded_nodes": excluded,
    }


def _gate(
    content, source, onnx_dir, tokenizer_file, max_length, recipe, evaluation, strict, emit, work
):
    truth = np.asarray(evaluation.class_ids)
    n = len(evaluation.labels)
    reference_logits = torch_logits(content, evaluation.texts, max_length)
    reference_pred = reference_logits.argmax(-1)
    reference = Scores.of(reference_pred, truth, n)
    fp32_pred = onnx_logits(
        onnx_dir / "model.onnx", tokenizer_file, evaluation.texts, max_length
    ).argmax(-1)
    fp32 = Scores.of(fp32_pred, truth, n)
    fp32_agreement = float((fp32_pred == reference_pred).mean())
    if fp32_agreement < 0.999:
        raise ExportError(
            f"the fp32 ONNX graph agrees with PyTorch on only {100 * fp32_agreement:.2f}% of "
            "the test tickets (expected 99.9% or more): the export is broken"
        )
    rows = [("PyTorch fp32", reference, None, "-"), ("ONNX fp32", fp32, fp32_agreement, "-")]

    attempts: list[Attempt] = []
    graphs: list[Path] = []
    sample = OnnxClassifier(source, tokenizer_file, max_length).encode(_golden_texts(evaluation))
    for i, variant in enumerate(recipe.variants):
        excluded = node_names(source, variant.nodes_to_exclude)
        if variant.exclude_most_sensitive:
            plain = replace(variant, exclude_most_sensitive=0)
            first = quantize(source, plain, excluded, work / f"probe{i}")
            excluded += most_sensitive_nodes(
                source, first, sample, variant.exclude_most_sensitive, skip=excluded
            )
        graphs.append(quantize(source, variant, excluded, work / f"int8-{i}"))
        logits = onnx_logits(graphs[-1], tokenizer_file, evaluation.texts, max_length, 1)
        pred = logits.argmax(-1)
        scores = Scores.of(pred, truth, n)
        failures = gate_failures(reference, scores, recipe.parity, evaluation.labels)
        attempt = Attempt(
            variant.label,
            _variant_record(variant, excluded),
            excluded,
            _scores_dict(scores, evaluation.labels),
            float((pred == reference_pred).mean()),
            failures,
        )
        attempts.append(attempt)
        verdict = "passes" if attempt.passed else "fails: " + "; ".join(failures)
        rows.append((f"ONNX int8 ({variant.label})", scores, attempt.agreement, verdict))
        if attempt.passed:
            break
    emit(_parity_table(rows, reference, recipe.parity, evaluation))

    # The last attempt is the one that passed; when none did, ship the most
    # accurate int8 graph for inspection, and serve fp32.
    best = len(attempts) - 1
    if not attempts[best].passed:
        best = max(range(len(attempts)), key=lambda j: attempts[j].scores["accuracy"])
    shutil.copy2(graphs[best], onnx_dir / "model_quantized.onnx")
    chosen = attempts[best].settings
    if attempts[best].passed:
        serve = {
            "graph": INT8_GRAPH,
            "precision": "int8",
            "reason": f"int8 ({chosen['variant']}) passed the parity gate of recipe {recipe.name}",
        }
    else:
        why = "; ".join(f"{a.variant}: {', '.join(a.failures)}" for a in attempts)
        message = f"no int8 variant of recipe {recipe.name} passed the parity gate ({why})"
        if strict:
            raise ExportError(message + "; failing because --strict-parity is set")
        log.warning("%s; SERVING THE FP32 GRAPH INSTEAD", message)
        emit(f"WARNING: {message}. The fp32 graph {FP32_GRAPH} will be served.")
        serve = {"graph": FP32_GRAPH, "precision": "fp32", "reason": message}
    parity = {
        "checked": True,
        "texts": len(evaluation.texts),
        "thresholds": asdict(recipe.parity),
        "pytorch_fp32": _scores_dict(reference, evaluation.labels),
        "onnx_fp32": {**_scores_dict(fp32, evaluation.labels), "agreement": fp32_agreement},
        "attempts": [asdict(a) | {"passed": a.passed} for a in attempts],
        "passed": attempts[best].passed,
    }
    return parity, serve, chosen


def _scores_dict(scores: Scores, labels) -> dict:
    return {
        "accuracy": scores.accuracy,
        "macro_f1": scores.macro_f1,
        "recall": {str(labels[c]): r for c, r in scores.recall.items()},
    }


def _parity_table(rows, reference: Scores, limits: Thresholds, evaluation: EvalSet) -> str:
    lines = [
        f"parity on {len(evaluation.texts)} test tickets "
        f"(gate: accuracy and macro F1 at most {limits.max_accuracy_drop} / "
        f"{limits.max_macro_f1_drop} points below PyTorch fp32, no label's recall more than "
        f"{limits.max_class_recall_drop} points below, labels with {limits.min_class_support}+ "
        "test tickets)",
        f"{'model':<44}{'accuracy':>9}{'macro F1':>9}{'worst recall drop':>26}{'agreement':>10}",
    ]
    for name, scores, agreement, verdict in rows:
        drop, label = worst_recall_drop(reference, scores, limits, evaluation.labels)
        worst = f"{drop:.1f} ({label})" if label is not None and scores is not reference else "-"
        agree = f"{agreement:.4f}" if agreement is not None else "-"
        line = f"{name:<44}{scores.accuracy:>9.4f}{scores.macro_f1:>9.4f}{worst:>26}{agree:>10}"
        lines.append(line + (f"  {verdict}" if verdict != "-" else ""))
    return "\n".join(lines)


def _golden_texts(evaluation: EvalSet) -> list[str]:
    """Up to GOLDEN_COUNT distinct test texts, spread over the set."""
    texts = list(dict.fromkeys(evaluation.texts))
    step = max(len(texts) // GOLDEN_COUNT, 1)
    return texts[::step][:GOLDEN_COUNT]


def write_golden(
    content: Path, texts: list[str], tokenizer_file: Path, max_length: int
) -> str | None:
    """golden.json: texts and each graph's probabilities, one text per call (batch 1).

    A loader replays them one at a time: int8 scores depend on the batch.
    """
    if not texts:
        return None
    probabilities = {}
    for graph in (FP32_GRAPH, INT8_GRAPH):
        model = OnnxClassifier(content / graph, tokenizer_file, max_length)
        logits = np.concatenate([model.logits([text]) for text in texts])
        probabilities[graph] = np.round(softmax(logits), 6).tolist()
    golden = {
        "texts": texts,
        "batch_size": 1,
        "tolerance": GOLDEN_TOLERANCE,
        "probabilities": probabilities,
    }
    (content / GOLDEN).write_text(json.dumps(golden) + "\n", encoding="utf-8")
    return GOLDEN
