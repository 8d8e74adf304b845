"""Export recipes: how to quantize for one CPU family, from export/<name>.json, checked as data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from gata_ft.errors import ConfigError
from gata_ft.resources import resource_dir

DEFAULT_RECIPE = "avx2"
PRESETS = ("avx2", "avx512", "avx512_vnni", "arm64")


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
    """The parity gate: drops in percentage points below fp32, as upper confidence bounds."""

    max_accuracy_drop: float = 1.0
    max_macro_f1_drop: float = 1.0
    alpha: float = 0.05  # per-label tests (Holm) and one-sided bounds at 1 - alpha
    min_route_agreement: float = 0.97  # share of tickets routed (or not) as by PyTorch fp32


# name -> (type, what is expected, required); the one description of a recipe file.
_TOP = {
    "name": (str, "a name", True),
    "description": (str, "a text", False),
    "preset": (str, f"one of {', '.join(PRESETS)}", True),
    "opset": (int, "an ONNX opset from 14 to 21", True),
    "optimization_level": (int, "0, 1 or 2", True),
    "fuse_attention": (bool, "true or false", False),
    "quantization": (dict, "an object of quantization settings", True),
    "fallbacks": (list, "a list of objects, each with a label", False),
    "parity": (dict, "an object of parity thresholds", False),
    "companion": (str, "the name of a recipe for CPUs with VNNI, shipped beside", False),
    "escalate_below": (float, "a probability from 0 to 1", False),
}
_QUANTIZATION = {
    "preset": (str, f"one of {', '.join(PRESETS)}", False),
    "per_channel": (bool, "true or false", False),
    "reduce_range": (bool, "true or false", False),
    "nodes_to_exclude": (list, "a list of node-name patterns", False),
    "exclude_most_sensitive": (int, "a number of nodes, 0 or more", False),
}
_PARITY = {
    "max_accuracy_drop": (float, "a number of percentage points", False),
    "max_macro_f1_drop": (float, "a number of percentage points", False),
    "alpha": (float, "a significance level from 0.001 to 0.2", False),
    "min_route_agreement": (float, "a share of test tickets, from 0 to 1", False),
}
_RANGES = {
    "opset": (14, 21),
    "optimization_level": (0, 2),
    "exclude_most_sensitive": (0, 10_000),
    "alpha": (0.001, 0.2),
    "min_route_agreement": (0, 1),
    "escalate_below": (0, 1),
}


def _check(data: object, spec: dict, where: str, kind: str) -> dict:
    """Fields of one recipe object, typed as `spec` says; ConfigError says expected and found."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object, found {_found(data)}")
    unknown = sorted(set(data) - set(spec))
    if unknown:
        raise ConfigError(f"{where}: unknown {kind} {unknown} (expected only {', '.join(spec)})")
    missing = [name for name, (_, _, required) in spec.items() if required and name not in data]
    if missing:
        name = missing[0]
        raise ConfigError(f"{where}: {name}: expected {spec[name][1]}, found no such field")
    for name, value in data.items():
        expected_type, expected, _ = spec[name]
        ok = isinstance(value, expected_type) and (expected_type is bool) == isinstance(value, bool)
        if expected_type is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and name == "preset":
            ok = value in PRESETS
        if ok and name in _RANGES:
            low, high = _RANGES[name]
            ok = low <= value <= high
        if ok and name == "nodes_to_exclude":
            ok = all(isinstance(p, str) for p in value)
        if not ok:
            raise ConfigError(f"{where}: {name}: expected {expected}, found {_found(value)}")
    return data


def _found(value: object) -> str:
    return json.dumps(value)[:60] if value is not None else "null"


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
    companion: str | None = None  # a second recipe, gated on its own, for VNNI CPUs
    # tickets whose int8 top probability is below this are scored again by the fp32 graph
    escalate_below: float | None = None

    @classmethod
    def load(cls, name_or_path: str | Path) -> Recipe:
        path = Path(name_or_path)
        if not path.suffix:
            path = resource_dir("export") / f"{name_or_path}.json"
        if not path.is_file():
            raise ConfigError(
                f"recipe {str(name_or_path)!r}: expected one of {', '.join(known_recipes())} "
                "or a path to a recipe .json file, found no such recipe"
            )
        where = f"recipe {path}"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{where}: expected a JSON object, found invalid JSON: {e}") from e
        _check(data, _TOP, where, "fields")
        spec = {**_QUANTIZATION, "per_channel": (bool, "true or false", True)}
        base = _check(data["quantization"], spec, f"{where}: quantization", "quantization settings")
        variants = [Variant(label="base", **_variant_fields({"preset": data["preset"], **base}))]
        for i, fallback in enumerate(data.get("fallbacks", [])):  # each overrides the base
            spec = {"label": (str, "a label", True), **_QUANTIZATION}
            _check(fallback, spec, f"{where}: fallbacks[{i}]", "quantization settings")
            overrides = _variant_fields({k: v for k, v in fallback.items() if k != "label"})
            variants.append(replace(variants[0], label=fallback["label"], **overrides))
        parity = _check(data.get("parity", {}), _PARITY, f"{where}: parity", "parity thresholds")
        companion = data.get("companion")
        if companion is not None and companion not in known_recipes():
            raise ConfigError(
                f"{where}: companion: expected one of {', '.join(known_recipes())}, "
                f"found {companion!r}"
            )
        return cls(
            name=data["name"],
            description=data.get("description", ""),
            preset=data["preset"],
            opset=data["opset"],
            optimization_level=data["optimization_level"],
            fuse_attention=data.get("fuse_attention", True),
            variants=tuple(variants),
            parity=Thresholds(**parity),
            source=data,
            companion=data.get("companion"),
            escalate_below=data.get("escalate_below"),
        )


def _variant_fields(data: dict) -> dict:
    fields_ = dict(data)
    if "nodes_to_exclude" in fields_:
        fields_["nodes_to_exclude"] = tuple(fields_["nodes_to_exclude"])
    return fields_


def known_recipes() -> list[str]:
    return sorted(p.stem for p in resource_dir("export").glob("*.json"))
