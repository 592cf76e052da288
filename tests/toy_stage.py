"""A deliberately simple transform to test the shared loop itself (the real stages are
tested with real models elsewhere). Behaviour is chosen by the event's image_path:
'bad' -> BadInput, 'flaky' -> fails on its first attempt, 'poison' -> always fails,
'oom' -> the whole batch raises while it holds more than one record.

Run as a process: ``python -m tests.toy_stage`` (settings from IMGFLOW_* variables)."""

from __future__ import annotations

import os
from collections import Counter

from imgflow.errors import BadInput
from imgflow.settings import Settings
from imgflow.stage import InputRecord, OutputRecord, StageRunner, Transform, install_signal_handlers


class ToyTransform(Transform):
    name = "toy"
    input_schema = "ImageEvent"
    output_schemas = ["ImageEvent"]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.attempts: Counter[str] = Counter()
        self.batch_sizes: list[int] = []

    def input_topics(self, settings: Settings) -> list[str]:
        return [settings.topics.new_high, settings.topics.new]

    def process(self, records: list[InputRecord]):
        self.batch_sizes.append(len(records))
        if len(records) > 1 and any("oom" in r.value["image_path"] for r in records):
            raise MemoryError(f"simulated out of memory for a batch of {len(records)}")
        out: list = []
        for rec in records:
            path = rec.value["image_path"]
            self.attempts[rec.event_id] += 1
            if "bad" in path:
                out.append(BadInput(f"bad input: {path}"))
            elif "poison" in path or ("flaky" in path and self.attempts[rec.event_id] == 1):
                out.append(RuntimeError(f"model failed on {path}"))
            else:
                value = dict(rec.value, source=f"toy:{os.getpid()}")
                out.append([OutputRecord(self.settings.topics.vision, "ImageEvent", value, rec.event_id)])
        return out


if __name__ == "__main__":
    from imgflow.logs import setup_logging

    setup_logging()
    settings = Settings()
    transform = ToyTransform(settings)
    if os.environ.get("TOY_DELAY_S"):  # a little slow, like a model: a run long enough to disturb
        import time

        plain = transform.process
        transform.process = lambda records: (time.sleep(float(os.environ["TOY_DELAY_S"])), plain(records))[1]
    runner = StageRunner(transform, settings, group_id=os.environ.get("TOY_GROUP"))
    install_signal_handlers(runner)
    runner.run()
