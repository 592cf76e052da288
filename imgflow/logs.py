"""The one logger setup. Every record can carry an ``event_id`` (pass ``extra={"event_id": ...}``)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_CONTEXT_FIELDS = ("event_id", "stage", "topic", "partition", "offset")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for key in _CONTEXT_FIELDS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s%(context)s")

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"{k}={getattr(record, k)}" for k in _CONTEXT_FIELDS if hasattr(record, k)]
        record.context = (" [" + " ".join(parts) + "]") if parts else ""
        return super().format(record)


def setup_logging(level: str | None = None, fmt: str | None = None) -> None:
    """Idempotent. Defaults come from IMGFLOW_LOG_LEVEL / IMGFLOW_LOG_FORMAT so child
    processes inherit the parent's choice without passing settings around."""
    level = (level or os.environ.get("IMGFLOW_LOG_LEVEL") or "INFO").upper()
    fmt = fmt or os.environ.get("IMGFLOW_LOG_FORMAT") or "text"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Chatty libraries: keep their warnings, drop their info.
    for noisy in ("httpx", "urllib3", "botocore", "sentence_transformers", "filelock", "RapidOCR"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
