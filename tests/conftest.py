"""Shared fixtures: one real embedded broker (tansu on SeaweedFS) per test session, and
settings with topic names of their own per test so tests never see each other's records."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from imgflow.kafka import ensure_topics  # noqa: E402
from imgflow.settings import Settings  # noqa: E402


@pytest.fixture(scope="session")
def broker(tmp_path_factory) -> str:
    """Bootstrap address of a real broker on loopback. IMGFLOW_TEST_BOOTSTRAP reuses a
    running one (handy while developing); otherwise an embedded stack is started."""
    if os.environ.get("IMGFLOW_TEST_BOOTSTRAP"):
        yield os.environ["IMGFLOW_TEST_BOOTSTRAP"]
        return
    from imgflow.stack import EmbeddedStack

    data = tmp_path_factory.mktemp("broker")
    stack = EmbeddedStack(data, port=0, log_file=data / "broker.log").start()
    try:
        yield stack.bootstrap
    finally:
        stack.stop()


def make_settings(broker: str, tmp_path: Path, **overrides) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    base = {
        "kafka": {"bootstrap": broker},
        "topics": {"new": f"t{suffix}.new", "new_high": f"t{suffix}.new.high", "vision": f"t{suffix}.vision",
                   "enriched": f"t{suffix}.enriched", "dlq": f"t{suffix}.dlq", "partitions": 3},
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
    env.update({
        "IMGFLOW_KAFKA__BOOTSTRAP": settings.kafka.bootstrap,
        "IMGFLOW_TOPICS__NEW": t.new, "IMGFLOW_TOPICS__NEW_HIGH": t.new_high, "IMGFLOW_TOPICS__VISION": t.vision,
        "IMGFLOW_TOPICS__ENRICHED": t.enriched, "IMGFLOW_TOPICS__DLQ": t.dlq,
        "IMGFLOW_TOPICS__PARTITIONS": str(t.partitions),
        "IMGFLOW_DATA_DIR": str(settings.data_dir), "IMGFLOW_SINK__OUT_DIR": str(settings.sink.out_dir),
        "IMGFLOW_STAGE__MAX_WAIT_S": str(settings.stage.max_wait_s),
        "IMGFLOW_STAGE__RETRY_BACKOFF_S": str(settings.stage.retry_backoff_s),
        "IMGFLOW_STAGE__BATCH_SIZE": str(settings.stage.batch_size),
        "IMGFLOW_WATCH__POLL_INTERVAL_S": str(settings.watch.poll_interval_s),
        "IMGFLOW_WATCH__SETTLE_S": str(settings.watch.settle_s),
        "IMGFLOW_ALLOWED_ROOTS": "[" + ",".join(f'"{r}"' for r in settings.allowed_roots) + "]",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("IMGFLOW_CRASH_AT", None)
    return env
