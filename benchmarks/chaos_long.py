"""The long chaos run, on demand: `python -m benchmarks.chaos_long [--images 200 --kills 24]`.
Prints the figures (images, kills per stage, broker restarts, rows, duplicates, lost)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tests.chaos import run_chaos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--broker-restarts", type=int, default=2)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the run here (default: a temp dir)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="imgflow-chaos-"))
    report = run_chaos(workdir, args.images, args.kills, args.broker_restarts, args.seed, kill_interval=(3.0, 6.0))
    print(json.dumps(report.as_dict(), indent=2))
    print(f"work dir (logs, output): {workdir}")


if __name__ == "__main__":
    main()
