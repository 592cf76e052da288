"""Device choice and CUDA memory: the allocator setting, low-memory clearing and the OOM guard
around a forward pass. Never imports torch unless CUDA is already in use."""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a CUDA device is usable, else 'cpu'. The one place a device
    is chosen (``models.device``: auto, cpu, cuda)."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


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
def oom_guard(what: str) -> Iterator[None]:
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
