"""The fast Avro path (schemas.fastcodec) writes exactly fastavro's bytes and reads them back
to exactly fastavro's values; what it does not cover goes to fastavro unchanged."""

from __future__ import annotations

import io
import random
import struct
from datetime import UTC, datetime

import fastavro
import pytest

from schemas.codec import MAGIC, SchemaError, get_codec
from schemas.fastcodec import Decline
from tests.test_schemas import DEAD, ENRICHED, EVENT, ROW, VISION

rng = random.Random(7)


def f32(values):  # what a float32 model output is as Python floats
    return list(struct.unpack(f"<{len(values)}f", struct.pack(f"<{len(values)}f", *values)))


BIG_VISION = {
    **VISION,
    "text_vector": f32([rng.gauss(0, 1) for _ in range(384)]),
    "word2vec_vector": f32([rng.uniform(-3, 3) for _ in range(50)]),
    "image_vector": f32([rng.random() for _ in range(1280)]),
    "labels": [{"label": "Egyptian cat ü", "score": 0.8}, {"label": "", "score": 0}],
    "models": {},
    "text": "x" * 300,
    "width": -(1 << 31),
    "height": (1 << 31) - 1,
}
BIG_ENRICHED = {**ENRICHED, "vision": BIG_VISION, "keywords": []}
DEAD_RAW = {**DEAD, "vision": BIG_VISION, "raw_value": bytes(range(256)), "input_offset": 1 << 40}
ROW_NULLS = {**ROW, "text": None, "text_vector": None, "image_vector": [], "models": {"a": "b", "c": ""}, "source_offset": -(1 << 63)}
CASES = [
    ("ImageEvent", EVENT),
    ("ImageEvent", {**EVENT, "priority": "NORMAL", "force": True, "size": 0}),
    ("VisionResult", VISION),
    ("VisionResult", BIG_VISION),
    ("EnrichedRecord", ENRICHED),
    ("EnrichedRecord", BIG_ENRICHED),
    ("DeadLetter", DEAD),
    ("DeadLetter", DEAD_RAW),
    ("ResultRow", ROW),
    ("ResultRow", ROW_NULLS),
]


def fastavro_bytes(codec, name, record) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, codec.schema(name), record)
    return MAGIC + codec.fingerprint_of(name) + buf.getvalue()


def fastavro_value(codec, name, data: bytes):
    return fastavro.schemaless_reader(io.BytesIO(data[10:]), codec.schema(name), codec.schema(name))


@pytest.mark.parametrize("name,record", CASES)
def test_same_bytes_and_values_as_fastavro(name, record):
    codec = get_codec()
    assert name in codec._fast  # every schema of ours is covered by the fast path
    data = codec.encode(name, record)
    assert data == fastavro_bytes(codec, name, record)
    assert codec._fast[name].decode(data, 10) == fastavro_value(codec, name, data)
    assert codec.decode(name, data) == fastavro_value(codec, name, data)


def test_timestamps_as_ints_and_datetimes_encode_alike():
    codec = get_codec()
    ms = int(datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC).timestamp() * 1000)
    assert codec.encode("ImageEvent", {**EVENT, "published_at": ms}) == codec.encode("ImageEvent", EVENT)
    assert codec.decode("ImageEvent", codec.encode("ImageEvent", EVENT))["published_at"] == EVENT["published_at"]


@pytest.mark.parametrize(
    "change",
    [
        {"published_at": datetime(2026, 1, 2, 3, 4, 5)},  # naive: fastavro's local-time rule
        {"size": True},  # a bool where a long is due
    ],
)
def test_what_the_fast_path_declines_fastavro_still_encodes(change):
    codec = get_codec()
    record = {**EVENT, **change}
    with pytest.raises(Decline):
        codec._fast["ImageEvent"].encode(record)
    assert codec.encode("ImageEvent", record) == fastavro_bytes(codec, "ImageEvent", record)


def test_a_float_too_large_for_float32_is_written_as_fastavro_writes_it():
    codec = get_codec()
    record = {**VISION, "image_vector": [1e300, 1.0]}
    assert codec.encode("VisionResult", record) == fastavro_bytes(codec, "VisionResult", record)


def test_missing_field_and_wrong_type_keep_fastavro_errors():
    codec = get_codec()
    with pytest.raises(Exception) as fast_err:
        codec.encode("ImageEvent", {k: v for k, v in EVENT.items() if k != "uri"})
    with pytest.raises(Exception) as slow_err:
        fastavro_bytes(codec, "ImageEvent", {k: v for k, v in EVENT.items() if k != "uri"})
    assert type(fast_err.value) is type(slow_err.value)
    with pytest.raises(TypeError):  # fastavro's error for a string where a float belongs
        codec.encode("VisionResult", {**VISION, "text_vector": ["a"]})


def test_truncated_and_trailing_bytes():
    codec = get_codec()
    data = codec.encode("VisionResult", BIG_VISION)
    for cut in (11, 40, len(data) - 3000, len(data) - 1):
        with pytest.raises(SchemaError):
            codec.decode("VisionResult", data[:cut])
    # fastavro ignores bytes after the record; so does the codec (through the fallback)
    assert codec.decode("VisionResult", data + b"\x00") == fastavro_value(codec, "VisionResult", data)


def test_sink_avro_files_read_back_with_fastavro():
    """The sink's container files (written from the fast bodies) are plain Avro: fastavro
    reads them back to the rows, several blocks included; deflate as before."""
    from imgflow.output.formats import avro_bytes, read_avro
    from imgflow.output.rows import row_from_enriched

    rows = [row_from_enriched({**BIG_ENRICHED, "processed_at": 1_700_000_000_000 + i}, "images.enriched", 1, i) for i in range(200)] + [ROW, ROW_NULLS]
    data = avro_bytes(rows)
    reader = fastavro.reader(io.BytesIO(data))
    assert reader.codec == "deflate"
    assert list(reader) == rows
    assert read_avro(data) == rows
    assert read_avro(avro_bytes([])) == []
    plain = fastavro.reader(io.BytesIO(avro_bytes(rows, codec="null")))  # sink.avro_codec = "null"
    assert plain.codec == "null" and list(plain) == rows
    with pytest.raises(ValueError, match="deflate or null"):
        avro_bytes(rows, codec="snappy")


def test_csv_lines_are_what_the_csv_module_writes():
    """The sink's CSV: vectors formatted and quoted without the csv module, the same bytes
    as csv.writer over csv_cell (quotes, commas, newlines, empty and missing cells)."""
    import csv

    from imgflow.output.formats import CsvLines, csv_bytes, csv_cell
    from imgflow.output.rows import CSV_COLUMNS, row_from_enriched

    base = row_from_enriched(BIG_ENRICHED, "images.enriched", 0, 5)
    nasty = ["", " ", "a,b", 'say "hi"', "line\nbreak", "cr\r", "ü", '"', ",", None]
    vectors = [None, [], [0.5], [1.0, -2.5e-9, float("nan"), float("inf"), -0.0, 123456789.0]]
    rows = []
    for i in range(300):
        row = dict(base)
        for j, column in enumerate(CSV_COLUMNS):
            if (i + j) % 4 == 0:
                row[column] = vectors[(i + j) % len(vectors)] if column.endswith("_vector") else nasty[(i * j) % len(nasty)]
        rows.append(row)
    expected = io.StringIO(newline="")
    writer = csv.writer(expected)
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([csv_cell(c, row.get(c)) for c in CSV_COLUMNS])
    assert csv_bytes(rows, header=True) == expected.getvalue().encode("utf-8")
    one = io.StringIO(newline="")
    csv.writer(one).writerow([csv_cell(c, base.get(c)) for c in CSV_COLUMNS])
    assert CsvLines().line(base) == one.getvalue()
    assert csv_cell("image_vector", [0.1, 1e-05, 3.0]) == "[" + ",".join(f"{x:.7g}" for x in [0.1, 1e-05, 3.0]) + "]"
