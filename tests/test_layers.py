"""The import graph of gata_ft/: no cycle, and no module imports one in its own layer or above.

The layers are the architecture (README, Development): errors and text at the
bottom, the artifact contract and the torch-free runtime low, the job's stages
above them, the orchestrator and the CLI on top. A new module must be placed.
"""

import ast
from pathlib import Path

from conftest import REPO

LAYERS = [
    {
        "gata_ft",
        "gata_ft.errors",
        "gata_ft.text",
        "gata_ft.resources",
        "gata_ft.files",
        "gata_ft.card",
    },
    {
        "gata_ft.sagemaker",
        "gata_ft.failure",
        "gata_ft.metrics",
        "gata_ft.archive",
        "gata_ft.inference",
        "gata_ft.checkpoints",
        "gata_ft.modeling",
        "gata_ft.examples",
        "gata_ft.export",
        "gata_ft.export.recipe",
    },
    {"gata_ft.artifact", "gata_ft.config", "gata_ft.data", "gata_ft.scope", "gata_ft.paired"},
    {
        "gata_ft.runtime",
        "gata_ft.reports",
        "gata_ft.launch",
        "gata_ft.upgrade",
        "gata_ft.calibration",
        "gata_ft.export.onnx",
        "gata_ft.export.reference",
        "gata_ft.export.golden",
        "gata_ft.metric_modules.routing_metrics.routing_metrics",
    },
    {
        "gata_ft.callbacks",
        "gata_ft.export.parity",
        "gata_ft.server",
        "gata_ft.preflight",
        "gata_ft.evaluation",
        "gata_ft.promotion",
    },
    {"gata_ft.train", "gata_ft.export.graphs"},
    {"gata_ft.pipeline", "gata_ft.commands"},
    {"gata_ft.cli"},
    {"gata_ft.__main__"},
]


def module_files() -> dict[str, Path]:
    files = {}
    for path in (REPO / "gata_ft").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return files


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """gata_ft modules that `name` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            candidates = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            # `from gata_ft import train` names a module; `import gata_ft.x.y` its packages too
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name and not name.startswith(candidate + "."):
                found.add(candidate)
    return found


def test_every_module_has_a_layer():
    placed = set().union(*LAYERS)
    assert set(module_files()) == placed


def test_imports_only_point_down():
    files = module_files()
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    upward = []
    for name, path in files.items():
        for target in imports(name, path, set(files)):
            if target != "gata_ft" and layer[target] >= layer[name]:
                upward.append(f"{name} (layer {layer[name]}) imports {target} ({layer[target]})")
    assert upward == []
