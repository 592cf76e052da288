"""The index's tables: their names and columns, and the Arrow rows made from a sink's rows.

A space's table holds an image's search vectors (``text_vector``, ``image_vector``), the
columns a results page shows, and ``words`` (description, keywords, read text, the full
description) under a full-text index; a run's failed table holds its error rows.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime

import numpy as np
import pyarrow as pa

# The model jobs whose vectors are searched: a space is one run + these models.
SPACE_JOBS = ("embed_text", "embed_image")
SHOWN = ["event_id", "run_id", "image_path", "source_uri", "description", "category", "keywords", "image_text", "timestamp"]


def sql_text(value: str) -> str:
    """A string literal for a Lance filter."""
    return "'" + value.replace("'", "''") + "'"


def table_name(kind: str, *parts: str) -> str:
    return f"{kind}_{hashlib.sha1(chr(0).join(parts).encode()).hexdigest()[:16]}"


def words(row: dict) -> str:
    """What the full-text index searches: description, keywords, read text, the full description."""
    return " ".join(x for x in [row.get("description") or "", " ".join(row.get("keywords") or []), row.get("image_text") or "", row.get("text") or ""] if x)


def timestamp_ms(text: str) -> int:
    try:
        return int(datetime.fromisoformat(text).timestamp() * 1000)
    except (TypeError, ValueError):
        return 0


def row_columns(rows: list[dict]) -> dict:
    """The columns an image's row and a failed image's row both have: who, where from, when."""
    return {
        "event_id": [r["event_id"] for r in rows],
        "run_id": [r["run_id"] for r in rows],
        "image_path": [r["image_path"] for r in rows],
        "source_uri": [r["source_uri"] for r in rows],
        "timestamp": pa.array([timestamp_ms(r["timestamp"]) for r in rows], pa.timestamp("ms", tz="UTC")),
        "models": [json.dumps(r.get("models") or {}) for r in rows],
        "source_topic": [r["source_topic"] for r in rows],
        "source_partition": pa.array([r["source_partition"] for r in rows], pa.int32()),
        "source_offset": pa.array([r["source_offset"] for r in rows], pa.int64()),
        "batch": [r["batch"] for r in rows],
    }


def vector_column(rows: list[dict], column: str, dim: int) -> pa.Array:
    """One vector column as FixedSizeList<float32>[dim]."""
    flat: np.ndarray = np.zeros((len(rows), dim), np.float32)
    for i, row in enumerate(rows):
        v = row[column]
        flat[i, : min(dim, len(v))] = v[:dim]  # a model's dimension is fixed; guard anyway
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), dim)


def image_table(rows: list[dict], dims: dict[str, int]) -> pa.Table:
    """The rows of a space's table (``dims``: the space's text and image vector dimensions)."""
    return pa.table(
        {
            **row_columns(rows),
            "description": [r.get("description") or "" for r in rows],
            "text": [r.get("text") or "" for r in rows],
            "category": [(r.get("categories") or [""])[0] for r in rows],
            "categories": pa.array([list(r.get("categories") or []) for r in rows], pa.list_(pa.string())),
            "keywords": pa.array([list(r.get("keywords") or []) for r in rows], pa.list_(pa.string())),
            "image_text": [r.get("image_text") or "" for r in rows],
            "words": [words(r) for r in rows],
            "llama_extracted": [r.get("llama_extracted") or "" for r in rows],
            "word2vec_vector": pa.array([list(r.get("word2vec_vector") or []) for r in rows], pa.list_(pa.float32())),
            "text_vector": vector_column(rows, "text_vector", dims["text"]),
            "image_vector": vector_column(rows, "image_vector", dims["image"]),
        }
    )


def failed_table(rows: list[dict]) -> pa.Table:
    """The rows of a run's failed table: the error and the stage that gave it."""
    return pa.table(
        {
            **row_columns(rows),
            "error": [r.get("error") or "" for r in rows],
            "failed_stage": [r.get("failed_stage") or "" for r in rows],
        }
    )
