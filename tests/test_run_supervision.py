"""`imgflow run` supervises its embedded broker like its stages: the broker runner killed
mid-run is started again and the run completes with every image exactly once; a run started
again right after `imgflow run` itself was killed -9 waits for the old stack to stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from skimage import data

from tests.kafka_helpers import wait_until
from tests.test_end_to_end import IMGFLOW, ROOT, avro_rows, descendants, env, rows


def images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sources = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    for i in range(count):
        Image.fromarray(sources[i % 4]).resize((160 + 4 * i, 120 + 3 * i)).save(folder / f"img_{i:02d}.jpg")
    old = time.time() - 10
    for p in folder.iterdir():
        os.utime(p, (old, old))


def runner_of(pid: int, broker_dir: Path) -> int:
    """The `python -m infra.embedded` process of the `imgflow run` with this pid."""
    for child in descendants(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"infra.embedded" in argv and str(broker_dir).encode() in argv:
            return child
    raise AssertionError(f"no broker runner under pid {pid}")


def assert_exactly_once(out: Path, folder: Path) -> None:
    result = rows(out)
    assert sorted(Path(r["image_path"]).name for r in result) == sorted(p.name for p in folder.iterdir())
    assert len({r["event_id"] for r in result}) == len(result)
    assert sorted(r["event_id"] for r in avro_rows(out)) == sorted(r["event_id"] for r in result)
    assert all(r["error"] == "" for r in result), [r["error"] for r in result if r["error"]]


def test_a_killed_broker_runner_is_restarted_and_the_run_completes_exactly_once(tmp_path, engine):
    folder, out, data_dir = tmp_path / "images", tmp_path / "out", tmp_path / "data"
    images(folder, 16)
    log = tmp_path / "run.out"
    argv = [*IMGFLOW, "run", str(folder), "--once", "--out", str(out), "--data-dir", str(data_dir), "--port", "0", "--engine", engine]
    with log.open("wb") as f:
        run = subprocess.Popen(argv, cwd=ROOT, env={**env(), "IMGFLOW_MODELS__LLM": "smollm2-135m"}, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: (out / "results.csv").exists() and len(rows(out)) >= 1, 600, what="a first result row")
        written_before = len(rows(out))
        os.kill(runner_of(run.pid, data_dir / "broker"), signal.SIGKILL)
        assert run.wait(900) == 0, log.read_text()[-4000:]
    finally:
        if run.poll() is None:
            run.kill()
    said = log.read_text()
    assert "the embedded broker exited (-9): restarting it" in said and "broker back at" in said, said[-4000:]
    assert_exactly_once(out, folder)
    assert len(rows(out)) == 16 and written_before < 16, written_before
    # librdkafka's own lines go through our logger, each kind once a minute: no flood.
    refused = [line for line in said.splitlines() if "Connection refused" in line or "Connect to" in line]
    assert len(refused) <= 4, refused


def _dead(pid: int) -> bool:
    """Gone or a zombie: its files and sockets are closed."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_stopping_with_the_broker_gone_does_not_wait_for_it(tmp_path):
    """SIGTERM while the broker cannot come back (its runner is held stopped): the stages are
    stopped at once, nothing waits on a commit that cannot happen; the next run completes."""
    folder, out, data_dir = tmp_path / "images", tmp_path / "out", tmp_path / "data"
    images(folder, 8)
    log = tmp_path / "run.out"
    argv = [*IMGFLOW, "run", str(folder), "--out", str(out), "--data-dir", str(data_dir), "--port", "0"]
    e = {**env(), "IMGFLOW_MODELS__LLM": "smollm2-135m"}
    with log.open("wb") as f:
        run = subprocess.Popen(argv, cwd=ROOT, env=e, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: (out / "results.csv").exists() and len(rows(out)) >= 1, 600, what="a first result row")
        runner = runner_of(run.pid, data_dir / "broker")
        family = [runner, *descendants(runner)]
        os.kill(run.pid, signal.SIGSTOP)  # so that it cannot restart the broker before it is told to stop
        for pid in family:
            os.kill(pid, signal.SIGKILL)
        # kill() returns before the process is gone: on a loaded machine tansu can still hold
        # its port for a moment, and `run` must see the broker down, as after a real crash.
        wait_until(lambda: all(_dead(pid) for pid in family), 30, interval=0.05, what="the killed processes gone")
        os.kill(run.pid, signal.SIGTERM)
        os.kill(run.pid, signal.SIGCONT)
        assert run.wait(120) == 0, log.read_text()[-4000:]
    finally:
        if run.poll() is None:
            run.kill()
    said = log.read_text()
    assert "the broker is down: stopping every stage now" in said, said[-3000:]
    again = subprocess.run([*argv, "--once"], cwd=ROOT, env=e, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert_exactly_once(out, folder)


def test_run_again_right_after_a_kill_9_waits_for_the_old_stack(tmp_path):
    """kill -9 of `imgflow run` alone: its broker runner notices and stops tansu and SeaweedFS,
    which takes seconds. The same command run again at once waits for that (saying so, when it
    has to) and completes every image exactly once."""
    folder, out, data_dir = tmp_path / "images", tmp_path / "out", tmp_path / "data"
    images(folder, 8)
    argv = [*IMGFLOW, "run", str(folder), "--out", str(out), "--data-dir", str(data_dir), "--port", "0"]
    e = {**env(), "IMGFLOW_MODELS__LLM": "smollm2-135m"}
    first = subprocess.Popen(argv, cwd=ROOT, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: (out / "results.csv").exists() and len(rows(out)) >= 1, 600, what="a first result row")
        runner = runner_of(first.pid, data_dir / "broker")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    second = subprocess.run([*argv, "--once"], cwd=ROOT, env=e, capture_output=True, text=True, timeout=900)
    said = second.stdout + second.stderr
    assert second.returncode == 0, said[-4000:]
    assert "is in use by another running stack" not in said
    assert not Path(f"/proc/{runner}").exists()
    print("the second run waited for the first's stack" if "is still stopping" in said else "the first's stack had stopped before the second run looked")
    assert_exactly_once(out, folder)


def test_waiting_for_an_earlier_stack_and_refusing_a_live_one(tmp_path, capsys):
    """The wait itself, deterministic: a stack whose command is alive is another run's
    (refused at once, naming that command); once that command is killed -9 its stack stops,
    and the wait says so and returns when it has."""
    from imgflow.app.stack import StackError
    from imgflow.app.stack_processes import wait_for_earlier_stack

    broker_dir = tmp_path / "broker"
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from imgflow.app.stack import EmbeddedStack; "
            f"s = EmbeddedStack(Path({str(broker_dir)!r}), port=0).start(); print('ready', flush=True); time.sleep(600)",
        ],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout.readline().strip() == "ready"
        with pytest.raises(StackError, match=f"in use by another running stack \\(the command with pid {owner.pid}\\)"):
            wait_for_earlier_stack(broker_dir)
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        wait_for_earlier_stack(broker_dir)
    finally:
        if owner.poll() is None:
            owner.kill()
    said = capsys.readouterr().out
    assert "is still stopping: its command is gone; waiting for it to finish" in said
    assert "the earlier stack has stopped" in said


def test_one_outage_is_one_line_a_minute_whichever_broker_address_or_callback_reports_it(caplog):
    """librdkafka reports one refused connection through its log (with a facility and thread
    prefix) and its error callback, per broker address (bootstrap, the broker's id, the group
    coordinator), with a growing repeat count: measured under a killed broker, each of those
    was a line of its own."""
    import logging

    from imgflow import kafka

    kafka._last_logged.clear()
    seen = [
        "FAIL [rdkafka#consumer-1] [thrd:127.0.0.1:60873/111]: 127.0.0.1:60873/111: Connect to ipv4#127.0.0.1:60873 "
        "failed: Connection refused (after 0ms in state CONNECT)",
        "FAIL [rdkafka#consumer-1] [thrd:GroupCoordinator]: GroupCoordinator: 127.0.0.1:60873: Connect to "
        "ipv4#127.0.0.1:60873 failed: Connection refused (after 0ms in state CONNECT)",
        "127.0.0.1:60873/bootstrap: Connect to ipv4#127.0.0.1:60873 failed: Connection refused (after 0ms in state CONNECT)",
        "127.0.0.1:60873/bootstrap: Connect to ipv4#127.0.0.1:60873 failed: Connection refused (after 12ms in state CONNECT, 4 identical error(s) suppressed)",
    ]
    with caplog.at_level(logging.WARNING, logger="imgflow.kafka"):
        for text in seen * 5:
            kafka._log_once_a_minute(logging.WARNING, text)
        kafka._log_once_a_minute(logging.WARNING, "1/1 brokers are down")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "Connection refused" in lines[0] and "brokers are down" in lines[1]
    kafka._last_logged.clear()
