"""The exactly-once commit of a stage: nothing else writes Kafka transactions.

* One transactional producer per *input partition*, with a stable id
  ``<group>.<topic>.<partition>``. Whoever is assigned the partition next (a restarted
  process, or another instance after a rebalance) calls ``init_transactions`` with the
  same id, which fences the old owner and aborts its open transaction. A broker that
  never times out a dead producer's transaction (tansu) is unblocked this way.
* The outputs of a batch and the input offsets commit in one transaction (the numbered
  steps of ``TransactionalCommit.commit``).
* Every record is keyed by its ``event_id``; a stage drops (event_id, run_id) pairs it
  has already handled, and the sink drops those already written, so records of aborted
  transactions that a broker still delivers never make a second result.

See docs/design.md#exactly-once."""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from imgflow import metrics
from imgflow.kafka import producer_config
from imgflow.settings import Settings
from imgflow.stage.crash import CrashPoints
from imgflow.stage.ranges import TP
from imgflow.stage.records import HandledIds, InputRecord, OutputRecord
from schemas.codec import Codec

log = logging.getLogger(__name__)

# A record the broker refuses for its size (its message.max.bytes, the topic's
# max.message.bytes) or librdkafka for ours: that image becomes a dead letter.
TOO_LARGE = (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE)


class Outcome(enum.Enum):
    COMMITTED = "committed"
    ABORTED = "aborted"  # the caller rewinds to the batch's first offset and redoes it
    NOT_OURS = "not ours"  # revoked while we worked: the new owner redoes the records


class TransactionalCommit:
    """The transactional producers of the partitions this process owns, and the commit of a
    batch's outputs together with its input offsets."""

    def __init__(
        self, settings: Settings, group_id: str, stage: str, codec: Codec, crash: CrashPoints, handled: HandledIds, dead_letter: Callable[..., OutputRecord]
    ) -> None:
        self.settings = settings
        self.group_id = group_id
        self.stage = stage
        self.codec = codec
        self.crash = crash
        self.handled = handled  # step 5 adds the committed dedupe keys
        self.dead_letter = dead_letter  # for an output too large for Kafka
        self.producers: dict[TP, Producer] = {}
        self.txn_started: float | None = None  # monotonic time the open transaction began
        self._committed_next: dict[TP, int] = {}  # offsets this process committed

    # ---- partition ownership ------------------------------------------------------------
    def assign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._committed_next.pop((tp.topic, tp.partition), None)
            txn_id = f"{self.group_id}.{tp.topic}.{tp.partition}"
            producer = Producer(producer_config(self.settings, txn_id, **{"linger.ms": self.settings.kafka.txn_linger_ms}))
            # Fences the previous owner of this partition and aborts its open transaction.
            producer.init_transactions(60)
            self.producers[(tp.topic, tp.partition)] = producer

    def revoke(self, partitions: list[TopicPartition]) -> None:
        # Called from inside consume(): no transaction is open between batches.
        for tp in partitions:
            producer = self.producers.pop((tp.topic, tp.partition), None)
            if producer is not None:
                producer.flush(5)

    def close(self) -> None:
        for producer in self.producers.values():
            producer.flush(5)

    def watch(self, stopping: Callable[[], bool]) -> None:
        """Start the watchdog thread (until ``stopping()``)."""
        threading.Thread(target=self._watch_transactions, args=(stopping,), daemon=True, name="txn-watchdog").start()

    def _watch_transactions(self, stopping: Callable[[], bool]) -> None:
        """Exit the process if one transaction hangs: a crash is always safe here (that is
        the point of the design), and the restarted process reconnects and fences."""
        limit = self.settings.kafka.transaction_stall_s
        while limit and not stopping():
            started = self.txn_started
            if started is not None and time.monotonic() - started > limit:
                log.error("a transaction has hung for %.0fs: exiting so that a restart recovers", limit)
                logging.shutdown()
                os._exit(75)
            time.sleep(1)

    # ---- the commit, written once ----------------------------------------------------------
    def commit(self, consumer: Consumer, tp: TP, records: list[InputRecord], outputs: dict[int, list[OutputRecord]], oversize_retry: bool = True) -> Outcome:
        producer = self.producers.get(tp)
        if producer is None:  # revoked while we worked: the new owner redoes these records
            log.warning("partition %s[%d] no longer ours: batch dropped, the new owner redoes it", *tp)
            return Outcome.NOT_OURS
        self.txn_started = time.monotonic()
        oversized: dict[int, str] = {}  # id(record) -> why its output was refused for its size
        try:
            # Step 1. Begin: everything until step 4 becomes visible together or not at all.
            producer.begin_transaction()
            # Step 2. Produce results and dead letters, keyed by event_id.
            produced: Counter[str] = Counter()
            for rec in records:
                for out in outputs.get(id(rec), []):
                    value = self.codec.encode(out.schema, out.value)
                    try:
                        producer.produce(out.topic, key=out.key, value=value, on_delivery=_size_watch(rec, out, len(value), oversized))
                    except KafkaException as exc:
                        if exc.args[0].code() in TOO_LARGE:
                            oversized[id(rec)] = _too_large(out, len(value), exc.args[0])
                        raise
                    produced[out.topic] += 1
            self.crash.reach("after_produce")
            # Step 3. Add the input offsets to the same transaction: the progress is
            # committed only together with the outputs it stands for. The group metadata
            # lets the broker refuse it if we lost the partition meanwhile. Never behind
            # what this process committed already (a batch read again at an idle point).
            next_offset = max(records[-1].offset + 1, self._committed_next.get(tp, -1))
            offsets = [TopicPartition(tp[0], tp[1], next_offset)]
            producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 60)
            self.crash.reach("after_offsets")
            # Step 4. Commit, retrying while the error is retriable (e.g. broker restarting).
            self._commit_with_retry(producer)
            self._committed_next[tp] = next_offset
            metrics.TRANSACTIONS.labels(self.stage, "committed").inc()
            for topic, n in produced.items():  # counted once committed: an aborted batch is redone
                metrics.MESSAGES_OUT.labels(self.stage, topic).inc(n)
            metrics.COMMIT_SECONDS.labels(self.stage).observe(time.monotonic() - self.txn_started)
            self.crash.reach("after_commit")
        except KafkaException as exc:
            err = exc.args[0]
            metrics.TRANSACTIONS.labels(self.stage, "aborted").inc()
            log.error("transaction for %s[%d] failed: %s", tp[0], tp[1], err)
            if err.fatal():
                # Fenced: another owner has this partition now. Restarting is the safe way out.
                raise
            producer.poll(0)  # delivery reports not served yet (a size refused by the broker)
            try:
                producer.abort_transaction(30)
            except KafkaException as abort_exc:
                log.error("abort failed: %s", abort_exc)
            if oversized and oversize_retry:
                # Those images become dead letters (without the refused result), and the
                # batch commits again at once: nothing else about it changed.
                for rec in records:
                    if id(rec) in oversized:
                        outputs[id(rec)] = [self.dead_letter(rec, oversized[id(rec)], 1, keep_vision=False)]
                self.txn_started = None
                return self.commit(consumer, tp, records, outputs, oversize_retry=False)
            return Outcome.ABORTED
        finally:
            self.txn_started = None
        # Step 5. Only now remember the dedupe keys: an aborted batch must be redone.
        for rec in records:
            self.handled.add(rec.dedupe_key)
            # One line per image and stage: `grep <event_id>` over the logs shows its path.
            log.info(
                "committed %s[%d]@%d -> %s",
                rec.topic,
                rec.partition,
                rec.offset,
                ", ".join(out.topic for out in outputs.get(id(rec), [])) or "nothing (duplicate)",
                extra={"event_id": rec.event_id, "stage": self.stage},
            )
        return Outcome.COMMITTED

    @staticmethod
    def _commit_with_retry(producer: Producer, attempts: int = 30) -> None:
        for attempt in range(attempts):
            try:
                producer.commit_transaction(60)
                return
            except KafkaException as exc:
                err = exc.args[0]
                if not err.retriable() or attempt == attempts - 1:
                    raise
                log.warning("commit retry %d: %s", attempt + 1, err)
                time.sleep(1)


def _too_large(out: OutputRecord, size: int, err: KafkaError) -> str:
    return (
        f"its {out.schema} record for {out.topic} is {size:,} bytes, more than Kafka accepts "
        f"(the producer's or the broker's message.max.bytes, or the topic's max.message.bytes): {err.str()}"
    )


def _size_watch(rec: InputRecord, out: OutputRecord, size: int, oversized: dict[int, str]):
    """A delivery callback noting an output the broker refused for its size (the commit then
    fails as a whole; the caller turns that image into a dead letter and commits again)."""

    def on_delivery(err: KafkaError | None, _msg) -> None:
        if err is not None and err.code() in TOO_LARGE:
            oversized[id(rec)] = _too_large(out, size, err)

    return on_delivery
