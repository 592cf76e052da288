"""Topic definitions, in one place: names come from settings, the rest is here."""

from __future__ import annotations

from dataclasses import dataclass

from imgflow.settings import Settings


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    value_schema: str  # schema name in schemas/ (see schemas.codec)
    # Kept by key forever (cleanup.policy=compact) instead of for the retention time: the
    # schema topic and the run and backfill registries, read whole by whoever starts.
    compacted: bool = False
    image_topic: bool = False  # one of the pipeline's image topics: takes topics.config


def topic_specs(settings: Settings) -> list[TopicSpec]:
    t = settings.topics
    return [
        TopicSpec(t.new, t.partitions, "ImageEvent", image_topic=True),
        TopicSpec(t.new_high, t.partitions, "ImageEvent", image_topic=True),
        TopicSpec(t.vision, t.partitions, "VisionResult", image_topic=True),
        TopicSpec(t.enriched, t.partitions, "EnrichedRecord", image_topic=True),
        TopicSpec(t.dlq, t.partitions, "DeadLetter", image_topic=True),
    ]


# Writers publish their Avro schemas here (key: fingerprint hex) so that a reader meeting a
# newer writer schema can resolve it (see schemas.codec). Compacted: a record older than the
# retention time may still need its writer schema.
SCHEMA_TOPIC = TopicSpec("imgflow.schemas", 1, "", compacted=True)


def all_topic_specs(settings: Settings) -> list[TopicSpec]:
    specs = [*topic_specs(settings), SCHEMA_TOPIC]
    w = settings.watch
    if w.s3_notify and not w.s3_notify_bootstrap:
        # The bucket notifications' topic, on the pipeline's cluster: it must exist before the
        # store publishes (a Kafka without auto.create.topics.enable refuses its events).
        specs.append(TopicSpec(w.s3_notify_topic, 1, ""))
    return specs
