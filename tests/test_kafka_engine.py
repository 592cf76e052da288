"""The kafka engine as a user meets it: Apache Kafka (KRaft) from its Maven Central jars,
durable in the data dir across kill -9, clear errors when Java, Maven or the Maven repository
is missing, and the pipeline's behaviour when a broker goes away or a topic differs."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import NewTopic

from imgflow.app.stack import EmbeddedStack
from imgflow.kafka import admin_client, check_kafka, consumer_config, ensure_topics, producer_config
from imgflow.process import free_port
from imgflow.settings import Settings
from tests.conftest import make_settings, settings_env
from tests.kafka_helpers import decoded, produce_events, read_topic, wait_until
from tests.test_stage_loop import committed, events

ROOT = Path(__file__).resolve().parents[1]
IMGFLOW = [sys.executable, "-m", "imgflow"]


def _values(bootstrap: str, topic: str) -> list[bytes]:
    return [m.value() for m in read_topic(Settings(kafka={"bootstrap": bootstrap}), topic)]


def test_kill_9_of_the_broker_and_of_the_whole_stack_keep_records_offsets_and_transactions(tmp_path):
    data, topic, group, txid = tmp_path / "kafka", "t.durable", "g-durable", f"tx-{uuid.uuid4().hex[:6]}"
    stack = EmbeddedStack(data, port=0, engine="kafka").start()
    try:
        settings = Settings(kafka={"bootstrap": stack.bootstrap})
        admin = admin_client(settings)
        admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
        producer = Producer(producer_config(settings, txid))
        producer.init_transactions(30)
        producer.begin_transaction()
        for i in range(20):
            producer.produce(topic, key=str(i), value=f"rec-{i}".encode())
        producer.commit_transaction(30)
        consumer = Consumer(consumer_config(settings, group))
        consumer.commit(offsets=[TopicPartition(topic, 0, 12)], asynchronous=False)
        consumer.close()
        # The node alone, kill -9: the runner restarts it on its port and data.
        old = stack.info()["broker_pid"]
        stack.kill_broker()
        wait_until(lambda: stack.info()["broker_pid"] != old, 30, what="the node restarted")
        check_kafka(Settings(kafka={"bootstrap": stack.bootstrap}), 60)
        assert _values(stack.bootstrap, topic) == [f"rec-{i}".encode() for i in range(20)]
        # The whole stack, kill -9 (runner and node): a new one on the same data dir.
        bootstrap = stack.bootstrap
        node_pid = stack.info()["broker_pid"]
        os.kill(stack.proc.pid, signal.SIGKILL)
        os.kill(node_pid, signal.SIGKILL)
        stack.proc.wait(10)
    finally:
        stack.stop()
    again = EmbeddedStack(data, port=0, engine="kafka").start()
    try:
        assert again.bootstrap == bootstrap  # its ports are kept (ports.json)
        settings = Settings(kafka={"bootstrap": again.bootstrap})
        assert _values(again.bootstrap, topic) == [f"rec-{i}".encode() for i in range(20)]
        consumer = Consumer(consumer_config(settings, group))
        assert consumer.committed([TopicPartition(topic, 0)], timeout=15)[0].offset == 12
        consumer.close()
        producer = Producer(producer_config(settings, txid))  # the same transactional id commits again
        producer.init_transactions(30)
        producer.begin_transaction()
        producer.produce(topic, value=b"after")
        producer.commit_transaction(30)
        assert _values(again.bootstrap, topic)[-1] == b"after"
    finally:
        again.stop()


def _runner(tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "infra.embedded", "--engine", "kafka", "--data-dir", str(tmp_path / "d"), "--port", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_missing_java_or_maven_or_repository_is_one_clear_error(tmp_path):
    base = {k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "MAVEN_OPTS")}
    base["PYTHONPATH"] = str(ROOT)
    # No java anywhere (the jars are cached by the session's broker: java is what is missing).
    res = _runner(tmp_path / "a", {**base, "PATH": str(tmp_path / "empty")})
    assert res.returncode == 1
    assert "needs Java 17 or newer" in res.stderr and "--engine tansu" in res.stderr, res.stderr[-2000:]
    # Java but no Maven, and no jars cached yet.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "java").symlink_to(subprocess.run(["readlink", "-f", "/usr/bin/java"], capture_output=True, text=True).stdout.strip() or "/usr/bin/java")
    res = _runner(tmp_path / "b", {**base, "PATH": str(bin_dir), "XDG_CACHE_HOME": str(tmp_path / "cache-b")})
    assert res.returncode == 1
    assert "`mvn` was not found" in res.stderr and "--engine tansu" in res.stderr, res.stderr[-2000:]
    # Maven, but its repository cannot be reached (an empty local repository, a mirror nobody serves).
    home = tmp_path / "home"
    (home / ".m2").mkdir(parents=True)
    (home / ".m2" / "settings.xml").write_text(
        f"<settings><mirrors><mirror><id>nowhere</id><mirrorOf>*</mirrorOf><url>http://127.0.0.1:{free_port()}/maven2</url></mirror></mirrors></settings>"
    )
    res = _runner(tmp_path / "c", {**base, "XDG_CACHE_HOME": str(tmp_path / "cache-c"), "MAVEN_OPTS": f"-Duser.home={home}"})
    assert res.returncode == 1
    assert "Maven could not resolve Apache Kafka" in res.stderr and "reachable" in res.stderr, res.stderr[-2000:]
    assert "--engine tansu" in res.stderr


def test_imgflow_broker_engine_kafka_runs_in_the_foreground_and_stops_on_sigterm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGFLOW_")}
    proc = subprocess.Popen(
        [*IMGFLOW, "broker", "--engine", "kafka", "--port", "0", "--data-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready bootstrap=127.0.0.1:"), proc.stderr.read()[-2000:] if proc.poll() else line
        bootstrap = line.split("=", 1)[1].strip()
        settings = make_settings(bootstrap, tmp_path)
        assert {"images.new", "images.dlq", "imgflow.schemas"} <= set(admin_client(settings).list_topics(timeout=10).topics)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0
    assert (tmp_path / "broker" / "kafka" / "node-1" / "data" / "meta.properties").exists()


def test_a_command_facing_no_broker_exits_2_naming_kafka_bootstrap(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGFLOW_")}
    env.update({"IMGFLOW_KAFKA__BOOTSTRAP": f"127.0.0.1:{free_port()}", "IMGFLOW_KAFKA__CONNECT_TIMEOUT_S": "2", "IMGFLOW_DATA_DIR": str(tmp_path)})
    for argv in (["stage", "vision"], ["watch", "local", str(tmp_path)], ["replay", "--list"]):
        t0 = time.monotonic()
        res = subprocess.run([*IMGFLOW, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, (argv, res.stderr[-2000:])
        assert "kafka.bootstrap" in res.stderr and env["IMGFLOW_KAFKA__BOOTSTRAP"] in res.stderr, res.stderr
        assert res.stderr.count("\n") <= 3, res.stderr  # one message, not a log flood
        assert time.monotonic() - t0 < 60


def test_an_existing_topic_with_other_settings_is_a_warning_not_a_crash(settings, caplog):
    admin = admin_client(settings)
    name = f"{settings.topics.new}.other"
    admin.create_topics([NewTopic(name, 1, 1)])[name].result(30)
    scoped = settings.model_copy(update={"topics": settings.topics.model_copy(update={"new": name})})
    with caplog.at_level(logging.WARNING, logger="imgflow.kafka"):
        ensure_topics(scoped)
    assert f"topic {name} exists with 1 partitions, the settings say 3 (topics.partitions)" in caplog.text
    assert len(admin.list_topics(name, timeout=10).topics[name].partitions) == 1  # left as it is


def test_schema_topic_and_registries_are_compacted(kafka_stack, tmp_path):
    """imgflow.schemas and the run/backfill registries keep every key for good: created with
    cleanup.policy=compact (on Kafka, which reports topic configs)."""
    from confluent_kafka.admin import ConfigResource

    from imgflow.kafka import ensure_compacted_topic

    settings = make_settings(kafka_stack.bootstrap, tmp_path)
    registry = f"{settings.topics.new}.registry"
    ensure_compacted_topic(settings, registry)
    admin = admin_client(settings)
    for topic in ("imgflow.schemas", registry):
        resource = ConfigResource("topic", topic)
        configs = admin.describe_configs([resource])[resource].result(30)
        assert configs["cleanup.policy"].value == "compact", topic
    resource = ConfigResource("topic", settings.topics.new)  # image topics keep the retention default
    assert admin.describe_configs([resource])[resource].result(30)["cleanup.policy"].value == "delete"


def test_the_broker_down_for_30_s_mid_run_the_stage_waits_and_resumes_exactly_once(tmp_path, engine):
    """A stage process works through 40 events; the only broker is kill -9'd and kept down for
    30 s, then restarted on its data. The stage must not die while the broker is down; a
    transaction left hanging by the outage makes it exit after kafka.transaction_stall_s, and
    it is restarted as `imgflow run` restarts a stage. Every event ends as one result
    (read_committed; on tansu, whose consumers may deliver aborted records, a copy is only
    ever of the same event)."""
    stack = EmbeddedStack(tmp_path / "broker", port=0, engine=engine).start()
    procs: list[subprocess.Popen] = []
    log = open(tmp_path / "stage.log", "ab")

    def start() -> subprocess.Popen:
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.toy_stage"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        return procs[-1]

    def done() -> int:
        try:
            return committed(settings, "g-down", settings.topics.new)
        except KafkaException:  # the broker is still coming back, or its coordinator loading
            return -1

    def all_committed() -> bool:
        if procs[-1].poll() is not None:  # the supervisor's part: a stage that exited is started again
            assert procs[-1].returncode == 75, (tmp_path / "stage.log").read_text()[-3000:]
            start()
        return done() == 40

    try:
        settings = make_settings(stack.bootstrap, tmp_path)
        evs = events([f"d{i:02d}.jpg" for i in range(40)])
        produce_events(settings, evs)
        env = {**settings_env(settings), "TOY_GROUP": "g-down", "TOY_DELAY_S": "0.3", "IMGFLOW_KAFKA__TRANSACTION_STALL_S": "45"}
        start()
        wait_until(lambda: done() >= 4, 90, what="a first commit")
        stack.kill_broker(hold=True)
        time.sleep(30)
        assert procs[-1].poll() is None, "the stage exited while the broker was down"
        stack.release_broker()
        wait_until(all_committed, 240, 1, what="every offset committed after the outage")
        procs[-1].send_signal(signal.SIGTERM)
        procs[-1].wait(90)
        assert procs[-1].returncode == 0, (tmp_path / "stage.log").read_text()[-3000:]
        out = decoded(settings, settings.topics.vision, "ImageEvent")
        assert {e["event_id"] for e in out} == {e["event_id"] for e in evs}
        if engine == "kafka":
            assert len(out) == 40
        print(f"{engine}: {len(procs) - 1} stage restart(s) after the outage")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        stack.stop()
