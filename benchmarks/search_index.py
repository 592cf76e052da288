"""Search index: build rate, query latency (p50 / p99), recall@10 and memory of the LanceDB
index (imgflow/search/ann.py), against exact search, and against a plain ANN library (usearch).

    .venv/bin/python -m benchmarks.search_index --rows 10000,1000000 --dims 384,1280 \\
        [--out benchmarks/results/search_index.md]
    .venv/bin/python -m benchmarks.search_index --rows 100000 --dims 1280 --compare-rows 100000

Data that resembles embeddings (seeded, reproducible, generated in chunks of 50,000 rows so
that a million 1280-d vectors are never held twice): a vector is ``W z + noise``, L2-normalised,
where ``z`` is a 48-d (384-d vectors) or 64-d (1280-d) latent drawn around one of 512 cluster
centres, ``W`` a fixed random map with a decaying spectrum, ``noise`` isotropic at 40 % of the
signal's norm, plus a shared mean direction (real embeddings are not centred). The queries
(``--queries``, default 300) are held-out points of the same process, perturbed with more
noise: never the indexed points themselves. Each row has one of 10 categories (uniform,
independent of the vector: the hard case for a filtered IVF search).

Ground truth: exact cosine top-10 by numpy over the same vectors, without and with the filter
``category = <one of the 10>`` (the query's category). LanceDB is driven through the real
code: the table is built as ``SearchIndex`` builds it (imgflow/search/schema.py) (a FixedSizeList<float32> column, rows
appended in batches), the index by ``create_vector_index`` and every query by
``vector_query(...).to_list()`` as ``imgflow search`` runs it. Below ``--ann-from`` rows only the
exact flat scan is measured (what the product does below ``search.ann_min_rows``); the flat
scan is also measured up to ``--flat-max`` rows, to show where it stops being fast.

Latency and memory are measured in a fresh child process per index (open, first query,
warm-up, then the timed queries one at a time, as a search request makes them): "open" is the
time from the child's start to its first answer (interpreter, imports, opening the index),
RSS is the child's resident memory after the queries (peak in brackets). usearch (HNSW,
f16 vectors, M=16, ef_construction=128, as it would be used without a database) is built at
``--compare-rows`` sizes in the same run; it has no filter, so its filtered case is a
post-filter of 200 candidates.

Results: tables on stdout and ``--out`` (Markdown, rewritten after each case; benchmarks/search_index_report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.perf_common import rss_mb
from benchmarks.search_index_report import percentiles, print_summary, recall, write_md

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 50_000
CATEGORIES = [f"cat{i}" for i in range(10)]
K = 10
LATENT = {384: 48, 1280: 64}
# ANN settings swept: (nprobes, refine_factor). The product's default is marked in the output.
SWEEP = {
    "IVF_PQ": [(10, 10), (20, 10), (20, 30), (40, 10), (40, 30), (80, 30)],
    "IVF_HNSW_SQ": [(1, 1), (2, 1), (4, 1), (10, 1), (2, 5), (4, 5), (20, 10)],
}
USEARCH_EF = [32, 64, 128, 256]


def default_ann() -> tuple[str, int, int]:
    from imgflow.settings import SearchSettings

    d = SearchSettings()
    return d.ann_index_type, d.ann_nprobes, d.ann_refine_factor


DEFAULT_ANN = default_ann()


# -- data
class Data:
    """The vectors of one dimension, made chunk by chunk (the same ones each run)."""

    def __init__(self, dim: int, seed: int = 17, clusters: int = 512, noise: float = 0.4, spread: float = 0.7):
        self.dim, self.seed, self.noise, self.spread = dim, seed, noise, spread
        latent = LATENT.get(dim, 64)
        g = np.random.default_rng([seed, dim])
        self.w = (g.standard_normal((latent, dim)) / np.sqrt(dim)).astype(np.float32)
        self.w *= (np.arange(1, latent + 1) ** -0.5)[:, None].astype(np.float32)
        self.centres = g.standard_normal((clusters, latent)).astype(np.float32)
        mean = g.standard_normal(dim).astype(np.float32)
        self.mean = mean / np.linalg.norm(mean)
        self.scale = float(np.linalg.norm(self.centres @ self.w, axis=1).mean())

    def _make(self, rng: np.random.Generator, n: int, extra_noise: float = 0.0) -> np.ndarray:
        z = self.centres[rng.integers(len(self.centres), size=n)]
        z += self.spread * rng.standard_normal(z.shape, dtype=np.float32)
        x = z @ self.w
        x += 0.4 * self.scale * self.mean
        sd = (self.noise + extra_noise) * self.scale / np.sqrt(self.dim)
        x += sd * rng.standard_normal(x.shape, dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def chunk(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [start, start + n): vectors and category numbers (start a multiple of CHUNK)."""
        rng = np.random.default_rng([self.seed, self.dim, 2, start])
        return self._make(rng, n), rng.integers(len(CATEGORIES), size=n)

    def queries(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.dim, 3])
        return self._make(rng, n, extra_noise=0.2), rng.integers(len(CATEGORIES), size=n)


class TopK:
    """Exact top-K (cosine = dot product of unit vectors) merged over chunks."""

    def __init__(self, nq: int):
        self.sims: np.ndarray = np.full((nq, K), -np.inf, np.float32)
        self.ids: np.ndarray = np.full((nq, K), -1, np.int64)

    def add(self, sims: np.ndarray, start: int) -> None:
        ids = np.broadcast_to(np.arange(start, start + sims.shape[1]), sims.shape)
        top = np.argpartition(-sims, K, axis=1)[:, :K] if sims.shape[1] > K else np.argsort(-sims, axis=1)
        allsims = np.concatenate([self.sims, np.take_along_axis(sims, top, 1)], axis=1)
        allids = np.concatenate([self.ids, np.take_along_axis(ids, top, 1)], axis=1)
        order = np.argsort(-allsims, axis=1)[:, :K]
        self.sims = np.take_along_axis(allsims, order, 1)
        self.ids = np.take_along_axis(allids, order, 1)


def lance_batch(vectors: np.ndarray, cats: np.ndarray, start: int, column: str):
    """The columns a query touches, laid out as ``imgflow.search.schema.image_table`` does."""
    import pyarrow as pa

    dim = vectors.shape[1]
    n = len(vectors)
    return pa.table(
        {
            "i": pa.array(np.arange(start, start + n), pa.int64()),
            "event_id": [f"{j:032x}" for j in range(start, start + n)],
            "category": pa.array([CATEGORIES[c] for c in cats]),
            column: pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
        }
    )


def column_of(dim: int) -> str:
    return "text_vector" if dim == 384 else "image_vector"


def settings_for(index_type: str, nprobes: int, refine: int):
    from imgflow.settings import SearchSettings, Settings

    base = Settings().search.model_dump()
    base.update(ann_index_type=index_type, ann_nprobes=nprobes, ann_refine_factor=refine)
    return Settings(search=SearchSettings(**base))


def self_rss() -> tuple[float, float]:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return rss_mb(os.getpid()) or 0.0, peak


# -- children: open the index, then query it (a fresh process: open time, RSS)
def child_lance(spec: dict) -> dict:
    t0 = spec["t0"]
    import lancedb

    from imgflow.search.ann import vector_query

    q = np.load(spec["queries"])
    qcats = np.load(spec["qcats"])
    table = lancedb.connect(spec["db"]).open_table(spec["table"])
    out: dict[str, Any] = {"runs": []}
    for run in spec["runs"]:
        settings = settings_for(run["index_type"] if run["ann"] else "IVF_PQ", max(1, run["nprobes"]), max(1, run["refine"]))
        ann = run["ann"]

        def one(i, filtered, settings=settings, ann=ann):
            where = f"category = '{CATEGORIES[qcats[i]]}'" if filtered else None
            rows = vector_query(table, spec["column"], q[i], K, where, settings, ann).to_list()
            return [r["i"] for r in rows]

        if "open_s" not in out:
            one(0, False)
            out["open_s"] = time.time() - t0
        for filtered in (False, True):
            n = run["queries"]
            for i in range(min(spec["warmup"], n)):
                one(i, filtered)
            ms, ids = [], []
            for i in range(n):
                t = time.perf_counter()
                ids.append(one(i, filtered))
                ms.append((time.perf_counter() - t) * 1000)
            out["runs"].append({**run, "filtered": filtered, "ms": ms, "ids": ids})
    out["rss_mb"], out["peak_mb"] = self_rss()
    return out


def child_usearch(spec: dict) -> dict:
    t0 = spec["t0"]
    from usearch.index import Index

    q = np.load(spec["queries"])
    qcats = np.load(spec["qcats"])
    cats = np.load(spec["cats"], mmap_mode="r")
    index = Index.restore(spec["path"])
    index.search(q[0], K, threads=1)
    out: dict[str, Any] = {"open_s": time.time() - t0, "runs": []}
    for ef in spec["efs"]:
        index.expansion_search = ef
        for filtered in (False, True):
            want = 200 if filtered else K
            n = spec["queries_n"]

            def one(i, want=want, filtered=filtered):
                m = index.search(q[i], want, threads=1)
                keys = m.keys
                if filtered:
                    keys = keys[cats[keys] == qcats[i]]
                return [int(k) for k in keys[:K]]

            for i in range(min(spec["warmup"], n)):
                one(i)
            ms, ids = [], []
            for i in range(n):
                t = time.perf_counter()
                ids.append(one(i))
                ms.append((time.perf_counter() - t) * 1000)
            out["runs"].append({"ef": ef, "filtered": filtered, "ms": ms, "ids": ids})
    out["rss_mb"], out["peak_mb"] = self_rss()
    return out


def run_child(kind: str, spec: dict, timeout: float = 7200) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.search_index", "--child", kind, f.name], cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise RuntimeError(f"{kind} child failed:\n{result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        os.unlink(f.name)


# -- one case: rows x dim
def run_case(rows: int, dim: int, args, work: Path, results: list[dict]) -> None:
    import lancedb

    from imgflow.search.ann import create_vector_index

    col = column_of(dim)
    data = Data(dim, args.seed)
    queries, qcats = data.queries(args.queries)
    nq = len(queries)
    case = work / f"{rows}x{dim}"
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    np.save(case / "q.npy", queries)
    np.save(case / "qc.npy", qcats)
    compare = rows in args.compare_rows and dim in args.compare_dims
    cats_all: np.ndarray = np.empty(rows, np.int8)
    truth, truth_f = TopK(nq), TopK(nq)
    db = lancedb.connect(str(case / "lance"))
    table = None
    uidx = None
    if compare:
        from usearch.index import Index

        uidx = Index(ndim=dim, metric="cos", dtype="f16", connectivity=16, expansion_add=128)
    write_s = usearch_s = 0.0
    print(f"\n== {rows:,} x {dim}-d: generating, writing the Lance table, exact ground truth{', usearch build' if compare else ''}", flush=True)
    t_case = time.monotonic()
    rand_sims = []
    for start in range(0, rows, CHUNK):
        n = min(CHUNK, rows - start)
        x, c = data.chunk(start, n)
        cats_all[start : start + n] = c
        sims = queries @ x.T
        truth.add(sims, start)
        sims[c[None, :] != qcats[:, None]] = -np.inf
        truth_f.add(sims, start)
        rand_sims.append(float((x[:200] @ x[200:400].T).mean()))
        del sims
        t = time.monotonic()
        batch = lance_batch(x, c, start, col)
        if table is None:
            table = db.create_table("images", batch)
        else:
            table.add(batch)
        write_s += time.monotonic() - t
        if uidx is not None:
            t = time.monotonic()
            uidx.add(np.arange(start, start + n), x, threads=os.cpu_count() or 1)
            usearch_s += time.monotonic() - t
        del x, batch
        done = start + n
        if done % (CHUNK * 4) == 0 or done == rows:
            print(f"  {done:,}/{rows:,} rows ({time.monotonic() - t_case:.0f} s)", flush=True)
    np.save(case / "cats.npy", cats_all)
    stats = {"top1": float(truth.sims[:, 0].mean()), "top10": float(truth.sims[:, K - 1].mean()), "random": float(np.mean(rand_sims))}
    print(
        f"  exact cosine: top-1 {stats['top1']:.3f}, 10th {stats['top10']:.3f}, random pair {stats['random']:.3f}; Lance write {rows / write_s:,.0f} rows/s",
        flush=True,
    )
    base = {"rows": rows, "dim": dim, "write_rows_s": rows / write_s, **stats}

    def record(engine: str, config: str, build_s: float | None, child: dict, run: dict, truth_of) -> None:
        p50, p99 = percentiles(run["ms"])
        r = {
            **base,
            "engine": engine,
            "config": config,
            "filtered": run["filtered"],
            "build_s": build_s,
            "build_rows_s": rows / build_s if build_s else None,
            "p50_ms": p50,
            "p99_ms": p99,
            "recall": recall(run["ids"], truth_of(run["filtered"])),
            "queries": len(run["ms"]),
            "open_s": child["open_s"],
            "rss_mb": child["rss_mb"],
            "peak_mb": child["peak_mb"],
        }
        results.append(r)
        print(
            f"  {engine:8} {config:28} {'filtered' if r['filtered'] else 'all     '} p50 {p50:7.2f} ms"
            f"  p99 {p99:7.2f} ms  recall@10 {r['recall']:.3f}  open {r['open_s']:.2f} s"
            f"  RSS {r['rss_mb']:.0f} MB",
            flush=True,
        )

    def truth_of(filtered):
        return truth_f.ids if filtered else truth.ids

    spec = {"db": str(case / "lance"), "table": "images", "column": col, "queries": str(case / "q.npy"), "qcats": str(case / "qc.npy"), "warmup": args.warmup}
    if uidx is not None:
        path = case / "usearch.bin"
        uidx.save(str(path))
        del uidx
        print(f"  usearch HNSW f16 built in {usearch_s:.1f} s ({rows / usearch_s:,.0f} rows/s)", flush=True)
        child = run_child(
            "usearch",
            {
                "path": str(path),
                "queries": spec["queries"],
                "qcats": spec["qcats"],
                "cats": str(case / "cats.npy"),
                "efs": USEARCH_EF,
                "queries_n": nq,
                "warmup": args.warmup,
                "t0": time.time(),
            },
        )
        for run in child["runs"]:
            record("usearch", f"HNSW f16 M16 ef={run['ef']}" + (" +post" if run["filtered"] else ""), usearch_s, child, run, truth_of)
        write_md(args, results)

    if rows <= args.flat_max:
        n_flat = nq if rows <= 200_000 else min(nq, 30)
        child = run_child("lance", {**spec, "t0": time.time(), "runs": [{"index_type": "flat", "nprobes": 0, "refine": 0, "ann": False, "queries": n_flat}]})
        for run in child["runs"]:
            record("lancedb", "flat scan (bypass index)", None, child, run, truth_of)
        write_md(args, results)

    if rows >= args.ann_from:
        for index_type in args.index_types:
            settings = settings_for(index_type, 1, 1)
            print(f"  building {index_type} on {rows:,} x {dim}-d ...", flush=True)
            t = time.monotonic()
            create_vector_index(table, col, dim, rows, settings)
            build_s = time.monotonic() - t
            print(f"  {index_type} built in {build_s:.1f} s ({rows / build_s:,.0f} rows/s)", flush=True)
            runs = [{"index_type": index_type, "nprobes": p, "refine": f, "ann": True, "queries": nq} for p, f in SWEEP[index_type]]
            child = run_child("lance", {**spec, "t0": time.time(), "runs": runs})
            for run in child["runs"]:
                label = f"{index_type} nprobes={run['nprobes']}"
                if run["refine"] > 1:
                    label += f" refine={run['refine']}"
                if (index_type, run["nprobes"], run["refine"]) == DEFAULT_ANN:
                    label += " (default)"
                record("lancedb", label, build_s, child, run, truth_of)
            write_md(args, results)
    del table, db
    if not args.keep:
        shutil.rmtree(case, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--rows", default="10000,1000000", help="row counts, comma-separated (default 10000,1000000)")
    ap.add_argument("--dims", default="384,1280", help="vector dimensions, comma-separated (default 384,1280)")
    ap.add_argument("--queries", type=int, default=300, help="timed queries per case and setting (default 300)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed queries first (default 20)")
    ap.add_argument("--index-types", default="IVF_PQ,IVF_HNSW_SQ", help="LanceDB index kinds built")
    ap.add_argument("--ann-from", type=int, default=50_000, help="build ANN indexes from this many rows")
    ap.add_argument("--flat-max", type=int, default=1_000_000, help="measure the flat scan up to this many rows")
    ap.add_argument("--compare-rows", default="100000,1000000", help="row counts at which usearch is built too")
    ap.add_argument("--compare-dims", default="384,1280", help="dimensions at which usearch is built too")
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--work", default="", help="folder for the tables (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the tables")
    ap.add_argument("--out", default="", help="Markdown results file, e.g. benchmarks/results/search_index.md")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, path = args.child
        spec = json.loads(Path(path).read_text())
        out = child_lance(spec) if kind == "lance" else child_usearch(spec)
        print(json.dumps(out))
        return 0
    os.environ.setdefault("LANCE_LOG", "error")
    rows = [int(x) for x in args.rows.split(",") if x]
    dims = [int(x) for x in args.dims.split(",") if x]
    args.compare_rows = {int(x) for x in args.compare_rows.split(",") if x}
    args.compare_dims = {int(x) for x in args.compare_dims.split(",") if x}
    args.index_types = [x for x in args.index_types.split(",") if x]
    results: list[dict] = []
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="search-bench-"))
    try:
        for n in rows:
            for d in dims:
                run_case(n, d, args, work, results)
    finally:
        if not args.work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_summary(results)
    write_md(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
