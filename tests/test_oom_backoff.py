"""CUDA out-of-memory back-off in the vision stage, on the real broker.

The vision stage runs the production adapters (tiny random Qwen2-VL, open_clip, FastText,
the shipped MiniLM folder) in a real ``StageRunner``; the describer is wrapped so that it
raises ``torch.cuda.OutOfMemoryError`` for batches above ``LIMIT`` images (the one
simulated part: there is no GPU here). The loop halves a failing batch down to a size that
fits: every image gets its VisionResult, nothing goes to the dead-letter topic, and the
``imgflow_batch_size`` histogram only shows batches that fit.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import threading

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client import REGISTRY

from consumers.vision import VisionTransform
from imgflow.events import local_image_event
from imgflow.models.base import Describer
from imgflow.models.cache import ModelCache
from imgflow.models.cuda import oom_guard
from imgflow.models.embedded.minilm import model_dir as minilm_dir
from imgflow.models.registry import build_vision_models
from imgflow.stage import StageRunner
from tests.conftest import make_settings
from tests.kafka_helpers import decoded, produce_events, wait_until
from tests.tiny_models import build_tiny_clip, build_tiny_fasttext, build_tiny_qwen2vl

LIMIT = 2
N_IMAGES = 16


class OomAbove(Describer):
    """Delegates to a real describer; a batch above ``limit`` images raises CUDA OOM."""

    def __init__(self, inner: Describer, limit: int) -> None:
        self.inner = inner
        self.limit = limit
        self.attempts: list[tuple[int, bool]] = []  # (batch size, succeeded)
        self.lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    def describe(self, images, seen_text):
        ok = len(images) <= self.limit
        with self.lock:
            self.attempts.append((len(images), ok))
        with oom_guard("simulated"):
            if not ok:
                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (simulated, batch of {len(images)})")
        return self.inner.describe(images, seen_text)


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("oom-models")
    cfg, weights = build_tiny_clip(d / "clip")
    return {
        "vlm": str(build_tiny_qwen2vl(d / "vlm")),
        "clip": f"{cfg}:{weights}",
        "sentence": str(minilm_dir()),
        "word_vectors": str(build_tiny_fasttext(d / "ft.bin")),
    }


def hist(stage: str) -> dict[str, float]:
    out = {
        "count": REGISTRY.get_sample_value("imgflow_batch_size_count", {"stage": stage}) or 0.0,
        "sum": REGISTRY.get_sample_value("imgflow_batch_size_sum", {"stage": stage}) or 0.0,
    }
    for le in ("1.0", "2.0", "4.0", "8.0"):
        out[le] = REGISTRY.get_sample_value("imgflow_batch_size_bucket", {"stage": stage, "le": le}) or 0.0
    return out


def test_cuda_oom_halves_the_batch_and_loses_nothing(broker, tmp_path, model_paths):
    images = tmp_path / "images"
    images.mkdir()
    rs = np.random.RandomState(0)
    paths = []
    for i in range(N_IMAGES):
        p = images / f"img{i:02d}.png"
        Image.fromarray(rs.randint(0, 255, (60, 80, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    settings = make_settings(
        broker,
        tmp_path,
        allowed_roots=[images],
        stage={"batch_size": 8, "max_wait_s": 2.0, "max_attempts": 2},
        models={"profile": "gpu", "device": "cpu", "vlm_max_new_tokens": 3, "vlm_text_max_new_tokens": 2, **model_paths},
    )
    models = build_vision_models(settings, ModelCache(5))
    describer = OomAbove(models.describer, LIMIT)
    models.describer = describer
    events = [local_image_event(p, p.stat(), source="test", run_id="oom") for p in paths]
    produce_events(settings, events)

    before = hist("vision")
    runner = StageRunner(VisionTransform(settings, models=models), settings, group_id="g-oom")
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        results = wait_until(
            lambda: (r := decoded(settings, settings.topics.vision, "VisionResult")) and len(r) >= N_IMAGES and r, 240, interval=1, what="every VisionResult"
        )
    finally:
        runner.request_stop()
        thread.join(60)
    assert not thread.is_alive()

    # every image processed exactly once, none dead-lettered
    assert sorted(r["event"]["event_id"] for r in results) == sorted(e["event_id"] for e in events)
    assert decoded(settings, settings.topics.dlq, "DeadLetter") == []
    for r in results:
        assert r["models"]["describe"].startswith("qwen2-vl:vlm@")
        assert r["models"]["embed_image"].startswith("open_clip:tiny-clip@")
        assert len(r["image_vector"]) == 32 and len(r["word2vec_vector"]) == 16 and len(r["text_vector"]) == 384

    # the back-off: batches above LIMIT failed and were halved (8 -> 4 -> 2 ...)
    attempts = describer.attempts
    assert any(not ok for _, ok in attempts), attempts
    assert max(size for size, _ in attempts) > LIMIT
    for (size, ok), (nxt, _) in zip(attempts, attempts[1:]):
        if not ok:
            assert nxt == size // 2, attempts  # a failed batch is retried as its first half
    assert all(ok == (size <= LIMIT) for size, ok in attempts)
    assert sum(size for size, ok in attempts if ok) == N_IMAGES  # nothing described twice

    # the batch-size histogram shows only batches that fit, and every image in them
    after = hist("vision")
    delta = {k: after[k] - before[k] for k in after}
    assert delta["sum"] == N_IMAGES
    assert delta["count"] == sum(1 for _, ok in attempts if ok)
    assert delta["2.0"] == delta["count"]  # no successful batch above LIMIT
