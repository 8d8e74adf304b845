"""Locate the project's data folders (schemas/, export/) in a checkout or an installed wheel."""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """Return the folder `name` ("schemas" or "export"), wherever this install keeps it."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"gata-ft is installed without its {name}/ folder (looked in {_PACKAGE})"
    )


def schema_path(name: str) -> Path:
    return resource_dir("schemas") / name
