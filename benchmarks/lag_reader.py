"""What the consumer-lag reader (imgflow/lag.py) costs: seconds per round and memory, with a
backlog of N records on a 3-partition topic of the embedded broker.

    .venv/bin/python -m benchmarks.lag_reader                  # 10k and 100k records
    .venv/bin/python -m benchmarks.lag_reader --records 1000000

For each size: an embedded stack (tansu on SeaweedFS), N records of 1 KB produced, nothing
committed. Then, in one run, side by side: the first round (reads the whole backlog), a round
with nothing new (what a stage pays every 5 s when idle), a round after 1,000 new records,
and a round after the group committed everything (the backlog is dropped). It checks each
lag it reports against the true one and prints the peak RSS of the process.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, action="append", help="backlog sizes (default 10000, 100000)")
    args = parser.parse_args()
    from confluent_kafka import Consumer, Producer, TopicPartition

    from imgflow.app.stack import EmbeddedStack
    from imgflow.kafka import consumer_config, ensure_topics, producer_config
    from imgflow.lag import LagReader
    from imgflow.settings import Settings
    from imgflow.topics import TopicSpec

    print(f"{'records':>9} {'first round s':>14} {'idle round s':>13} {'+1000 round s':>14} {'after commit s':>15} {'peak RSS MiB':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        stack = EmbeddedStack(Path(tmp) / "stack", port=0, log_file=Path(tmp) / "stack.log").start()
        try:
            for n in args.records or [10_000, 100_000]:
                topic, group = f"lagbench.{n}.{time.time_ns()}", f"lagbench-{n}"
                settings = Settings(kafka={"bootstrap": stack.bootstrap})
                ensure_topics(settings, [TopicSpec(topic, 3, "")])
                producer = Producer(producer_config(settings, **{"linger.ms": 50}))
                value = b"x" * 1000

                def produce(count: int, producer: Producer = producer, topic: str = topic, value: bytes = value) -> None:
                    for i in range(count):
                        producer.produce(topic, key=str(i), value=value, partition=i % 3)
                        if i % 10000 == 0:
                            producer.poll(0)
                    assert producer.flush(120) == 0

                produce(n)
                reader = LagReader(settings, "bench", group, [topic])
                t0 = time.perf_counter()
                lag = reader.read_once()
                first = time.perf_counter() - t0
                assert sum(lag.values()) == n, lag
                t0 = time.perf_counter()
                reader.read_once()
                idle = time.perf_counter() - t0
                produce(1000)
                t0 = time.perf_counter()
                lag = reader.read_once()
                more = time.perf_counter() - t0
                assert sum(lag.values()) == n + 1000, lag
                ends = {tp: reader.position[tp] for tp in lag}
                committer = Consumer(consumer_config(settings, group))
                committer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in ends.items()], asynchronous=False)
                committer.close()
                t0 = time.perf_counter()
                lag = reader.read_once()
                after = time.perf_counter() - t0
                assert sum(lag.values()) == 0, lag
                reader.stop()
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                print(f"{n:>9} {first:>14.2f} {idle:>13.3f} {more:>14.3f} {after:>15.3f} {rss:>13.0f}")
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
