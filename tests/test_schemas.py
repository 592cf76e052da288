"""Every schema round-trips through the one codec; evolution stays compatible."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from schemas.codec import SCHEMA_NAMES, Codec, SchemaError, get_codec

EVENT = {
    "event_id": "e1",
    "uri": "file:///x/a.jpg",
    "image_path": "/x/a.jpg",
    "size": 10,
    "version": "123",
    "source": "local",
    "priority": "HIGH",
    "run_id": "live",
    "published_at": datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
    "force": False,
}
VISION = {
    "event": EVENT,
    "text": "A cat.",
    "image_text": "HELLO",
    "labels": [{"label": "cat", "score": 0.5}],
    "text_vector": [0.25, -1.0],
    "word2vec_vector": [0.5],
    "image_vector": [1.0, 2.0, 3.0],
    "width": 10,
    "height": 20,
    "models": {"describe": "m@1"},
    "seconds": 0.5,
    "processed_at": datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC),
}
ENRICHED = {
    "vision": VISION,
    "description": "cat",
    "category": "animal",
    "keywords": ["cat", "pet"],
    "image_text": "HELLO",
    "llama_extracted": "{}",
    "models": {"structure_text": "q@2"},
    "seconds": 1.5,
    "processed_at": datetime(2026, 1, 2, 3, 4, 7, tzinfo=UTC),
}
DEAD = {
    "event_id": "e1",
    "stage": "vision",
    "error": "corrupt",
    "attempts": 3,
    "failed_at": datetime(2026, 1, 2, 3, 4, 8, tzinfo=UTC),
    "input_topic": "images.new",
    "input_partition": 1,
    "input_offset": 42,
    "event": EVENT,
    "vision": None,
    "raw_value": None,
}
ROW = {
    "image_path": "/x/a.jpg",
    "text": "A cat.",
    "description": "cat",
    "categories": ["animal"],
    "keywords": ["cat"],
    "image_text": "HELLO",
    "text_vector": [0.5],
    "word2vec_vector": None,
    "image_vector": [1.0],
    "timestamp": "2026-01-02T03:04:07.000+00:00",
    "error": None,
    "llama_extracted": "{}",
    "event_id": "e1",
    "run_id": "live",
    "source_uri": "file:///x/a.jpg",
    "failed_stage": None,
    "models": {},
    "source_topic": "images.enriched",
    "source_partition": 0,
    "source_offset": 7,
}


@pytest.mark.parametrize(
    "name,record", [("ImageEvent", EVENT), ("VisionResult", VISION), ("EnrichedRecord", ENRICHED), ("DeadLetter", DEAD), ("ResultRow", ROW)]
)
def test_round_trip(name, record):
    codec = get_codec()
    assert codec.decode(name, codec.encode(name, record)) == record


def test_every_schema_is_covered():
    assert set(SCHEMA_NAMES) == {"ImageEvent", "VisionResult", "EnrichedRecord", "DeadLetter", "ResultRow"}


def test_newer_writer_with_unknown_field_does_not_break_an_older_reader():
    old = get_codec()
    newer_schema = json.loads(old.schema_json("ImageEvent"))
    newer_schema["fields"].append({"name": "camera", "type": "string", "default": ""})
    newer = Codec()
    fp = newer.register_writer_schema(json.dumps(newer_schema))
    # a newer writer: its own parsed schema registered as the ImageEvent writer
    import io

    import fastavro
    from fastavro.schema import parse_schema

    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parse_schema(newer_schema), {**EVENT, "camera": "X100"})
    data = b"\xc3\x01" + fp + buf.getvalue()
    with pytest.raises(SchemaError, match="unknown writer schema"):
        Codec().decode("ImageEvent", data)  # an old reader that has not seen the schema yet
    old_reader = Codec()
    old_reader.register_writer_schema(json.dumps(newer_schema))  # what the schema topic provides
    decoded = old_reader.decode("ImageEvent", data)
    assert decoded == EVENT and "camera" not in decoded


SAMPLES = {"ImageEvent": EVENT, "VisionResult": VISION, "EnrichedRecord": ENRICHED, "DeadLetter": DEAD, "ResultRow": ROW}


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_current_schemas_read_every_released_version(name):
    """Backward compatibility: records written with each released schema version
    (schemas/history/vN) still decode with today's schema (new fields need defaults)."""
    import io
    from pathlib import Path

    import fastavro
    from fastavro.schema import parse_schema

    import schemas

    history = sorted((Path(schemas.__file__).parent / "history").glob("v*"))
    assert history, "no released schema versions kept"
    current = get_codec()
    for version in history:
        named: dict = {}
        for n in SCHEMA_NAMES:
            parsed = parse_schema(json.loads((version / f"{n}.avsc").read_text()), named_schemas=named)
            if n == name:
                writer = parsed
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, writer, SAMPLES[name])
        value = fastavro.schemaless_reader(io.BytesIO(buf.getvalue()), writer, current.schema(name))
        assert value["event_id" if "event_id" in value else next(iter(value))] is not None


@pytest.mark.parametrize("data,message", [(b"", "empty"), (b"\x00\x01garbage!!!", "magic"), (b"\xc3\x01" + b"\x00" * 8 + b"x", "unknown writer")])
def test_garbage_is_a_schema_error(data, message):
    with pytest.raises(SchemaError, match=message):
        get_codec().decode("ImageEvent", data)


def test_truncated_body_is_a_schema_error():
    codec = get_codec()
    data = codec.encode("VisionResult", VISION)
    with pytest.raises(SchemaError):
        codec.decode("VisionResult", data[:30])
