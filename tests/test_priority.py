"""images.new.high is drained before images.new, by the shared stage loop on the real broker:
an image published to the high lane behind 200 normal ones is processed among the first few,
whether it was there before the stage started or arrives while the backlog is being worked."""

from __future__ import annotations

import threading
import time

from imgflow.stage import StageRunner
from tests.kafka_helpers import produce_events, wait_until
from tests.test_stage_loop import events
from tests.toy_stage import ToyTransform


class RecordingToy(ToyTransform):
    """The toy transform, a little slow (like a model), remembering the order it saw images in."""

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.order: list[str] = []

    def process(self, records):
        time.sleep(0.05)
        self.order += [r.value["image_path"] for r in records]
        return super().process(records)


def test_high_lane_overtakes_a_backlog_of_200(settings):
    settings = settings.model_copy(update={"stage": settings.stage.model_copy(update={"batch_size": 8})})
    produce_events(settings, events([f"n{i:03d}.jpg" for i in range(200)]))
    produce_events(settings, events(["high-first.jpg"]), topic=settings.topics.new_high)
    transform = RecordingToy(settings)
    runner = StageRunner(transform, settings, group_id="g-priority")
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        # Published behind 200 normal ones, before the stage started.
        wait_until(lambda: "/imgs/high-first.jpg" in transform.order, 60, 0.05, "the first high-priority image")
        first = transform.order.index("/imgs/high-first.jpg")
        assert first < 8, f"high-priority image processed as number {first + 1}: {transform.order[: first + 1]}"
        # Published while the normal backlog is being worked through.
        wait_until(lambda: len(transform.order) >= 40, 60, 0.05, "40 normal images processed")
        produce_events(settings, [dict(events(["high-later.jpg"])[0], version="x", event_id="high-later")], topic=settings.topics.new_high)
        # Counted from when the publish returned (the producer's own start-up is not the stage's delay).
        seen_before = len(transform.order)
        wait_until(lambda: "/imgs/high-later.jpg" in transform.order, 60, 0.05, "the second high-priority image")
        later = transform.order.index("/imgs/high-later.jpg") - seen_before
        normal_left = 200 - sum(1 for p in transform.order if "/n" in p)
        assert normal_left > 50, f"the test must publish the second image while a backlog remains ({later}, {seen_before})"
        assert later < 8 * 4, f"{later} normal images were processed after the high-priority one was published"
    finally:
        runner.request_stop()
        thread.join(30)


def test_an_empty_high_lane_does_not_pause_the_normal_one(settings):
    """Pausing drops the normal lane's prefetched records (read again from the broker): once
    the high lane is known to be drained, batches come from the normal lane unpaused; a
    high-priority image published then is still taken first."""
    settings = settings.model_copy(update={"stage": settings.stage.model_copy(update={"batch_size": 8})})
    produce_events(settings, events([f"a{i:03d}.jpg" for i in range(40)]))
    transform = RecordingToy(settings)
    runner = StageRunner(transform, settings, group_id="g-unpaused")
    pauses: list[int] = []
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: runner.consumer is not None and len(transform.order) >= 40, 60, 0.05, "40 images")
        runner.consumer = _CountingPauses(runner.consumer, pauses)
        produce_events(settings, [dict(e, event_id=f"b{i}") for i, e in enumerate(events([f"b{i:03d}.jpg" for i in range(40)]))])
        wait_until(lambda: len(transform.order) >= 80, 60, 0.05, "40 more images")
        assert pauses == [], "the normal lane was paused although the high lane was empty"
        produce_events(settings, [dict(events(["high.jpg"])[0], event_id="h1", version="h")], topic=settings.topics.new_high)
        wait_until(lambda: "/imgs/high.jpg" in transform.order, 60, 0.05, "the high-priority image")
    finally:
        runner.request_stop()
        thread.join(30)


class _CountingPauses:
    """The runner's consumer, counting pause() calls."""

    def __init__(self, consumer, calls: list[int]) -> None:
        self._consumer, self._calls = consumer, calls

    def pause(self, partitions):
        self._calls.append(len(partitions))
        return self._consumer.pause(partitions)

    def __getattr__(self, name):
        return getattr(self._consumer, name)
