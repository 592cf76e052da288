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


def dedupe_key(event_id: str, run_id: str) -> str:
    """What exactly-once counts: one result per (image event, run). Every dedupe (stages,
    sink) keys on this, so a replay or a forced backfill, which is a run of its own, is
    never dropped as "already handled" while redelivered records of one run still are."""
    return f"{event_id}@{run_id}"


def file_uri(path: Path) -> str:
    return "file://" + quote(str(path.resolve()))


def path_from_uri(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise ValueError(f"not a file URI: {uri!r}")
    return Path(unquote(parsed.path))


def image_event(uri: str, image_path: str, size: int, version: str, *, source: str, run_id: str, priority: str = "NORMAL", force: bool = False) -> dict:
    """An ImageEvent; its id from the URI and the content version (see event_id_for)."""
    return {
        "event_id": event_id_for(uri, version),
        "uri": uri,
        "image_path": image_path,
        "size": size,
        "version": version,
        "source": source,
        "priority": priority,
        "run_id": run_id,
        "published_at": int(time.time() * 1000),
        "force": force,
    }


def s3_image_event(bucket: str, key: str, etag: str, size: int, *, source: str, run_id: str, priority: str = "NORMAL", force: bool = False) -> dict:
    """The ImageEvent of one S3 object version. The content version is the ETag (quotes
    stripped), which every listing, HEAD and notification reports alike (a version id is not
    in a plain listing, so using it would make polling and notifications disagree): an
    overwritten object is a new image, the same object seen twice is one event."""
    from imgflow.s3 import s3_uri

    uri = s3_uri(bucket, key)
    # image_path: as the user would write it (the uri is percent-quoted)
    return image_event(uri, f"s3://{bucket}/{key}", int(size), etag.strip('"'), source=source, run_id=run_id, priority=priority, force=force)


UNSTATABLE = "unstatable"  # the version of a file that cannot be stat'ed (it still gets an error row)


def local_image_event(
    path: Path, st: os.stat_result | None, *, source: str, run_id: str, priority: str = "NORMAL", force: bool = False, canonical: bool = False
) -> dict:
    """``canonical``: the caller knows ``path`` is already absolute with no symlink in it
    (resolving costs several system calls per file: it shows in a bulk backfill)."""
    if st is None:  # dangling symlink, symlink loop, no permission: not resolvable, named as found
        where, version, size = Path(os.path.abspath(path)), UNSTATABLE, 0
    else:
        # Named as found in its folder: a file that is a symlink keeps its own name (its row
        # must say which of the user's files it was), only the folders above it are resolved.
        where = path if canonical else path.parent.resolve() / path.name
        version, size = str(st.st_mtime_ns), st.st_size
    return image_event("file://" + quote(str(where)), str(where), size, version, source=source, run_id=run_id, priority=priority, force=force)
