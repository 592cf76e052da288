"""Where an output's objects live: a local folder or an ``s3://BUCKET/PREFIX/``, behind one
small interface (whole objects put, got and listed by key), and the retry of S3 errors."""

from __future__ import annotations

import builtins
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from imgflow.output.layout import AVRO, CSV_PARTS, INDEX
from imgflow.s3 import S3Error, explain, is_s3_uri, parse_s3_uri, s3_client, s3_uri
from imgflow.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")


class Storage(ABC):
    """Objects by key. ``put`` writes a whole object (a retried one overwrites the same key)."""

    is_s3: bool

    @abstractmethod
    def check(self) -> None:
        """Fail clearly (S3Error) if the output cannot be written."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The object, or None where there is none."""

    @abstractmethod
    def list(self, prefix: str, start_after: str = "") -> Iterator[str]:
        """Keys under a folder-like ``prefix`` (one level), in name order, after ``start_after``."""

    @abstractmethod
    def subfolders(self, prefix: str) -> builtins.list[str]: ...

    @abstractmethod
    def remove_temp_files(self) -> int:
        """Remove the half-written objects of a crashed writer; returns how many."""


class LocalStorage(Storage):
    """An output folder. ``put`` is atomic and durable (temp file, fsync, rename, fsync dir)."""

    is_s3 = False

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, data: bytes) -> None:
        final = self.root / key
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(final.name + ".tmp")
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def get(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def list(self, prefix: str, start_after: str = "") -> Iterator[str]:
        folder = self.root / prefix
        try:
            names = sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.endswith(".tmp"))
        except FileNotFoundError:
            return
        for name in names:
            key = prefix + name
            if key > start_after:
                yield key

    def subfolders(self, prefix: str) -> builtins.list[str]:
        try:
            return sorted(e.name for e in os.scandir(self.root / prefix) if e.is_dir())
        except FileNotFoundError:
            return []

    def remove_temp_files(self) -> int:
        """Half-written objects of a crashed writer (never renamed: their rows are redelivered)."""
        count = 0
        for kind in (AVRO, CSV_PARTS, INDEX):
            for tmp in (self.root / kind).rglob("*.tmp"):
                tmp.unlink()
                count += 1
        return count


class S3Storage(Storage):
    """An ``s3://BUCKET/PREFIX/``. Errors are ``S3Error`` (naming the setting, never a secret)."""

    is_s3 = True

    def __init__(self, uri: str, settings: Settings) -> None:
        loc = parse_s3_uri(uri)
        self.bucket = loc.bucket
        self.prefix = loc.key if not loc.key or loc.key.endswith("/") else loc.key + "/"
        self.uri = s3_uri(self.bucket, self.prefix)
        self.client = s3_client(settings)

    def __str__(self) -> str:
        return self.uri

    def _fail(self, exc: BaseException, key: str = "") -> S3Error:
        err = explain(exc, s3_uri(self.bucket, self.prefix + key))
        if err.code == "NoSuchBucket" or (err.code == "NoSuchKey" and not key):
            return S3Error(
                f"{self.uri}: the bucket {self.bucket!r} does not exist: create it, or fix the output (--out / sink.out_dir, IMGFLOW_SINK__OUT_DIR)",
                code="NoSuchBucket",
            )
        return err

    def check(self) -> None:
        """One cheap request that fails clearly on a missing bucket, bad credentials or endpoint."""
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an S3Error
            raise self._fail(exc) from None

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, key) from None

    def get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()
        except Exception as exc:  # noqa: BLE001
            err = self._fail(exc, key)
            if err.code == "NoSuchKey":
                return None
            raise err from None

    def list(self, prefix: str, start_after: str = "") -> Iterator[str]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
        if start_after:
            kwargs["StartAfter"] = self.prefix + start_after
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
                for obj in page.get("Contents", []):
                    yield obj["Key"][len(self.prefix) :]
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, prefix) from None

    def subfolders(self, prefix: str) -> builtins.list[str]:
        names: builtins.list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix, Delimiter="/"):
                names += [p["Prefix"][len(self.prefix + prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, prefix) from None
        return sorted(names)

    def remove_temp_files(self) -> int:
        return 0  # a PUT is atomic: an interrupted one leaves nothing


def is_s3_output(out: str | Path | None) -> bool:
    """Whether an output location (``--out``, ``sink.out_dir``) is an ``s3://`` prefix."""
    return is_s3_uri(out if isinstance(out, str) else str(out) if out is not None else "")


def open_storage(out: str | Path, settings: Settings) -> Storage:
    return S3Storage(str(out), settings) if is_s3_output(out) else LocalStorage(Path(out))


def fetch_all(storage: Storage, keys: list[str], threads: int = 10) -> Iterator[tuple[str, bytes | None]]:
    """(key, bytes) in order; S3 GETs run in parallel (latency, not bandwidth, bounds them;
    10 threads: the size of boto3's connection pool)."""
    if not storage.is_s3:
        for key in keys:
            yield key, storage.get(key)
        return
    with ThreadPoolExecutor(threads) as pool:
        for i in range(0, len(keys), 100):  # a bounded number of objects in memory at once
            chunk = keys[i : i + 100]
            yield from zip(chunk, pool.map(storage.get, chunk))


def retry_s3(
    what: str, action: Callable[[], T], stopping: Callable[[], bool] = lambda: False, max_backoff_s: float = 30.0, sleep: Callable[[float], object] = time.sleep
) -> T | None:
    """Run ``action()`` until it succeeds, retrying S3Errors with exponential back-off
    (also the configuration ones: a bucket can be created, credentials fixed, while we wait).
    Returns None if ``stopping()`` becomes true first."""
    delay = 0.5
    while True:
        try:
            return action()
        except S3Error as exc:
            if stopping():
                return None
            log.error("%s failed: %s; retrying in %.1fs", what, exc, delay)
            end = time.monotonic() + delay
            while time.monotonic() < end and not stopping():
                sleep(min(0.2, delay))
            if stopping():
                return None
            delay = min(max_backoff_s, delay * 2)
