"""The pipeline against the original one-image-at-a-time loop: same models, same images,
same run, alternated.

    .venv/bin/python -m benchmarks.pipeline_vs_seed [--images 24] [--rounds 1] [--engine tansu,kafka]

``seed``: a faithful re-creation of the original ``vec_qwen.py`` loop on the shipped models
(its own process, cold start included): for each image in turn, prepare it (RGB, longest
side 384), run the vision models (text reader, describer, image / text / word vectors), ask
the LLM for the JSON (one ``create_chat_completion``, the request the enrich stage made
before issue 10/11, ``image_text`` included), append
the rows to the CSV every 10 images; images already in the CSV are skipped.

``pipeline``: ``imgflow run IMAGES --out OUT --once --engine E`` in a fresh data dir (embedded
broker, watcher, vision, enrich, sink; cold start included), with the default settings, once
per ``--engine`` (default tansu,kafka: tansu on SeaweedFS and Apache Kafka, side by side). Each
round runs the seed loop once and the pipeline once per engine, alternated (round 1: seed,
then the engines in order; round 2 the reverse, ...).

Reports images/s of each, each engine's ratio to the seed loop, and each part's share of the time (seed: measured per
image; pipeline: the seconds each stage spent transforming, from its log, over the wall
time). ``--seed-threads N`` gives the seed loop's libraries N threads (default: their own
defaults, as the original ran: torch and onnxruntime all cores, llama.cpp half the cores for
generation and all for prompts). Prints a table; JSON in benchmarks/results/pipeline_vs_seed.json
(the pipeline's figures keyed by engine).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.perf_common import mixed_images, print_table, write_result
from imgflow.output.rows import SEED_COLUMNS

CSV_EVERY = 10  # the original's BATCH/flush cadence: rows appended every 10 images
ENGINES = ("tansu", "kafka")  # imgflow run --engine


def seed_loop(images: Path, out_csv: Path) -> dict:
    """The original loop, in this process. Returns seconds per part."""
    from llama_cpp import Llama, LlamaGrammar

    from benchmarks.enrich_batch import TODAY_SCHEMA, TODAY_SYSTEM, today_prompt
    from imgflow.images import prepare_image
    from imgflow.models.base import StructureInput
    from imgflow.models.llm.shipped import ensure_qwen_gguf, resolve_llm
    from imgflow.models.llm.structurer import SEED
    from imgflow.models.registry import build_vision_models
    from imgflow.settings import Settings, default_models_dir

    threads = int(os.environ.get("SEED_THREADS") or 0)  # 0: the libraries' defaults
    if threads:
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    parts = {"load": 0.0, "prepare": 0.0, "vision": 0.0, "llm": 0.0, "csv": 0.0}
    settings = Settings()
    vm = build_vision_models(settings)
    for m in (vm.reader, vm.describer, vm.image_embedder, vm.text_embedder, vm.word_vectorizer):
        m.load()
    spec = resolve_llm(settings.models.llm, default_models_dir())
    path = ensure_qwen_gguf(spec.path.parent) if spec.joined else spec.path
    llm = Llama(model_path=str(path), n_ctx=2048, seed=SEED, verbose=False, **({"n_threads": threads, "n_threads_batch": threads} if threads else {}))
    grammar = LlamaGrammar.from_json_schema(json.dumps(TODAY_SCHEMA), verbose=False)
    parts["load"] = time.perf_counter() - t0

    done = set()
    if out_csv.exists():  # resume: skip what the CSV has
        with open(out_csv, newline="") as f:
            done = {row["image_path"] for row in csv.DictReader(f)}
    pending: list[list] = []

    def flush() -> None:
        new = not out_csv.exists()
        with open(out_csv, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(SEED_COLUMNS)
            w.writerows(pending)
        pending.clear()

    n = 0
    for p in sorted(images.iterdir()):
        if str(p) in done:
            continue
        t = time.perf_counter()
        img = prepare_image(p.read_bytes(), settings.models.image_max_size).image
        t1 = time.perf_counter()
        reads = vm.reader.read([img])  # the same vision models and calls as the vision stage
        seen = [r.text for r in reads]
        areas = [r.area for r in reads]
        desc = (vm.describer.describe([img], seen, areas) if areas[0] is not None else vm.describer.describe([img], seen))[0]
        ivec = vm.image_embedder.embed_images([img])[0]
        tvec = vm.text_embedder.embed_texts([desc.text])[0]
        wvec = vm.word_vectorizer.vectorize([desc.text])[0]
        t2 = time.perf_counter()
        item = StructureInput(desc.text, seen[0], [label for label, _ in desc.labels])
        resp = llm.create_chat_completion(
            messages=[{"role": "system", "content": TODAY_SYSTEM}, {"role": "user", "content": today_prompt(item)}],
            grammar=grammar,
            temperature=0.0,
            top_k=1,
            seed=SEED,
            max_tokens=256,
        )
        raw = resp["choices"][0]["message"]["content"] or ""
        t3 = time.perf_counter()
        try:
            data, error = json.loads(raw), None
        except json.JSONDecodeError as e:
            data, error = {}, str(e)
        pending.append(
            [
                str(p),
                desc.text,
                data.get("description", ""),
                data.get("category", ""),
                json.dumps(data.get("keywords", [])),
                data.get("image_text", ""),
                json.dumps([float(x) for x in tvec]),
                json.dumps([float(x) for x in wvec]),
                json.dumps([float(x) for x in ivec]),
                time.strftime("%Y-%m-%dT%H:%M:%S"),
                error,
                raw,
            ]
        )
        n += 1
        if len(pending) >= CSV_EVERY:
            flush()
        t4 = time.perf_counter()
        parts["prepare"] += t1 - t
        parts["vision"] += t2 - t1
        parts["llm"] += t3 - t2
        parts["csv"] += t4 - t3
    t = time.perf_counter()
    if pending:
        flush()
    parts["csv"] += time.perf_counter() - t
    llm.close()
    return {"images": n, "wall_s": time.perf_counter() - t0, "parts": parts}


def run_seed(images: Path, work: Path, threads: int) -> dict:
    out = work / "seed.csv"
    env = dict(os.environ)
    if threads:
        env.update(SEED_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.pipeline_vs_seed", "--seed-child", str(images), str(out)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"seed loop failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = wall
    return res


TRANSFORMED = re.compile(r"transformed (\d+) record\(s\) in ([\d.]+)s")


def stage_seconds(log: Path) -> tuple[int, float]:
    n, s = 0, 0.0
    if log.exists():
        for m in TRANSFORMED.finditer(log.read_text(errors="replace")):
            n += int(m.group(1))
            s += float(m.group(2))
    return n, s


def run_pipeline(images: Path, work: Path, env_extra: dict[str, str], engine: str = "tansu") -> dict:
    data, out = work / "data", work / "out"
    env = dict(os.environ, **env_extra)
    env.pop("IMGFLOW_DATA_DIR", None)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "imgflow", "run", str(images), "--out", str(out), "--once", "--data-dir", str(data), "--engine", engine],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"imgflow run --engine {engine} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    stages = {}
    for role in ("vision", "enrich"):
        n, s = stage_seconds(data / "logs" / f"{role}.log")
        stages[role] = {"records": n, "transform_s": s}
    return {"engine": engine, "images": len(rows), "errors": sum(1 for r in rows if r.get("error")), "wall_s": wall, "stages": stages}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=24, help="images (half photos, half rendered text), default 24")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of the seed loop and one pipeline run per engine, alternated (default 1)")
    ap.add_argument("--engine", default=",".join(ENGINES), help="embedded broker engines of the pipeline runs, side by side (default: tansu,kafka)")
    ap.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="extra IMGFLOW_* setting for the pipeline, e.g. IMGFLOW_MODELS__LLM_BATCH=8"
    )
    ap.add_argument(
        "--seed-threads",
        type=int,
        default=0,
        help="threads of the seed loop's models (torch, onnxruntime, llama.cpp); default 0: each library's default, as the original script ran",
    )
    ap.add_argument("--seed-child", nargs=2, metavar=("IMAGES", "CSV"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.seed_child:
        print(json.dumps(seed_loop(Path(args.seed_child[0]), Path(args.seed_child[1]))))
        return 0

    engines = list(dict.fromkeys(e.strip() for e in args.engine.split(",") if e.strip()))
    if not engines or any(e not in ENGINES for e in engines):
        ap.error(f"--engine: choose from {', '.join(ENGINES)}")
    env_extra = dict(e.split("=", 1) for e in args.env)
    seeds: list[dict] = []
    pipes: dict[str, list[dict]] = {e: [] for e in engines}
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        mixed_images(images, args.images)
        for r in range(args.rounds):
            order = ["seed", *engines]
            order = order if r % 2 == 0 else order[::-1]
            for which in order:
                work = Path(tmp) / f"{which}{r}"
                work.mkdir()
                label = "seed" if which == "seed" else f"pipeline --engine {which}"
                print(f"round {r + 1}: {label} ...", flush=True)
                if which == "seed":
                    res = run_seed(images, work, args.seed_threads)
                    seeds.append(res)
                else:
                    res = run_pipeline(images, work, env_extra, which)
                    pipes[which].append(res)
                print(f"  {label}: {res['images']} images in {res['wall_s']:.1f}s ({res['images'] / res['wall_s']:.3f} images/s)", flush=True)
    seed_wall = sum(s["wall_s"] for s in seeds)
    n_seed = sum(s["images"] for s in seeds)
    seed_rate = n_seed / seed_wall
    seed_parts = {k: sum(s["parts"][k] for s in seeds) / seed_wall for k in seeds[0]["parts"]}
    seed_parts["other"] = 1 - sum(seed_parts.values())
    rows = [["seed loop", n_seed, seed_wall, seed_rate, "1.00x", ", ".join(f"{k} {v:.0%}" for k, v in seed_parts.items())]]
    pipeline: dict[str, dict] = {}
    for e in engines:
        pipe_wall = sum(p["wall_s"] for p in pipes[e])
        n_pipe = sum(p["images"] for p in pipes[e])
        pipe_rate = n_pipe / pipe_wall
        pipe_parts = {role: sum(p["stages"][role]["transform_s"] for p in pipes[e]) / pipe_wall for role in ("vision", "enrich")}
        pipeline[e] = {"images_per_s": pipe_rate, "ratio": pipe_rate / seed_rate, "runs": pipes[e], "stage_busy_shares": pipe_parts}
        rows.append(
            [
                f"imgflow run --once --engine {e}",
                n_pipe,
                pipe_wall,
                pipe_rate,
                f"{pipe_rate / seed_rate:.2f}x",
                ", ".join(f"{k} busy {v:.0%}" for k, v in pipe_parts.items()),
            ]
        )
    print_table(
        f"pipeline vs the original loop: {args.images} images x {args.rounds} round(s), same models, engines {', '.join(engines)}",
        ["", "images", "wall s", "images/s", "ratio", "share of the wall time"],
        rows,
    )
    write_result(
        "pipeline_vs_seed",
        {
            "images": args.images,
            "rounds": args.rounds,
            "pipeline_env": env_extra,
            "seed_threads": args.seed_threads,
            "engines": engines,
            "seed": {"images_per_s": seed_rate, "runs": seeds, "shares": seed_parts},
            "pipeline": pipeline,
            "ratio": {e: pipeline[e]["ratio"] for e in engines},
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
