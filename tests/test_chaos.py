"""Crash anywhere: stages SIGKILLed at random and restarted, the broker killed and
restarted, then every image must be in the CSV and the Avro files exactly once, with the
right content. The long form (200+ images, 20+ kills) is `make test-long` /
`benchmarks/chaos_long.py`."""

from __future__ import annotations

import pytest

from tests.chaos import ROLES, run_chaos


def check(report) -> None:
    detail = report.as_dict()
    assert report.lost == 0, detail
    assert report.duplicates == 0 and report.avro_duplicates == 0, detail
    assert report.rows == report.images and report.avro_rows == report.images, detail
    assert report.wrong_content == [] and report.error_rows == [], detail
    assert report.leftover_temp_files == 0, detail
    assert all(report.kills[r] >= 1 for r in ROLES), detail
    assert report.unclean_exits == {}, f"SIGTERM must stop every process with exit 0: {detail}"


def test_quick_chaos(tmp_path, engine):
    report = run_chaos(tmp_path, images=24, kills=8, broker_restarts=1, seed=7, kill_interval=(2.0, 4.0), engine=engine)
    print(report.as_dict())
    check(report)
    assert report.broker_restarts == 1
    assert report.sink_mid_write_crashes >= 1


@pytest.mark.slow
def test_long_chaos(tmp_path, engine):
    report = run_chaos(tmp_path, images=200, kills=24, broker_restarts=2, seed=11, kill_interval=(3.0, 6.0), engine=engine)
    print(report.as_dict())
    check(report)
    assert report.total_kills >= 20
