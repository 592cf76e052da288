"""Test values of the pipeline's Avro records (schemas/*.avsc), built with every field
set: each test names only what it looks at."""

from __future__ import annotations


def image_event(event_id: str, name: str, *, version: str = "1", run_id: str = "t") -> dict:
    """An ImageEvent of the local file /imgs/NAME."""
    return {
        "event_id": event_id,
        "uri": f"file:///imgs/{name}",
        "image_path": f"/imgs/{name}",
        "size": 1,
        "version": version,
        "source": "test",
        "priority": "NORMAL",
        "run_id": run_id,
        "published_at": 0,
        "force": False,
    }


def vision_result(
    event: dict,
    *,
    text: str = "t",
    image_text: str = "",
    labels: list[dict] | None = None,
    text_vector: list[float] | None = None,
    word_vector: list[float] | None = None,
    image_vector: list[float] | None = None,
    size: int = 1,
    models: dict | None = None,
    seconds: float = 0.0,
) -> dict:
    """A VisionResult of ``event``."""
    return {
        "event": event,
        "text": text,
        "image_text": image_text,
        "labels": labels or [],
        "text_vector": text_vector or [0.0],
        "word2vec_vector": word_vector or [0.0],
        "image_vector": image_vector or [0.0],
        "width": size,
        "height": size,
        "models": models or {},
        "seconds": seconds,
        "processed_at": 0,
    }
