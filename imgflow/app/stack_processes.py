"""The embedded stack's processes as the runner records them (``DIR/stack.json``) and as
/proc shows them: killing and releasing one (fault tests), and waiting for an earlier stack
on the same data dir to be gone."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time
from pathlib import Path

from imgflow.errors import ImgflowError


class StackError(ImgflowError, RuntimeError):
    """The embedded stack failed to start, or the broker did not answer in time."""


class StackProcesses:
    """What ``EmbeddedStack`` knows of the runner's processes, from its stack.json."""

    data_dir: Path

    @property
    def stack_file(self) -> Path:
        return self.data_dir / "stack.json"

    def info(self) -> dict:
        """The runner's current stack.json (pids change when it restarts a process)."""
        try:
            return json.loads(self.stack_file.read_text())
        except (OSError, ValueError) as e:
            raise StackError(f"cannot read {self.stack_file}: {e}") from e

    def engine_pids(self) -> list[int]:
        """The engine's process ids (broker, SeaweedFS, Kafka nodes); none when unreadable."""
        try:
            info = self.info()
        except StackError:
            return []
        pids = [v for k, v in info.items() if k.endswith("_pid") and isinstance(v, int)]
        pids += [n["pid"] for n in info.get("nodes", []) if isinstance(n, dict) and isinstance(n.get("pid"), int)]
        return pids

    @staticmethod
    def _kill(pid: int, hold_file: str, hold: bool) -> None:
        if hold:
            Path(hold_file).touch()
        os.kill(pid, signal.SIGKILL)

    @staticmethod
    def _release(hold_file: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            Path(hold_file).unlink()

    def kill_broker(self, hold: bool = False) -> None:
        """SIGKILL the broker process only (tansu, or the first Kafka node; fault tests): the
        runner restarts it at once, or with ``hold`` only after ``release_broker``."""
        info = self.info()
        self._kill(int(info["broker_pid"]), info["broker_hold_file"], hold)

    def release_broker(self) -> None:
        """Let the runner restart a broker killed with ``hold``."""
        self._release(self.info()["broker_hold_file"])

    def node(self, node_id: int) -> dict:
        """A Kafka node's entry of stack.json (pid, port, hold_file)."""
        for node in self.info().get("nodes", []):
            if node["node_id"] == node_id:
                return node
        raise StackError(f"no Kafka node {node_id} in {self.stack_file}")

    def kill_node(self, node_id: int, hold: bool = False) -> None:
        """SIGKILL one Kafka node. ``hold``: the runner leaves it down until ``release_node``."""
        node = self.node(node_id)
        self._kill(int(node["pid"]), node["hold_file"], hold)

    def release_node(self, node_id: int) -> None:
        """Let the runner restart a held node (on its ports and data)."""
        self._release(self.node(node_id)["hold_file"])

    def kill_s3(self, hold: bool = False) -> None:
        """SIGKILL SeaweedFS only (fault tests; tansu engine): the runner restarts it at once,
        or with ``hold`` only after ``release_s3`` (an outage of a known length)."""
        info = self.info()
        self._kill(int(info["weed_pid"]), info["s3_hold_file"], hold)

    def release_s3(self) -> None:
        """Let the runner restart a SeaweedFS killed with ``hold``."""
        self._release(self.info()["s3_hold_file"])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)


def runners_of(broker_dir: Path) -> list[tuple[int, int | None]]:
    """(pid, --parent-pid) of every ``python -m infra.embedded`` running on ``broker_dir``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode("utf-8", "replace").split("\0")
        except OSError:
            continue
        if "infra.embedded" not in argv or "--data-dir" not in argv:
            continue
        i = argv.index("--data-dir")
        if i + 1 >= len(argv) or Path(argv[i + 1]).resolve() != broker_dir.resolve():
            continue
        parent = argv[argv.index("--parent-pid") + 1] if "--parent-pid" in argv[:-1] else ""
        found.append((int(cmdline.parent.name), int(parent) if parent.isdigit() else None))
    return found


def wait_for_earlier_stack(broker_dir: Path, timeout: float = 120) -> None:
    """A stack whose command was killed (kill -9 of `imgflow run`) stops by itself, which takes
    a few seconds: wait for it, saying so, instead of failing on its data dir. A stack whose
    command is still running is another run's: StackError at once."""
    lock_path = broker_dir / ".stack.lock"
    if not lock_path.exists():
        return
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        with open(lock_path, "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
                if announced:
                    print("the earlier stack has stopped", flush=True)
                return
            except OSError:
                pass
        runners = runners_of(broker_dir)
        owners = [parent for _, parent in runners if parent is not None and parent != os.getpid() and alive(parent)]
        if owners:
            raise StackError(f"data dir {broker_dir} is in use by another running stack (the command with pid {owners[0]}): stop it, or use another --data-dir")
        if not announced:
            pids = ", ".join(str(pid) for pid, _ in runners) or "?"
            print(f"an earlier stack on {broker_dir} (pid {pids}) is still stopping: its command is gone; waiting for it to finish ...", flush=True)
            announced = True
        if time.monotonic() > deadline:
            raise StackError(f"the earlier stack on {broker_dir} did not stop within {timeout:.0f} s")
        time.sleep(0.5)
