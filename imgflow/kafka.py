"""Kafka client configuration and the few admin helpers, in one place.

Only standard Kafka APIs through confluent-kafka: the same code runs on the embedded
tansu broker and on Apache Kafka in production.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from imgflow.errors import ImgflowError
from imgflow.settings import Settings
from imgflow.topics import SCHEMA_TOPIC, TopicSpec, all_topic_specs
from schemas.codec import Codec

log = logging.getLogger(__name__)


_last_logged: dict[str, float] = {}
_LOG_EVERY_S = 60.0
_DIGITS = re.compile(r"\d+")
# What makes one outage look like many messages: the log line's "FAIL [rdkafka#consumer-1]
# [thrd:...]: " (the same event also reaches error_cb without it), the broker it was about
# ("127.0.0.1:19092/1: ", ".../bootstrap: ", "GroupCoordinator: 127.0.0.1:19092: "), and
# librdkafka's own repeat count.
_SAME_EVENT = re.compile(
    r"^(?:[A-Z]+ \[[^\]]*\] \[thrd:[^\]]*\]: )?(?:(?:Group|Txn)Coordinator: )?(?:\S+:\d+(?:/\S+)?: )?"
    r"|, \d+ identical error\(s\) suppressed"
)


def _log_once_a_minute(level: int, text: str) -> None:
    """Every client of a process reports the same outage, and librdkafka repeats it many times
    a second, through its log and its error callback both: each message (its numbers ignored:
    ports, counts, milliseconds; which broker and which callback ignored) is logged once a
    minute."""
    key = _DIGITS.sub("#", _SAME_EVENT.sub("", text))
    now = time.monotonic()
    if now - _last_logged.get(key, -1e9) >= _LOG_EVERY_S:
        _last_logged[key] = now
        log.log(level, "kafka: %s", text)


def _log_error(err: KafkaError) -> None:
    """librdkafka reports transient connection trouble here and reconnects by itself."""
    _log_once_a_minute(logging.WARNING, err.str())


class _LibrdkafkaLogger:
    """librdkafka's own log lines (``logger`` config): through the project's logger, rate
    limited like errors, instead of librdkafka's default printing to stderr (a broker outage
    was ~20 lines a second on the terminal)."""

    def log(self, level: int, fmt: str, *args) -> None:
        text = fmt % args if args else fmt
        _log_once_a_minute(logging.WARNING if level >= logging.WARNING else logging.DEBUG, text)


_LIBRDKAFKA_LOGGER = _LibrdkafkaLogger()


def client_config(settings: Settings) -> dict:
    """What every client (producer, consumer, admin) needs: where the cluster is, how to
    authenticate, and where its logs go. The password is passed to librdkafka only."""
    k = settings.kafka
    conf: dict = {
        "bootstrap.servers": k.bootstrap,
        "error_cb": _log_error,
        "logger": _LIBRDKAFKA_LOGGER,
        "security.protocol": k.security_protocol,
    }
    if k.security_protocol.startswith("SASL_"):
        conf["sasl.mechanism"] = k.sasl_mechanism
        conf["sasl.username"] = k.sasl_username
        conf["sasl.password"] = k.sasl_password.get_secret_value()
    if k.security_protocol in ("SSL", "SASL_SSL"):
        conf["ssl.endpoint.identification.algorithm"] = k.ssl_endpoint_identification
        if k.ssl_ca_location:
            conf["ssl.ca.location"] = k.ssl_ca_location
        if k.ssl_certificate_location:
            conf["ssl.certificate.location"] = k.ssl_certificate_location
        if k.ssl_key_location:
            conf["ssl.key.location"] = k.ssl_key_location
        if k.ssl_key_password.get_secret_value():
            conf["ssl.key.password"] = k.ssl_key_password.get_secret_value()
    return conf


def consumer_config(settings: Settings, group_id: str, **extra) -> dict:
    conf = {
        **client_config(settings),
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        # Not every broker filters aborted records (tansu does not): consumers also
        # drop event_ids they have handled. read_committed still matters on Kafka.
        "isolation.level": "read_committed",
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": settings.kafka.session_timeout_ms,
        "heartbeat.interval.ms": settings.kafka.heartbeat_interval_ms,
        "max.poll.interval.ms": 900_000,  # a slow LLM batch must not look like a dead member
        "enable.partition.eof": False,
    }
    conf.update(extra)
    return conf


def producer_config(settings: Settings, transactional_id: str | None = None, **extra) -> dict:
    conf = {
        **client_config(settings),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "none",
        "message.max.bytes": 16 * 1024 * 1024,
    }
    if transactional_id:
        conf["transactional.id"] = transactional_id
        conf["transaction.timeout.ms"] = settings.kafka.transaction_timeout_ms
    conf.update(extra)
    return conf


def admin_client(settings: Settings) -> AdminClient:
    return AdminClient(client_config(settings))


def topic_config(settings: Settings, spec: TopicSpec) -> dict[str, str]:
    """The configs a topic is created with: compaction, min.insync.replicas, the image
    topics' own (``topics.config``) and any of that topic's (``topics.topic_config``)."""
    t = settings.topics
    config: dict[str, str] = dict(t.config) if spec.image_topic else {}
    if spec.compacted:
        config["cleanup.policy"] = "compact"
    if t.min_insync_replicas:
        config["min.insync.replicas"] = str(t.min_insync_replicas)
    config.update(t.topic_config.get(spec.name, {}))
    return config


def ensure_topics(settings: Settings, specs: list[TopicSpec] | None = None, timeout: float = 30, admin: AdminClient | None = None) -> None:
    """Create the topics that do not exist yet (idempotent), with the replication, partitions
    and configs of the settings. Existing topics are left as they are: a warning says where
    their partitions or replication differ from the settings. ``admin``: a client of the
    caller's (the broker health check keeps one with short timeouts)."""
    admin = admin or admin_client(settings)
    specs = specs if specs is not None else all_topic_specs(settings)
    topics = admin.list_topics(timeout=timeout).topics
    replication = settings.topics.replication_factor
    new = []
    for s in specs:
        if s.name in topics:
            _warn_if_different(topics[s.name], s, replication, admin)
        else:
            new.append(NewTopic(s.name, num_partitions=s.partitions, replication_factor=replication, config=topic_config(settings, s)))
    if not new:
        return
    by_name = {s.name: s for s in specs}
    for name, fut in admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout).items():
        try:
            fut.result(timeout)
        except KafkaException as exc:
            code = exc.args[0].code()
            if code == KafkaError.TOPIC_ALREADY_EXISTS:  # made meanwhile, or not yet in our metadata
                with contextlib.suppress(KafkaException, KeyError):
                    _warn_if_different(admin.list_topics(name, timeout=timeout).topics[name], by_name[name], replication, admin)
                continue
            raise KafkaException(
                KafkaError(
                    code,
                    f"could not create topic {name} (replication "
                    f"{replication if replication > 0 else 'the broker default'}, "
                    f"topics.replication_factor): {exc.args[0].str()}",
                )
            ) from None
        log.info("created topic %s", name)


def _warn_if_different(meta, spec: TopicSpec, replication: int, admin: AdminClient | None = None) -> None:
    # A topic made a moment ago can be listed before its partitions are (Kafka's metadata
    # catches up within a second): ask again rather than warn about 0 partitions.
    for _ in range(20):
        if meta.partitions and meta.error is None or admin is None:
            break
        time.sleep(0.25)
        with contextlib.suppress(KafkaException, KeyError):
            meta = admin.list_topics(spec.name, timeout=5).topics[spec.name]
    if not meta.partitions:
        return
    partitions = len(meta.partitions)
    replicas = len(meta.partitions[0].replicas) if 0 in meta.partitions else 0
    if partitions != spec.partitions:
        log.warning("topic %s exists with %d partitions, the settings say %d (topics.partitions): left as it is", spec.name, partitions, spec.partitions)
    if replication > 0 and replicas and replicas != replication:
        log.warning("topic %s exists with replication %d, the settings say %d (topics.replication_factor): left as it is", spec.name, replicas, replication)


def publish_schemas(settings: Settings, codec: Codec, names: list[str]) -> None:
    """Publish the writer schemas this process uses, so any reader can resolve them."""
    producer = Producer(producer_config(settings))
    for name in names:
        producer.produce(SCHEMA_TOPIC.name, key=codec.fingerprint_of(name).hex(), value=codec.schema_json(name))
    remaining = producer.flush(30)
    if remaining:
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, f"could not publish {remaining} schemas"))


def position(msg: Message) -> tuple[str, int, int]:
    """(topic, partition, offset) of a consumed record or partition event: the client's types
    allow None for produced messages only."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    assert topic is not None and partition is not None and offset is not None, "not a consumed message"
    return topic, partition, offset


def end_of_partition(msg: Message) -> bool:
    """True for the PARTITION_EOF event; raises for any other consume error."""
    err = msg.error()
    if err is None:
        return False
    if err.code() == KafkaError._PARTITION_EOF:
        return True
    raise KafkaException(err)


def fetch_schemas(settings: Settings, codec: Codec, timeout: float = 20) -> int:
    """Read the whole schema topic and register every writer schema in it."""
    consumer = Consumer(consumer_config(settings, "imgflow-schema-reader", **{"enable.partition.eof": True, "isolation.level": "read_uncommitted"}))
    try:
        consumer.assign([TopicPartition(SCHEMA_TOPIC.name, 0, 0)])
        count, deadline = 0, time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            if end_of_partition(msg):
                break
            codec.register_writer_schema((msg.value() or b"").decode())
            count += 1
        return count
    finally:
        consumer.close()


def ensure_compacted_topic(settings: Settings, topic: str, timeout: float = 15) -> None:
    """A one-partition compacted topic for small records kept by key (run and backfill
    registries): durable wherever the broker is."""
    ensure_topics(settings, [TopicSpec(topic, 1, "", compacted=True)], timeout)


def read_latest_by_key(settings: Settings, topic: str, timeout: float = 30) -> dict[str, bytes]:
    """The latest value of every key of a one-partition topic, read to its end
    (PARTITION_EOF: the end a broker reports may be wrong), committed records only."""
    consumer = Consumer(consumer_config(settings, "imgflow-registry-reader", **{"enable.partition.eof": True, "fetch.wait.max.ms": 10}))
    latest: dict[str, bytes] = {}
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in consumer.consume(10_000, 0.05):
                if end_of_partition(msg):
                    return latest
                key, value = (msg.key() or b"").decode(), msg.value()
                if value is None:
                    latest.pop(key, None)  # a tombstone: the key is gone
                else:
                    latest[key] = value
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, f"could not read {topic} to its end in {timeout:.0f}s"))
    finally:
        consumer.close()


class KafkaUnreachable(ImgflowError, RuntimeError):
    """The cluster did not answer, or refused us; the message names the setting to look at."""


_BROKER_PREFIX = re.compile(r"^\S*:\d+/\S+: ")  # librdkafka's "sasl_ssl://host:port/id: " before a message


def _tls_files(k) -> str:
    return (
        f"kafka.ssl_ca_location={k.ssl_ca_location or '(empty: the system CAs)'}, "
        f"kafka.ssl_certificate_location={k.ssl_certificate_location or '(empty)'}, "
        f"kafka.ssl_key_location={k.ssl_key_location or '(empty)'}, kafka.ssl_key_password"
    )


def _explain(err: KafkaError, settings: Settings) -> str | None:
    """A message naming the setting behind an error that retrying will not cure, else None.
    By the error's code first: its text starts with the broker's address, which on a
    SASL_SSL listener says "sasl_ssl://" whatever went wrong."""
    k, text = settings.kafka, err.str()
    lowered = _BROKER_PREFIX.sub("", text).lower()
    code = err.code()
    if "mechanism" in lowered and ("unsupported" in lowered or "supported mechanisms" in lowered or "not supported" in lowered):
        return f"Kafka at {k.bootstrap} does not offer the SASL mechanism {k.sasl_mechanism!r} (kafka.sasl_mechanism): {text}"
    ssl = code == KafkaError._SSL or "ssl handshake" in lowered or "certificate" in lowered
    if not ssl and (code == KafkaError._AUTHENTICATION or "authentication" in lowered or "sasl" in lowered):
        return (
            f"Kafka at {k.bootstrap} refused the credentials of user {k.sasl_username!r} "
            f"(kafka.sasl_username / kafka.sasl_password, mechanism {k.sasl_mechanism or 'none'}): {text}"
        )
    if ssl and (
        "verify failed" in lowered
        or "could not be verified" in lowered
        or "unable to get" in lowered
        or "self-signed" in lowered
        or "self signed" in lowered
        or "hostname mismatch" in lowered
    ):
        where = f"kafka.ssl_ca_location={k.ssl_ca_location}" if k.ssl_ca_location else "kafka.ssl_ca_location (empty: the system's CAs)"
        return (
            f"the TLS certificate of Kafka at {k.bootstrap} is not trusted or does not match "
            f"({where}; kafka.ssl_endpoint_identification={k.ssl_endpoint_identification}): {text}"
        )
    if ssl:  # the broker refused our certificate (or asked for one we do not send)
        return (
            f"the TLS handshake with Kafka at {k.bootstrap} failed: a broker that asks for a client "
            f"certificate needs kafka.ssl_certificate_location and kafka.ssl_key_location signed by a CA it "
            f"trusts ({_tls_files(k)}): {text}"
        )
    return None


def _explain_client_error(err: KafkaError, settings: Settings) -> str:
    """librdkafka refused the configuration itself (a TLS file missing or unreadable, a key
    that the password does not open): which setting."""
    k, text = settings.kafka, err.str()
    lowered = text.lower()
    if "ssl.key" in lowered or "private key" in lowered or "bad decrypt" in lowered:
        setting = f"kafka.ssl_key_location={k.ssl_key_location} / kafka.ssl_key_password"
    elif "ssl.certificate" in lowered:
        setting = f"kafka.ssl_certificate_location={k.ssl_certificate_location}"
    elif "ssl.ca" in lowered:
        setting = f"kafka.ssl_ca_location={k.ssl_ca_location}"
    elif "sasl" in lowered:
        setting = f"kafka.sasl_mechanism={k.sasl_mechanism} / kafka.sasl_username"
    else:
        setting = f"kafka.security_protocol={k.security_protocol} and the kafka.ssl_* / kafka.sasl_* settings"
    return f"the Kafka client settings are not usable ({setting}): {text}"


class _QuietLogger:
    """check_kafka's librdkafka log lines: at debug level only (its error is the message);
    the last warning is kept for the timeout's message."""

    def __init__(self) -> None:
        self.last = ""

    def log(self, level: int, fmt: str, *args) -> None:
        text = fmt % args if args else fmt
        if level >= logging.WARNING or text.startswith("FAIL"):  # confluent-kafka passes Python's levels
            self.last = _BROKER_PREFIX.sub("", text.split("]: ", 1)[-1])
        log.debug("kafka: %s", text)


def check_kafka(settings: Settings, timeout: float = 30) -> None:
    """Until the cluster at ``kafka.bootstrap`` answers a metadata request with our security
    settings; KafkaUnreachable (naming the setting) after ``timeout`` s, or at once on a
    refused password or an untrusted certificate."""
    import socket

    errors: list[KafkaError] = []
    conf = client_config(settings)
    quiet = _QuietLogger()
    conf.update({"error_cb": errors.append, "logger": quiet, "socket.timeout.ms": 5000, "reconnect.backoff.max.ms": 1000})
    deadline = time.monotonic() + timeout
    k = settings.kafka
    # A port nobody listens on is said as such (before librdkafka logs its refusals).
    reachable = False
    while time.monotonic() < deadline and not reachable:
        for address in k.bootstrap.split(","):
            host, _, port = address.strip().rpartition(":")
            try:
                with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), 1.0):
                    reachable = True
                    break
            except (OSError, ValueError):
                continue
        if not reachable:
            time.sleep(0.5)
    if not reachable:
        raise KafkaUnreachable(
            f"Kafka is not reachable at {k.bootstrap} (kafka.bootstrap / IMGFLOW_KAFKA__BOOTSTRAP): nothing accepted a connection within {timeout:.0f} s"
        )
    try:
        admin = AdminClient(conf)
    except KafkaException as exc:  # e.g. a TLS file missing, or a key its password does not open
        raise KafkaUnreachable(_explain_client_error(exc.args[0], settings)) from None
    last = ""
    while time.monotonic() < deadline:
        try:
            md = admin.list_topics(timeout=max(0.5, min(3.0, deadline - time.monotonic())))
            if md.brokers:
                return
        except KafkaException as exc:
            last = exc.args[0].str()
        admin.poll(0)  # serves error_cb: a refused login or certificate is reported there only
        for err in errors:
            explained = _explain(err, settings)
            if explained:
                raise KafkaUnreachable(explained)
        causes = [e.str() for e in errors if e.code() != KafkaError._ALL_BROKERS_DOWN]
        last = causes[-1] if causes else quiet.last or last
        errors.clear()
    raise KafkaUnreachable(
        f"Kafka at {k.bootstrap} did not answer within {timeout:.0f} s (kafka.bootstrap, kafka.security_protocol={k.security_protocol}): {last or 'no answer'}"
    )
