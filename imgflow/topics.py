"""Topic definitions, in one place: names come from settings, the rest is here."""

from __future__ import annotations

from dataclasses import dataclass

from imgflow.settings import Settings


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    value_schema: str  # schema name in schemas/ (see schemas.codec)


def topic_specs(settings: Settings) -> list[TopicSpec]:
    t = settings.topics
    return [
        TopicSpec(t.new, t.partitions, "ImageEvent"),
        TopicSpec(t.new_high, t.partitions, "ImageEvent"),
        TopicSpec(t.vision, t.partitions, "VisionResult"),
        TopicSpec(t.enriched, t.partitions, "EnrichedRecord"),
        TopicSpec(t.dlq, t.partitions, "DeadLetter"),
    ]


# Writers publish their Avro schemas here (key: fingerprint hex) so that a reader meeting a
# newer writer schema can resolve it (see schemas.codec).
SCHEMA_TOPIC = TopicSpec("imgflow.schemas", 1, "")


def all_topic_specs(settings: Settings) -> list[TopicSpec]:
    return [*topic_specs(settings), SCHEMA_TOPIC]
