"""Shared fixtures: one real embedded broker (tansu on SeaweedFS) per test session, and
settings with topic names of their own per test so tests never see each other's records."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from imgflow.kafka import ensure_topics  # noqa: E402
from imgflow.settings import Settings  # noqa: E402
from tests.search_fixtures import search_run  # noqa: E402,F401 - a session fixture


@dataclass(frozen=True)
class S3Server:
    """A real S3 server on loopback (the embedded stack's SeaweedFS) and its credentials."""

    endpoint: str
    access_key_id: str
    secret_access_key: str

    def settings_section(self) -> dict:
        return {"endpoint_url": self.endpoint, "access_key_id": self.access_key_id, "secret_access_key": self.secret_access_key, "region": "us-east-1"}

    def client(self):
        """A boto3 S3 client of this server."""
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key, region_name="us-east-1"
        )

    def env(self) -> dict:
        """The same as IMGFLOW_S3__* variables, for child processes."""
        return {
            "IMGFLOW_S3__ENDPOINT_URL": self.endpoint,
            "IMGFLOW_S3__ACCESS_KEY_ID": self.access_key_id,
            "IMGFLOW_S3__SECRET_ACCESS_KEY": self.secret_access_key,
            "IMGFLOW_S3__REGION": "us-east-1",
        }


# The brokers every broker test runs on: the embedded default (tansu) and the production one
# (Apache Kafka, KRaft, from its Maven Central jars). IMGFLOW_TEST_ENGINES=kafka narrows it.
ENGINES = [e for e in os.environ.get("IMGFLOW_TEST_ENGINES", "tansu,kafka").split(",") if e]


def _session_stack(tmp_path_factory, engine: str):
    """One stack of ``engine`` for the test session (None with IMGFLOW_TEST_BOOTSTRAP)."""
    if os.environ.get("IMGFLOW_TEST_BOOTSTRAP"):
        yield None
        return
    from imgflow.app.stack import EmbeddedStack

    data = tmp_path_factory.mktemp(f"broker-{engine}")
    stack = EmbeddedStack(data, port=0, log_file=data / "broker.log", engine=engine).start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def tansu_stack(tmp_path_factory):
    """The session's tansu stack (its SeaweedFS is also the tests' S3 server)."""
    yield from _session_stack(tmp_path_factory, "tansu")


@pytest.fixture(scope="session")
def kafka_stack(tmp_path_factory):
    """The session's single-node Apache Kafka."""
    yield from _session_stack(tmp_path_factory, "kafka")


@pytest.fixture(scope="session", params=ENGINES)
def engine(request) -> str:
    """The broker engine of this test: each broker test runs once per engine."""
    return request.param


@pytest.fixture(scope="session")
def embedded_stack(request, engine):
    """One embedded stack per engine per test session; None when IMGFLOW_TEST_BOOTSTRAP names
    a running broker to reuse (handy while developing)."""
    return request.getfixturevalue(f"{engine}_stack")


@pytest.fixture(scope="session")
def broker(embedded_stack) -> str:
    """Bootstrap address of a real broker on loopback."""
    return embedded_stack.bootstrap if embedded_stack is not None else os.environ["IMGFLOW_TEST_BOOTSTRAP"]


@pytest.fixture(scope="session")
def s3_server(tansu_stack) -> S3Server:
    """The session's real S3 server: the embedded stack's SeaweedFS (shared, as the broker
    is; tests use buckets of their own). With IMGFLOW_TEST_BOOTSTRAP, IMGFLOW_TEST_S3_DIR
    names the reused stack's data dir."""
    import json

    if tansu_stack is not None:
        data_dir, endpoint = tansu_stack.data_dir, tansu_stack.s3_endpoint
    else:
        data_dir = Path(os.environ["IMGFLOW_TEST_S3_DIR"])
        endpoint = json.loads((data_dir / "stack.json").read_text())["s3_endpoint"]
    creds = json.loads((data_dir / "s3-credentials.json").read_text())
    return S3Server(endpoint, creds["access_key_id"], creds["secret_access_key"])


def new_bucket(s3: S3Server) -> str:
    """A fresh, empty bucket on the test S3 server."""
    name = f"t{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_settings(broker, s3_server, tmp_path) -> Settings:
    """Settings with their own topics and S3 configured for the test server (make a bucket
    with the ``s3_bucket`` fixture or ``new_bucket``)."""
    return make_settings(broker, tmp_path, s3=s3_server.settings_section())


@pytest.fixture
def s3_bucket(s3_server) -> str:
    return new_bucket(s3_server)


def make_settings(broker: str, tmp_path: Path, **overrides) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    base = {
        # Groups of their own too: a test's sink never shares a group with another test's.
        "kafka": {"bootstrap": broker, "group_prefix": f"t{suffix}"},
        "topics": {
            "new": f"t{suffix}.new",
            "new_high": f"t{suffix}.new.high",
            "vision": f"t{suffix}.vision",
            "enriched": f"t{suffix}.enriched",
            "dlq": f"t{suffix}.dlq",
            "partitions": 3,
        },
        "data_dir": tmp_path / "data",
        "sink": {"out_dir": tmp_path / "out"},
        "stage": {"max_wait_s": 0.2, "retry_backoff_s": 0.05, "batch_size": 8},
        "watch": {"poll_interval_s": 0.2, "settle_s": 0.3},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    settings = Settings(**base)
    ensure_topics(settings)
    return settings


@pytest.fixture
def settings(broker, tmp_path) -> Settings:
    return make_settings(broker, tmp_path)


def settings_env(settings: Settings) -> dict:
    """The same settings as IMGFLOW_* variables, for child processes."""
    t = settings.topics
    env = dict(os.environ)
    env.update(
        {
            "IMGFLOW_KAFKA__BOOTSTRAP": settings.kafka.bootstrap,
            "IMGFLOW_KAFKA__GROUP_PREFIX": settings.kafka.group_prefix,
            "IMGFLOW_TOPICS__NEW": t.new,
            "IMGFLOW_TOPICS__NEW_HIGH": t.new_high,
            "IMGFLOW_TOPICS__VISION": t.vision,
            "IMGFLOW_TOPICS__ENRICHED": t.enriched,
            "IMGFLOW_TOPICS__DLQ": t.dlq,
            "IMGFLOW_TOPICS__PARTITIONS": str(t.partitions),
            "IMGFLOW_DATA_DIR": str(settings.data_dir),
            "IMGFLOW_SINK__OUT_DIR": str(settings.sink.out_dir),
            "IMGFLOW_STAGE__MAX_WAIT_S": str(settings.stage.max_wait_s),
            "IMGFLOW_STAGE__RETRY_BACKOFF_S": str(settings.stage.retry_backoff_s),
            "IMGFLOW_STAGE__BATCH_SIZE": str(settings.stage.batch_size),
            "IMGFLOW_WATCH__POLL_INTERVAL_S": str(settings.watch.poll_interval_s),
            "IMGFLOW_WATCH__SETTLE_S": str(settings.watch.settle_s),
            "IMGFLOW_ALLOWED_ROOTS": "[" + ",".join(f'"{r}"' for r in settings.allowed_roots) + "]",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop("IMGFLOW_CRASH_AT", None)
    return env
