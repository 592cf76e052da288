"""Failures of a transform: retries with back-off, batch halving, dead letters."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from imgflow import metrics
from imgflow.errors import BadInput
from imgflow.settings import Settings
from imgflow.stage.records import InputRecord, OutputRecord, Transform

log = logging.getLogger(__name__)


class Failures:
    """Runs the transform on a batch so that every record ends with its outputs or a dead
    letter: a batch that raises is halved down to single records (how an out-of-memory model
    backs off), a record that fails is retried (not ``BadInput``), then dead-lettered."""

    def __init__(self, transform: Transform, settings: Settings) -> None:
        self.transform = transform
        self.settings = settings

    def outputs(self, records: list[InputRecord]) -> dict[int, list[OutputRecord]]:
        """Outputs for every record (keyed by id(record)): results, or a dead letter."""
        outputs: dict[int, list[OutputRecord]] = {}
        decodable = []
        for rec in records:
            if rec.error is not None:
                outputs[id(rec)] = [self.dead_letter(rec, f"malformed input value: {rec.error}", 1)]
            else:
                decodable.append(rec)
        for rec, result in self._process_halving(decodable):
            attempts = 1
            while isinstance(result, BaseException) and not isinstance(result, BadInput) and attempts < self.settings.stage.max_attempts:
                metrics.RETRIES.labels(self.transform.name).inc()
                log.warning(
                    "attempt %d failed, retrying: %s: %s",
                    attempts,
                    type(result).__name__,
                    result,
                    extra={"event_id": rec.event_id, "stage": self.transform.name},
                )
                time.sleep(self.settings.stage.retry_backoff_s * 2 ** (attempts - 1))
                attempts += 1
                result = self._process_one(rec)
            if isinstance(result, BaseException):
                message = f"{type(result).__name__}: {result}" if not isinstance(result, BadInput) else str(result)
                outputs[id(rec)] = [self.dead_letter(rec, message, attempts)]
            else:
                outputs[id(rec)] = result
        return outputs

    def _process_one(self, rec: InputRecord) -> list[OutputRecord] | BaseException:
        try:
            return self.transform.process([rec])[0]
        except Exception as exc:  # the transform's own failure for this one record
            return exc

    def _process_halving(self, records: list[InputRecord]) -> Iterator[tuple[InputRecord, list[OutputRecord] | BaseException]]:
        if not records:
            return
        start = time.monotonic()
        try:
            results = self.transform.process(records)
        except Exception as exc:
            if len(records) == 1:
                yield records[0], exc
                return
            half = len(records) // 2
            log.warning("batch of %d failed (%s: %s): halving", len(records), type(exc).__name__, exc, extra={"stage": self.transform.name})
            yield from self._process_halving(records[:half])
            yield from self._process_halving(records[half:])
            return
        seconds = time.monotonic() - start
        metrics.BATCH_SIZE.labels(self.transform.name).observe(len(records))
        metrics.STAGE_SECONDS.labels(self.transform.name).observe(seconds)
        log.info("transformed %d record(s) in %.2fs (%.2fs each)", len(records), seconds, seconds / len(records), extra={"stage": self.transform.name})
        yield from zip(records, results)

    def dead_letter(self, rec: InputRecord, error: str, attempts: int, keep_vision: bool = True) -> OutputRecord:
        metrics.MESSAGES_FAILED.labels(self.transform.name).inc()
        # The one log line of a dead letter says exactly what the dead letter says.
        log.error("dead-lettered after %d attempt(s): %s", attempts, error, extra={"event_id": rec.event_id, "stage": self.transform.name})
        value = {
            "event_id": rec.event_id,
            "stage": self.transform.name,
            "error": error,
            "attempts": attempts,
            "failed_at": int(time.time() * 1000),
            "input_topic": rec.topic,
            "input_partition": rec.partition,
            "input_offset": rec.offset,
            "event": self.transform.event_of(rec.value) if rec.value else None,
            "vision": self.transform.vision_of(rec.value) if rec.value and keep_vision else None,
            "raw_value": rec.raw if rec.value is None else None,
        }
        return OutputRecord(self.settings.topics.dlq, "DeadLetter", value, rec.event_id)
