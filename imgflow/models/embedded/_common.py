"""Helpers shared by the embedded adapters: file hashes for ``model_id``, device choice,
and locating files inside installed packages without importing them."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from imgflow.models.base import ModelConfigError

_hash_lock = threading.Lock()
_hashes: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex of a file, computed once per process per (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    with _hash_lock:
        cached = _hashes.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _hash_lock:
        _hashes[key] = digest
    return digest


def remember_sha256(path: str | os.PathLike, digest: str) -> None:
    """Record a hash already computed elsewhere (e.g. while writing the file)."""
    p = Path(path).resolve()
    st = p.stat()
    with _hash_lock:
        _hashes[(str(p), st.st_size, st.st_mtime_ns)] = digest


def short_hash(paths: Iterable[str | os.PathLike]) -> str:
    """First 12 hex of the sha256 of one file, or of the joined hashes of several."""
    paths = list(paths)
    if len(paths) == 1:
        return file_sha256(paths[0])[:12]
    joined = "".join(file_sha256(p) for p in paths)
    return hashlib.sha256(joined.encode()).hexdigest()[:12]


def package_dir(package: str) -> Path | None:
    """Folder of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def require_files(job: str, setting: str, paths: Iterable[Path]) -> None:
    """ModelConfigError naming the setting when a model file is missing."""
    for p in paths:
        if not Path(p).exists():
            raise ModelConfigError(
                f"{job}: model file {p} is missing (setting models.{setting} / "
                f"IMGFLOW_MODELS__{setting.upper()}); reinstall the package that ships it"
            )


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a CUDA device is usable, else 'cpu'."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")
