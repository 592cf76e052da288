"""Event identity: what makes two sightings of an image the same event."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from urllib.parse import quote, unquote, urlparse


def event_id_for(uri: str, version: str) -> str:
    """Deterministic id from the source URI and the version of its content: the same
    file seen twice is one event; identical bytes at two paths are two events; a file
    overwritten with new content (new mtime/ETag) is a new event."""
    return hashlib.sha256(f"{uri}\n{version}".encode()).hexdigest()[:32]


def file_uri(path: Path) -> str:
    return "file://" + quote(str(path.resolve()))


def path_from_uri(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise ValueError(f"not a file URI: {uri!r}")
    return Path(unquote(parsed.path))


def local_image_event(path: Path, st: os.stat_result, *, source: str, run_id: str, priority: str = "NORMAL",
                      force: bool = False) -> dict:
    uri = file_uri(path)
    version = str(st.st_mtime_ns)
    return {
        "event_id": event_id_for(uri, version),
        "uri": uri,
        "image_path": str(path.resolve()),
        "size": st.st_size,
        "version": version,
        "source": source,
        "priority": priority,
        "run_id": run_id,
        "published_at": int(time.time() * 1000),
        "force": force,
    }
