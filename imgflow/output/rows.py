"""Result rows: one per image event (a result, a dead letter or a malformed record), with the
seed's CSV columns first."""

from __future__ import annotations

import time
from datetime import UTC, datetime

SEED_COLUMNS = [
    "image_path",
    "text",
    "description",
    "categories",
    "keywords",
    "image_text",
    "text_vector",
    "word2vec_vector",
    "image_vector",
    "timestamp",
    "error",
    "llama_extracted",
]
EXTRA_COLUMNS = ["event_id", "run_id", "source_uri", "failed_stage", "models", "source_topic", "source_partition", "source_offset"]
CSV_COLUMNS = SEED_COLUMNS + EXTRA_COLUMNS
LIST_COLUMNS = {"categories", "keywords", "text_vector", "word2vec_vector", "image_vector"}
VECTOR_COLUMNS = {"text_vector", "word2vec_vector", "image_vector"}


def iso_time(ts: datetime | int | float) -> str:
    if isinstance(ts, datetime):
        return ts.astimezone(UTC).isoformat(timespec="milliseconds")
    return datetime.fromtimestamp(ts / 1000, UTC).isoformat(timespec="milliseconds")


def row_from_enriched(e: dict, topic: str, partition: int, offset: int) -> dict:
    vision, event = e["vision"], e["vision"]["event"]
    return {
        "image_path": event["image_path"],
        "text": vision["text"],
        "description": e["description"],
        "categories": [e["category"]] if e["category"] else [],
        "keywords": list(e["keywords"]),
        "image_text": e["image_text"],
        "text_vector": vision["text_vector"],
        "word2vec_vector": vision["word2vec_vector"],
        "image_vector": vision["image_vector"],
        "timestamp": iso_time(e["processed_at"]),
        "error": None,
        "llama_extracted": e["llama_extracted"],
        "event_id": event["event_id"],
        "run_id": event["run_id"],
        "source_uri": event["uri"],
        "failed_stage": None,
        "models": {**vision["models"], **e["models"]},
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
    }


def row_from_dead_letter(d: dict, topic: str, partition: int, offset: int) -> dict:
    event, vision = d.get("event"), d.get("vision")
    return {
        "image_path": event["image_path"] if event else "",
        "text": vision["text"] if vision else None,
        "description": None,
        "categories": [],
        "keywords": [],
        "image_text": vision["image_text"] if vision else None,
        "text_vector": vision["text_vector"] if vision else None,
        "word2vec_vector": vision["word2vec_vector"] if vision else None,
        "image_vector": vision["image_vector"] if vision else None,
        "timestamp": iso_time(d["failed_at"]),
        "error": f"{d['stage']}: {d['error']}",
        "llama_extracted": None,
        "event_id": d["event_id"],
        "run_id": event["run_id"] if event else "",
        "source_uri": event["uri"] if event else "",
        "failed_stage": d["stage"],
        "models": dict(vision["models"]) if vision else {},
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
    }


def row_from_malformed(event_id: str, problem: Exception, topic: str, partition: int, offset: int) -> dict:
    """An undecodable final record still accounts for its image: an error row."""
    return {
        "image_path": "",
        "categories": [],
        "keywords": [],
        "timestamp": iso_time(int(time.time() * 1000)),
        "error": f"sink: malformed record: {problem}",
        "event_id": event_id,
        "failed_stage": "sink",
        "models": {},
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
        "run_id": "",
        "source_uri": "",
    }
