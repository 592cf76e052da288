"""The figures of benchmarks/search_index.py: percentiles and recall, the table on stdout,
the Markdown file (``--out``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from benchmarks.perf_common import machine, print_table


def percentiles(ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    hits = sum(len(set(f) & set(t[t >= 0])) for f, t in zip(found, truth))
    return hits / max(1, int((truth >= 0).sum()))


def _f(v, digits=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def write_md(args, results: list[dict]) -> None:
    if not args.out:
        return
    m = machine()
    lines = [
        "# Search index benchmark (issue 17, part 1)",
        "",
        f"- when: {m['when']}; machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, load (1 min) {m['load_avg_1m']}",
        f"- command: `{' '.join(['python -m benchmarks.search_index', *sys.argv[1:]])}`",
        f"- {args.queries} queries per case after {args.warmup} warm-up queries (flat scan at more "
        "than 200,000 rows: 30), k = 10; data: see `benchmarks/search_index.py` (docstring)",
        "",
        "| rows | dim | engine | config | filter | build s | build rows/s | p50 ms | p99 ms | recall@10 | open s | RSS MB (peak) |",
        "|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['rows']:,} | {r['dim']} | {r['engine']} | {r['config']} | "
            f"{'category' if r['filtered'] else '-'} | {_f(r['build_s'])} | {_f(r['build_rows_s'], 0)} | "
            f"{_f(r['p50_ms'], 2)} | {_f(r['p99_ms'], 2)} | {_f(r['recall'], 3)} | {_f(r['open_s'], 2)} | "
            f"{_f(r['rss_mb'], 0)} ({_f(r['peak_mb'], 0)}) |"
        )
    seen = {}
    for r in results:
        seen[(r["rows"], r["dim"])] = r
    lines += ["", "Data per case (exact cosine of the queries' 1st and 10th neighbour, of a random pair; Lance table write rate):", ""]
    lines += [
        f"- {k[0]:,} x {k[1]}: top-1 {r['top1']:.3f}, 10th {r['top10']:.3f}, random {r['random']:.3f}; write {r['write_rows_s']:,.0f} rows/s"
        for k, r in seen.items()
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    body = "\n".join(lines) + "\n"
    path = Path(args.out)
    old = path.read_text() if path.exists() else ""
    marker = "<!-- figures end -->"
    if marker in old:  # keep the hand-written part (defaults, comparison) below the marker
        body += "\n" + old[old.index(marker) :]
    path.write_text(body)


def print_summary(results: list[dict]) -> None:
    print_table(
        "search index",
        ["rows", "dim", "engine", "config", "filter", "build s", "p50 ms", "p99 ms", "recall@10", "open s", "RSS MB"],
        [
            [
                r["rows"],
                r["dim"],
                r["engine"],
                r["config"],
                "cat" if r["filtered"] else "-",
                r["build_s"] or 0.0,
                r["p50_ms"],
                r["p99_ms"],
                r["recall"],
                r["open_s"],
                r["rss_mb"],
            ]
            for r in results
        ],
    )
