"""Memory of every process of ``imgflow run --once`` over many images with the fast models.

    .venv/bin/python -m benchmarks.memory [--images 1000] [--size 160]

Images: the mixed set (photos, rendered text) shrunk to ``--size`` px so that a long run is
quick; the LLM is SmolLM2-135M (``IMGFLOW_MODELS__LLM=smollm2-135m``), everything else the
defaults. RSS of each child (broker runner, watcher, vision, enrich, sink) is sampled every
second from /proc. Reports per process: RSS after warm-up (when a quarter of the rows are
written), at half and three quarters, at the end, the growth from warm-up to the end, and
the peak. Prints a table; JSON in
benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.perf_common import children_of, cmdline, mixed_images, print_table, rss_mb, write_result


def role_of(pid: int) -> str:
    cmd = cmdline(pid)
    for role in ("vision", "enrich", "sink"):
        if f"stage {role}" in cmd:
            return role
    if "watch" in cmd:
        return "watcher"
    if "infra.embedded" in cmd:
        return "broker runner"
    return cmd.split(" ")[0].rsplit("/", 1)[-1] or str(pid)


def rows_written(out: Path) -> int:
    """Rows the sink has committed (parsed: a quoted field may hold a newline)."""
    try:
        length = int((out / ".results.csv.committed").read_text().split()[0])
        with open(out / "results.csv", "rb") as f:
            text = f.read(length).decode("utf-8", errors="replace")
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, sum(1 for _ in csv.reader(io.StringIO(text))) - 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=160, help="longest side of the images (default 160)")
    ap.add_argument("--llm", default="smollm2-135m")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images, out = tmp / "images", tmp / "out"
        print(f"writing {args.images} images ...", flush=True)
        mixed_images(images, args.images, size=args.size)
        env = dict(os.environ, IMGFLOW_MODELS__LLM=args.llm)
        env.pop("IMGFLOW_DATA_DIR", None)
        started = time.time()
        proc = subprocess.Popen(
            [sys.executable, "-m", "imgflow", "run", str(images), "--out", str(out), "--once", "--data-dir", str(tmp / "data")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        samples: dict[str, list[tuple[float, int, float]]] = {}  # role -> (t, rows, rss)
        try:
            while proc.poll() is None:
                now, rows = time.time() - started, rows_written(out)
                pids = children_of(proc.pid)
                pids += [c for p in pids for c in children_of(p)]  # the broker runner's children
                for pid in [proc.pid, *pids]:  # a process that just exited has no RSS: no sample
                    mb = rss_mb(pid)
                    if mb is not None:
                        role = "imgflow run" if pid == proc.pid else role_of(pid)
                        samples.setdefault(role, []).append((now, rows, mb))
                time.sleep(1.0)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(60)
        wall = time.time() - started
        total = rows_written(out)
    if proc.returncode != 0:
        raise SystemExit(f"imgflow run exited {proc.returncode}")
    warm_rows = total // 4
    figures, table = {}, []

    def at(s, share: float) -> float:  # RSS when this share of the rows was written
        return next((mb for _, rows, mb in s if rows >= total * share), s[-1][2])

    for role, s in samples.items():
        after = [mb for _, rows, mb in s if rows >= warm_rows] or [s[-1][2]]
        warm, half, end, peak = after[0], at(s, 0.5), s[-1][2], max(mb for _, _, mb in s)
        figures[role] = {
            "rss_after_warmup_mb": warm,
            "rss_half_mb": half,
            "rss_three_quarters_mb": at(s, 0.75),
            "rss_end_mb": end,
            "growth_mb": end - warm,
            "peak_mb": peak,
            "max_after_warmup_mb": max(after),
            "samples": len(s),
        }
        table.append([role, round(warm), round(half), round(at(s, 0.75)), round(end), round(end - warm), round(peak)])
    print_table(
        f"memory: imgflow run --once, {total} images of {args.size} px in {wall:.0f}s, LLM {args.llm}",
        ["process", "RSS at 25 % MB", "at 50 %", "at 75 %", "at the end", "growth 25 % -> end", "peak MB"],
        table,
    )
    write_result("memory", {"images": total, "size_px": args.size, "llm": args.llm, "wall_s": wall, "processes": figures})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
