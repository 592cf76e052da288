"""Key layout of an output: one key per batch and kind, named by topic, partition and first
offset, and the incomplete-batch rule (see ``imgflow/output/__init__.py``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imgflow.output.storage import Storage

AVRO, CSV_PARTS, INDEX = "avro", "csv", "_index"
EXTENSIONS = {AVRO: ".avro", CSV_PARTS: ".csv", INDEX: ".ids"}
RESULTS_CSV = "results.csv"
COMMITTED_LENGTH = ".results.csv.committed"
CHECKPOINT = ".sink-checkpoint"  # local: where the rows written since the last offset commit begin
LEASE_KEY = "_sink.lease"  # S3: the object whose conditional writes make one sink per prefix


def file_stem(topic: str, partition: int, offset: int) -> str:
    # 19 digits: any Kafka offset, and names sort in offset order (listing can start after one).
    return f"{topic}+{partition}+{offset:019d}"


def partition_prefix(kind: str, topic: str, partition: int) -> str:
    return f"{kind}/{topic}/partition={partition}/"


def data_key(kind: str, topic: str, partition: int, offset: int) -> str:
    return partition_prefix(kind, topic, partition) + file_stem(topic, partition, offset) + EXTENSIONS[kind]


def parse_key(key: str) -> tuple[str, int, int]:
    """``.../<topic>+<p>+<offset>.<ext>`` -> (topic, partition, first offset)."""
    stem = key.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    topic, partition, offset = stem.rsplit("+", 2)
    return topic, int(partition), int(offset)


def sibling_key(key: str, kind: str) -> str:
    topic, partition, offset = parse_key(key)
    return data_key(kind, topic, partition, offset)


def lacking(avro_keys: Iterable[str], present: set[str], kind: str) -> list[str]:
    """The Avro files whose sibling of ``kind`` is not among the ``present`` keys. Without
    its ``_index`` object a batch is incomplete (cut short after its Avro file was written);
    without its CSV part, its rows are not exported yet."""
    return [k for k in avro_keys if sibling_key(k, kind) not in present]


def partitions(storage: Storage, kind: str = AVRO) -> list[tuple[str, int]]:
    """(topic, partition) pairs that have files of ``kind``."""
    found = []
    for topic in storage.subfolders(kind + "/"):
        for folder in storage.subfolders(f"{kind}/{topic}/"):
            if folder.startswith("partition="):
                found.append((topic, int(folder.split("=", 1)[1])))
    return found


def all_keys(storage: Storage, kind: str) -> Iterator[str]:
    for topic, partition in partitions(storage, kind):
        yield from storage.list(partition_prefix(kind, topic, partition))
