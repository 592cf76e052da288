"""Observability, checked against real things: the lag reader against a broker whose true lag
the test knows; the Prometheus config and rules with the Debian promtool; and a real
Prometheus scraping a running `imgflow run`, asked every dashboard panel's query and every
alert expression."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from PIL import Image
from skimage import data

from imgflow.kafka import consumer_config, producer_config
from imgflow.lag import LagReader

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "infra" / "prometheus"
DASHBOARD = ROOT / "infra" / "grafana" / "dashboards" / "imgflow.json"


def _commit(settings, group: str, offsets: dict[int, int], topic: str) -> None:
    consumer = Consumer(consumer_config(settings, group))
    try:
        consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False)
    finally:
        consumer.close()


def test_lag_reader_counts_records_after_the_committed_offset(settings):
    """The true lag is known here: how many records were produced after the offset the test
    committed. The reader must find it on the embedded broker (whose end offsets are wrong),
    also with transaction markers in the partition, and 0 once everything is committed."""
    topic, group = settings.topics.vision, "lag-test-group"
    plain = Producer(producer_config(settings))
    offsets: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def delivered(err, msg):
        assert err is None, err
        offsets[msg.partition()].append(msg.offset())

    for partition, count in ((0, 7), (1, 3)):
        for i in range(count):
            plain.produce(topic, key=f"k{i}", value=b"x", partition=partition, on_delivery=delivered)
    assert plain.flush(30) == 0
    # Partition 2: three transactions of two records each (commit markers between them).
    txn = Producer(producer_config(settings, "lag-test-txn", on_delivery=delivered))
    txn.init_transactions(30)
    for _ in range(3):
        txn.begin_transaction()
        for i in range(2):
            txn.produce(topic, key=f"t{i}", value=b"y", partition=2)
        txn.commit_transaction(30)
    assert txn.flush(30) == 0

    reader = LagReader(settings, "enrich", group, [topic], interval_s=0.1)
    try:
        # Nothing committed: every record is lag.
        assert reader.read_once() == {(topic, 0): 7, (topic, 1): 3, (topic, 2): 6}
        # The group commits part of each partition (the offset after the record it handled).
        _commit(settings, group, {0: offsets[0][2] + 1, 1: offsets[1][2] + 1, 2: offsets[2][3] + 1}, topic)
        assert reader.read_once() == {(topic, 0): 4, (topic, 1): 0, (topic, 2): 2}
        # More records arrive; then the group catches up completely.
        for _ in range(5):
            plain.produce(topic, key="late", value=b"z", partition=1, on_delivery=delivered)
        assert plain.flush(30) == 0
        assert reader.read_once()[(topic, 1)] == 5
        _commit(settings, group, {p: offs[-1] + 1 for p, offs in offsets.items()}, topic)
        lag = reader.read_once()
        assert lag == {(topic, 0): 0, (topic, 1): 0, (topic, 2): 0}
        from imgflow import metrics

        assert metrics.CONSUMER_LAG.labels("enrich", topic, "2")._value.get() == 0
    finally:
        reader.stop()
