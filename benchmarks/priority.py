"""What the high-priority check costs the stage loop, side by side in one run.

The toy transform (no model: the loop's own overhead is all there is to see) drains a backlog
of N normal events twice per round: with the loop as it is (the high lane looked at alone
before each batch) and with a plain consume of both lanes (no priority). Then one high event
published behind the backlog: how many normal events were processed before it.

    python -m benchmarks.priority [--events 400] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from imgflow.app.stack import EmbeddedStack
from imgflow.kafka import ensure_topics
from imgflow.settings import Settings
from imgflow.stage import StageRunner
from tests.kafka_helpers import produce_events
from tests.test_stage_loop import committed, events
from tests.toy_stage import ToyTransform

RESULTS = Path(__file__).resolve().parent / "results" / "priority.json"


class PlainRunner(StageRunner):
    """The loop without the priority check: one consume over both lanes."""

    def _consume(self):
        return self.consumer.consume(self.transform.batch_size(self.settings), self.settings.stage.max_wait_s)


class OrderToy(ToyTransform):
    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.order: list[str] = []

    def process(self, records):
        self.order += [r.value["image_path"] for r in records]
        return super().process(records)


def drain(bootstrap: str, data: Path, name: str, runner_cls, n: int, high: bool) -> tuple[float, int | None]:
    settings = Settings(
        kafka={"bootstrap": bootstrap},
        data_dir=data,
        stage={"batch_size": 8, "max_wait_s": 0.5},
        topics={"new": f"{name}.new", "new_high": f"{name}.high", "vision": f"{name}.vision", "enriched": f"{name}.enriched", "dlq": f"{name}.dlq"},
    )
    ensure_topics(settings)
    produce_events(settings, events([f"n{i:05d}.jpg" for i in range(n)]))
    if high:
        produce_events(settings, events(["high.jpg"]), topic=settings.topics.new_high)
    transform = OrderToy(settings)
    runner = runner_cls(transform, settings, group_id=f"g-{name}")
    thread = threading.Thread(target=runner.run, daemon=True)
    started = time.monotonic()
    thread.start()
    while committed(settings, f"g-{name}", settings.topics.new) < n:
        time.sleep(0.1)
    seconds = time.monotonic() - started
    runner.request_stop()
    thread.join(30)
    position = transform.order.index("/imgs/high.jpg") if high else None
    return seconds, position


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imgflow-bench-priority-"))
    stack = EmbeddedStack(work / "broker", port=0, log_file=work / "broker.log").start()
    runs = {"priority": [], "plain": []}
    try:
        for r in range(args.rounds):
            for kind, cls in (("priority", StageRunner), ("plain", PlainRunner)):
                runs[kind].append(drain(stack.bootstrap, work / "data", f"{kind}{r}", cls, args.events, high=True))
    finally:
        stack.stop()
    result = {kind: {"seconds": [round(s, 2) for s, _ in v], "normal_before_high": [p for _, p in v]} for kind, v in runs.items()}
    result["events"] = args.events
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print("| loop | drain seconds (each round) | normal events processed before the high one |\n|---|---|---|")
    for kind in ("priority", "plain"):
        print(f"| {kind} | {', '.join(map(str, result[kind]['seconds']))} | {', '.join(map(str, result[kind]['normal_before_high']))} |")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
