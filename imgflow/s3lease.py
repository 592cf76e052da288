"""A lease on an S3 prefix: one object, created with a conditional PUT (``If-None-Match: *``),
renewed with ``If-Match`` on its ETag while its holder runs, deleted (``If-Match``) when it
stops. A second holder cannot create it while it exists, and every renewal or take-over is
conditional on the ETag last seen, so of two contenders exactly one wins. A holder that is
killed stops renewing: once ``ttl_s`` passes since the object was last written (the store's
clock on both ends: its Last-Modified and its Date header, so no two machines' clocks are
compared), anyone may take it over.

The sink holds one on its output prefix (``_sink.lease``): one sink per prefix, enforced.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from imgflow.errors import ImgflowError
from imgflow.s3 import S3Error, explain, s3_uri

log = logging.getLogger(__name__)


class LeaseHeld(ImgflowError, RuntimeError):
    """Someone else holds the lease (the message names the prefix and the holder)."""


class LeaseLost(LeaseHeld):
    """Our lease was taken over (we failed to renew it in time): stop writing."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    owner: str  # what the holder is, e.g. "sink of group imgflow-sink"
    token: str

    def describe(self) -> str:
        return f"{self.owner} (pid {self.pid} on {self.host})"

    def is_dead_here(self) -> bool:
        """On this host, and that process is gone, or is us (a restart that got the same pid,
        as in a container) while the lease is not ours: a crashed predecessor."""
        if self.host != socket.gethostname():
            return False
        if self.pid == os.getpid():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


class S3Lease:
    """``client``: a boto3 S3 client; the lease object is ``s3://bucket/key``."""

    def __init__(self, client, bucket: str, key: str, owner: str, ttl_s: float = 30.0) -> None:
        self.client, self.bucket, self.key = client, bucket, key
        self.uri = s3_uri(bucket, key)
        self.ttl_s = ttl_s
        self.me = Holder(socket.gethostname(), os.getpid(), owner, uuid.uuid4().hex)
        self.etag: str | None = None
        self._renewed = 0.0  # monotonic time of the last successful write
        self._lost: LeaseLost | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---- the object
    def _body(self) -> bytes:
        return json.dumps({"host": self.me.host, "pid": self.me.pid, "owner": self.me.owner, "token": self.me.token, "ttl_s": self.ttl_s}).encode()

    def _put(self, **condition) -> str:
        resp = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), ContentType="application/json", **condition)
        return resp["ETag"]

    def _read(self) -> tuple[Holder, str, float, float] | None:
        """(holder, etag, seconds since it was written, its ttl) by the store's clock; None
        if there is no lease."""
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key)
            data = json.loads(resp["Body"].read())
        except ValueError:  # not JSON: not ours to trust, treat it as expired garbage
            head = self.client.head_object(Bucket=self.bucket, Key=self.key)
            return Holder("?", 0, "unreadable lease", ""), head["ETag"], float("inf"), 0.0
        except Exception as exc:  # noqa: BLE001
            err = explain(exc, self.uri)
            if err.code == "NoSuchKey":
                return None
            raise err from None
        now = resp["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        server_now = email.utils.parsedate_to_datetime(now).timestamp() if now else time.time()
        age = max(0.0, server_now - resp["LastModified"].timestamp())
        holder = Holder(str(data.get("host", "?")), int(data.get("pid", 0)), str(data.get("owner", "?")), str(data.get("token", "")))
        return holder, resp["ETag"], age, float(data.get("ttl_s", self.ttl_s))

    @staticmethod
    def _precondition_failed(exc: BaseException) -> bool:
        response = getattr(exc, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        # 409 ConditionalRequestConflict: AWS's answer to two conditional writes at once
        return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (412, 409)

    # ---- acquire, renew, release
    def acquire(self, wait_for=lambda holder: False, stopping=lambda: False) -> None:
        """Take the lease. Held by someone else: LeaseHeld, or, where ``wait_for(holder)``,
        wait for that holder to release it or stop renewing it. S3 trouble: S3Error."""
        announced = None
        while True:
            try:
                self.etag = self._put(IfNoneMatch="*")
                break
            except Exception as exc:  # noqa: BLE001
                if not self._precondition_failed(exc):
                    raise explain(exc, self.uri) from None
            current = self._read()
            if current is None:
                continue  # released meanwhile: create it again
            holder, etag, age, ttl = current
            if age >= ttl or holder.is_dead_here():
                why = "its holder is gone" if age < ttl else f"not renewed for {age:.0f} s (ttl {ttl:.0f} s)"
                try:
                    self.etag = self._put(IfMatch=etag)
                except Exception as exc:  # noqa: BLE001
                    if self._precondition_failed(exc):
                        continue  # someone else was quicker: look again
                    raise explain(exc, self.uri) from None
                log.warning("took over the lease %s from %s: %s", self.uri, holder.describe(), why)
                break
            message = (
                f"{holder.describe()} holds the lease {self.uri}, renewed {age:.0f} s ago; if it is gone, the lease expires in {max(0.0, ttl - age):.0f} s"
            )
            if not wait_for(holder):
                raise LeaseHeld(message)
            if announced != holder.token:
                log.warning("waiting: %s", message)
                announced = holder.token
            if stopping():
                raise LeaseHeld(message)
            time.sleep(min(2.0, max(0.2, (ttl - age) / 4)))
        self._renewed = time.monotonic()
        self._lost = None
        log.info("holding the lease %s (renewed every %.0f s, expires %.0f s after a holder stops)", self.uri, self.ttl_s / 3, self.ttl_s)

    def renew(self) -> None:
        """Rewrite the lease if it is still ours (LeaseLost if it was taken over)."""
        with self._lock:
            if self._lost is not None:
                raise self._lost
            if self.etag is None:
                raise LeaseLost(f"the lease {self.uri} is not held")
            try:
                self.etag = self._put(IfMatch=self.etag)
            except Exception as exc:  # noqa: BLE001
                if not self._precondition_failed(exc):
                    raise explain(exc, self.uri) from None
                current = self._read()
                who = current[0].describe() if current else "nobody (it was deleted)"
                self._lost = LeaseLost(
                    f"the lease {self.uri} was taken over by {who}: it was not renewed within {self.ttl_s:.0f} s; stopping so that one sink writes the prefix"
                )
                raise self._lost from None
            self._renewed = time.monotonic()

    def ensure(self) -> None:
        """Before a write: the lease is ours and fresh. Renewed now when the last renewal is
        older than half the ttl (S3Error when the store is down: the write waits too)."""
        if self._lost is not None:
            raise self._lost
        if time.monotonic() - self._renewed > self.ttl_s / 2:
            self.renew()

    def start_renewing(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    self.renew()
                except LeaseLost as exc:
                    log.error("%s", exc)
                    return
                except S3Error as exc:
                    log.warning("cannot renew the lease %s yet: %s", self.uri, exc)

        self._stop.clear()
        self._thread = threading.Thread(target=loop, name="s3-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            if self.etag is None or self._lost is not None:
                return
            with contextlib.suppress(Exception):  # the store down: the lease expires by itself
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
            self.etag = None
