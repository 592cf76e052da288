"""File hashes for ``model_id``: the full sha256 of shipped files, and a cheap hash of big
user files (name, size, first and last MiB). Both cached per (path, size, mtime)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable
from pathlib import Path

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
