"""imgflow run's progress: counts, the rate since the stages began to work, and the ETA."""

from __future__ import annotations

from imgflow.app.progress import Progress, RecentKeys


def test_the_rate_starts_with_the_first_vision_result_and_gives_an_eta(capsys):
    progress = Progress(total=100)  # output is not a terminal here: a line every 5 s
    assert not progress.tty
    # Models loading: nothing counts yet, whatever time passes.
    assert progress.rate(0.0, 0, working=False) == 0.0
    assert progress.rate(40.0, 0, working=False) == 0.0
    assert progress.rate(41.0, 0, working=True) == 0.0  # the first vision result
    assert progress.rate(51.0, 20, working=True) == 2.0  # 20 rows in the 10 s since
    progress.show(found=100, vision=40, enriched=25, failed=1, written=25, errors=1, new_rows=25, elapsed=53, now=53.0)
    line = capsys.readouterr().out
    assert line.startswith("written 25/100 | ")
    assert "2.08 img/s | ETA 0:00:36 | 53s" in line  # 25 rows in the 12 s since: 75 left
    assert "found 100 · vision 40 · enriched 25 · failed 1 · 1 with errors" in line
    # Within the 5 s the next line waits: not printed, unless it is the last state (--once done).
    progress.show(found=100, vision=100, enriched=99, failed=1, written=99, errors=1, new_rows=99, elapsed=54, now=54.0)
    assert capsys.readouterr().out == ""
    progress.show(found=100, vision=100, enriched=100, failed=1, written=100, errors=1, new_rows=100, elapsed=55, now=55.0, final=True)
    assert capsys.readouterr().out.startswith("written 100/100 | ")


def test_recent_keys_count_distinct_keys_in_bounded_memory():
    keys = RecentKeys(window=100)
    for i in range(10_000):
        keys.add(f"k{i}".encode())
        keys.add(f"k{i}".encode())  # a repeat close by: not counted
        if i >= 50:
            keys.add(f"k{i - 50}".encode())  # one 50 keys back: not counted either
    assert keys.count == 10_000
    assert len(keys._seen) <= 100
