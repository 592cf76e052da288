"""Output quality on a labelled evaluation set (issue 11), per model configuration.

    .venv/bin/python -m benchmarks.quality                       # embedded default, all items
    .venv/bin/python -m benchmarks.quality --llm smollm2-135m    # another LLM
    .venv/bin/python -m benchmarks.quality --write-set DIR       # export images + labels.json
    .venv/bin/python -m benchmarks.quality --score-csv OUT/results.csv --labels DIR/labels.json
    .venv/bin/python -m benchmarks.quality --rescore benchmarks/results/quality-NAME.json

The set (``benchmarks/quality_set.py``): scikit-image photos, transformed, and rendered signs,
tickets and receipts, each labelled with its category, subject words and exact text; split
into ``tune`` and ``holdout``; the holdout split also has photos from scikit-learn, matplotlib
and scikit-image that no tune item shows (figures ``holdout_unseen_photos``). The images go through the real vision and enrich stage
transforms (the same code the pipeline runs, without Kafka), in batches. A GPU run (or any
``imgflow run``) is scored the same way from its ``results.csv``.

Figures (per split and overall): category accuracy, subject named (in the description or the
keywords), rendered text read exactly, OCR text on photos that show none, OCR non-words on
photos, keywords not supported by the image, description length, descriptions with numbers
the image does not show, with percentages, identical to the composed text (`text`); and
search (``benchmarks/search_quality.py``): the rows written as a sink output, indexed and
queried by subject word, by rendered text, and "more like this" over a photo's copies
(``--no-search`` skips it; an ``imgflow run``'s output is scored with ``python -m
benchmarks.search_quality``).
Results go to ``benchmarks/results/quality-NAME.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.perf_common import environ

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COLOURS = {"black", "white", "grey", "gray", "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "beige", "dark", "light"}
# Words a keyword or description may always use: they describe the kind of image.
GENERIC = {"photo", "image", "picture", "text", "sign", "document", "words", "written", "reading"}
_WORD = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*")
_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")


def words(text: str) -> list[str]:
    return _WORD.findall((text or "").lower())


def norm_text(text: str | None) -> str:
    return " ".join((text or "").split())


# -- running a configuration ---------------------------------------------------------------


def _record(cls, topic: str, offset: int, event_id: str, value: dict):
    fields = getattr(cls, "__dataclass_fields__", {})
    extra = {"run_id": "quality"} if "run_id" in fields else {}  # older stage.py: no run_id
    return cls(topic, 0, offset, event_id, value, None, **extra)


def run_config(items, env: dict[str, str], batch: int = 8, progress=print, enriched: list[dict] | None = None) -> list[dict]:
    """Every item through VisionTransform then EnrichTransform; one output dict per item with
    the CSV's fields (text, description, category, keywords, image_text). ``enriched``: a list
    that gets each item's whole EnrichedRecord value (vectors and all: the search figures)."""
    from consumers.enrich import EnrichTransform
    from consumers.vision import VisionTransform
    from imgflow.events import local_image_event
    from imgflow.settings import Settings
    from imgflow.stage import InputRecord

    # Both stages' models in one process (the pipeline runs each stage in its own): the vision
    # stage's six entries and the LLM, so that none is reloaded every batch.
    env = {"IMGFLOW_MODELS__CACHE_SIZE": "8", **env}
    with environ(**env):
        settings = Settings()  # the configuration's settings; the environment is put back
    vision, enrich = VisionTransform(settings), EnrichTransform(settings)
    vision.setup()
    enrich.setup()
    out: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="imgflow-quality-") as tmp:
        if hasattr(vision, "roots"):
            vision.roots = []  # the images are in a temp folder
        started = time.monotonic()
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            records = []
            for it in chunk:
                path = Path(tmp) / f"{it.id}.png"
                it.image.save(path)
                ev = local_image_event(path, path.stat(), source="quality", run_id="quality")
                records.append(_record(InputRecord, "new", start, ev["event_id"], ev))
            results = vision.process(records)
            vrecs = []
            for rec, res in zip(records, results):
                if isinstance(res, BaseException):
                    raise res
                v = res[0].value
                vrecs.append(_record(InputRecord, "vision", rec.offset, rec.event_id, v))
            for res in enrich.process(vrecs):
                if isinstance(res, BaseException):
                    raise res
                e = res[0].value
                if enriched is not None:
                    enriched.append(e)
                out.append(
                    {
                        "text": e["vision"]["text"],
                        "description": e["description"],
                        "category": e["category"],
                        "keywords": list(e["keywords"]),
                        "image_text": e["image_text"],
                    }
                )
            progress(f"  {min(start + batch, len(items))}/{len(items)} images ({time.monotonic() - started:.0f} s)")
    return out


def outputs_from_csv(csv_path: Path, labels: list[dict]) -> list[dict]:
    """Rows of an `imgflow run` over a folder written by --write-set, in label order."""
    by_id = {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by_id[Path(row["image_path"]).stem] = row
    out = []
    for lab in labels:
        row = by_id.get(lab["id"])
        if row is None:
            raise SystemExit(f"{csv_path}: no row for image {lab['id']}.png")
        cats = json.loads(row["categories"] or "[]")
        out.append(
            {
                "text": row["text"] or "",
                "description": row["description"] or "",
                "category": cats[0] if cats else "",
                "keywords": json.loads(row["keywords"] or "[]"),
                "image_text": row["image_text"] or "",
            }
        )
    return out


# -- scoring -----------------------------------------------------------------------------


def known_word(word: str, vocab) -> bool:
    return word.isdigit() or word in vocab


def score(labels: list[dict], outputs: list[dict], vocab) -> dict:
    """Per-item checks, then the figures over all items and per split."""
    rows = []
    for lab, out in zip(labels, outputs):
        desc = out["description"] or ""
        kw_text = " ".join(out["keywords"])
        named_in = " ".join([desc, kw_text]).lower()
        subject_named = any(re.search(rf"\b{re.escape(s.lower())}", named_in) for s in lab["subject"])
        truth_words = set(words(lab["text"] or ""))
        supported = set(words(" ".join(lab["subject"] + lab["related"]))) | truth_words | COLOURS | GENERIC | {lab["category"]} | set(lab["also_ok"])
        unsupported = [k for k in out["keywords"] if not set(words(k)) & supported]
        read = norm_text(out["image_text"])
        photo = lab["kind"] in ("photo", "photo_text")
        may_read = set(words(" ".join(lab.get("may_read", []))))
        false_words = [w for w in words(read) if w not in truth_words | may_read] if photo else []
        label_read = " ".join(w for w in words(read) if w not in may_read)
        numbers_in_image = set(_NUMBER.findall(lab["text"] or ""))
        desc_numbers = [n for n in _NUMBER.findall(desc) if n not in numbers_in_image]
        rows.append(
            {
                "id": lab["id"],
                "split": lab["split"],
                "kind": lab["kind"],
                "unseen": lab.get("unseen", False),
                "expected_category": lab["category"],
                "category": out["category"],
                "category_ok": out["category"] in [lab["category"], *lab["also_ok"]],
                "subject_named": subject_named,
                "text_exact": (read == norm_text(lab["text"])) if lab["kind"] == "text" else None,
                "photo_text_ok": (label_read in ("", " ".join(words(lab["text"] or "")))) if lab["kind"] == "photo_text" else None,
                "ocr_false_text": bool(false_words) if lab["kind"] == "photo" else None,
                "ocr_nonwords": [w for w in false_words if not known_word(w, vocab)],
                "keywords": out["keywords"],
                "keywords_unsupported": unsupported,
                "description": desc,
                "description_words": len(words(desc)),
                "numbers_not_in_image": desc_numbers,
                "percentage": "%" in desc,
                "identical_to_text": norm_text(desc).lower() == norm_text(out["text"]).lower(),
                "text": out["text"],
                "image_text": out["image_text"],
            }
        )
    figures = {"all": summarise(rows)}
    for split in sorted({r["split"] for r in rows}):
        figures[split] = summarise([r for r in rows if r["split"] == split])
    unseen = [r for r in rows if r["unseen"]]
    if unseen:  # holdout photos from other packages: no variant of them in the tune split
        figures["holdout_unseen_photos"] = summarise(unseen)
    return {"figures": figures, "items": rows}


def _share(rows, key) -> float | None:
    vals = [r[key] for r in rows if r[key] is not None]
    return round(sum(bool(v) for v in vals) / len(vals), 3) if vals else None


def summarise(rows: list[dict]) -> dict:
    photos = [r for r in rows if r["kind"] in ("photo", "photo_text")]
    n_kw = sum(len(r["keywords"]) for r in rows)
    return {
        "items": len(rows),
        "category_accuracy": _share(rows, "category_ok"),
        "subject_named": _share(rows, "subject_named"),
        "rendered_text_exact": _share(rows, "text_exact"),
        "photo_label_read_exactly_or_not_at_all": _share(rows, "photo_text_ok"),
        "ocr_false_text_on_photos_without_text": _share(rows, "ocr_false_text"),
        "ocr_nonwords_on_photos": sum(len(r["ocr_nonwords"]) for r in photos),
        "keywords_unsupported": round(sum(len(r["keywords_unsupported"]) for r in rows) / n_kw, 3) if n_kw else None,
        "description_words_mean": round(sum(r["description_words"] for r in rows) / max(1, len(rows)), 1),
        "description_words_max": max((r["description_words"] for r in rows), default=0),
        "descriptions_with_numbers_not_in_image": sum(bool(r["numbers_not_in_image"]) for r in rows),
        "descriptions_with_percentages": sum(r["percentage"] for r in rows),
        "descriptions_identical_to_text": _share(rows, "identical_to_text"),
    }


def vocabulary():
    """GloVe's vocabulary (lower case): what counts as a word when judging OCR output."""
    import pyarrow.parquet as pq

    from imgflow.models.embedded.glove import data_dir

    return frozenset(pq.read_table(data_dir() / "glove_6B_index.parquet").column("index").to_pylist())


def print_table(name: str, figures: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"quality: {name}")
    t.add_column("figure")
    for split in figures:
        t.add_column(split, justify="right")
    for key in figures["all"]:
        t.add_row(key, *[str(figures[s].get(key, "-")) for s in figures])
    Console().print(t)


def main(argv: list[str] | None = None) -> int:
    from benchmarks import quality_set

    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.quality",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--name", default="", help="configuration name (result file name); default from the settings")
    ap.add_argument("--llm", default=None, help="models.llm for this run (e.g. smollm2-135m)")
    ap.add_argument(
        "--set", action="append", default=[], metavar="ENV=VALUE", help="an IMGFLOW_* setting for this run, e.g. IMGFLOW_MODELS__PROFILE=gpu (repeatable)"
    )
    ap.add_argument("--split", choices=["tune", "holdout", "all"], default="all")
    ap.add_argument("--limit", type=int, default=None, help="only the first N items (smoke runs)")
    ap.add_argument("--batch", type=int, default=8, help="images per stage batch")
    ap.add_argument("--write-set", type=Path, default=None, metavar="DIR", help="write the images and labels.json to DIR and exit")
    ap.add_argument("--score-csv", type=Path, default=None, metavar="CSV", help="score an existing results.csv (from `imgflow run DIR` over --write-set DIR)")
    ap.add_argument("--labels", type=Path, default=None, help="labels.json for --score-csv")
    ap.add_argument(
        "--rescore",
        type=Path,
        default=None,
        metavar="JSON",
        help="score the outputs kept in an earlier result file against the current labels (after a label was corrected); writes it back unless --out is given",
    )
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/quality-NAME.json)")
    ap.add_argument("--no-search", action="store_true", help="skip the search figures (benchmarks/search_quality.py: the rows indexed and queried)")
    args = ap.parse_args(argv)

    splits = ("tune", "holdout") if args.split == "all" else (args.split,)
    if args.rescore:
        earlier = json.loads(args.rescore.read_text())
        by_id = {it.id: it.label() for it in quality_set.build(("tune", "holdout"))}
        labels = [by_id[r["id"]] for r in earlier["items"]]
        outputs = [{k: r[k] for k in ("text", "description", "category", "keywords", "image_text")} for r in earlier["items"]]
        result = score(labels, outputs, vocabulary())
        result["configuration"] = dict(earlier["configuration"], rescored=True)
        if "search" in earlier:  # the search figures of that run (they need its vectors: kept as they were)
            from benchmarks import search_quality

            search_quality.merge(
                result, {"figures": {s: {k: f[k] for k in search_quality.FIGURES if k in f} for s, f in earlier["figures"].items()}, **earlier["search"]}
            )
        print_table(earlier["configuration"]["name"], result["figures"])
        out = args.out or args.rescore
        out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {out}")
        return 0
    if args.score_csv:
        if not args.labels:
            ap.error("--score-csv needs --labels DIR/labels.json")
        labels = json.loads(args.labels.read_text())
        outputs = outputs_from_csv(args.score_csv, labels)
        name = args.name or args.score_csv.parent.name
        seconds = None
    else:
        items = quality_set.build(splits, args.limit)
        if args.write_set:
            quality_set.write_set(args.write_set, items)
            print(f"wrote {len(items)} images and labels.json to {args.write_set}")
            return 0
        env = dict(kv.split("=", 1) for kv in args.set)
        if args.llm is not None:
            env["IMGFLOW_MODELS__LLM"] = args.llm
        name = args.name or (env.get("IMGFLOW_MODELS__LLM") or "embedded-default")
        print(f"{len(items)} images, configuration {name}: {env or 'defaults'}")
        started = time.monotonic()
        enriched: list[dict] = []
        outputs = run_config(items, env, args.batch, enriched=enriched)
        seconds = round(time.monotonic() - started, 1)
        labels = [it.label() for it in items]
    result = score(labels, outputs, vocabulary())
    if not args.score_csv and not args.no_search:
        from benchmarks import search_quality
        from imgflow.settings import Settings

        with environ(**env):
            settings = Settings()
        search = search_quality.evaluate(search_quality.sink_rows(enriched, settings.run_id), labels, settings)
        search_quality.merge(result, search)
        search_quality.print_misses(search)
    result["configuration"] = {"name": name, "settings": args.set, "llm": args.llm, "seconds": seconds, "fonts": [f for f, _ in quality_set.fonts()]}
    print_table(name, result["figures"])
    out = args.out or RESULTS / f"quality-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
