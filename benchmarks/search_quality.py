"""Search quality on the quality benchmark's labelled set (issue 17), called by
``benchmarks/quality.py`` after the models have made the set's rows.

The rows are written as a real sink output (the Avro + ``_index`` layout of
``imgflow.output``, rows shaped by the sink's own ``row_from_enriched``, run ``live``), one
output per split (``tune``, ``holdout``, and ``all``: both together, the most distractors),
each indexed by ``SearchIndex.sync`` and queried through ``Searcher``, as ``imgflow search``
does. Figures (per split):

- ``search_subject_main_top3``: for the main subject word of each photo ("cat", "coffee",
  "rocket" ...: the first of its label's subject words), is a photo with that subject in the
  top 3 of ``search(word)`` (the goal: >= 0.9 on the embedded default);
- ``..._when_named``: the same over the words the enrichment wrote (description, keywords, read
  text) on at least one right image: what search can find, apart from what the models missed
  (the astronaut is "a person", the coins "a golf ball": no search finds those by name);
- ``search_subject_main_precision3``: the share of those top 3 that are right (ranking quality);
- ``search_subject_any_top3``: the same over every subject word a label lists ("espresso",
  "space shuttle", "tripod" ...: synonyms a person might type);
- ``search_text_line_top3``: for each line of each rendered text (signs, tickets, receipts,
  labels pasted on photos), is that image in the top 3 of ``search(line)``;
- ``search_text_word_top3``: the same for each distinctive word of a text (a word of three
  letters or more that no other text of the split shows, e.g. "OSLO", "BAGEL");
- ``like_copies_in_nearest``: for each copy of a photo that has copies in the split (its
  transforms and the copy with a pasted label), the share of its k-1 nearest by
  ``like(copy)`` that are the other copies (k: the copies of that photo);
- ``like_top1``: is the nearest one a copy.

``holdout_unseen_photos``: the holdout queries whose photo is one of the holdout-only photos.
Every query is kept in the result file (``search.queries``) with its top hits, so a miss can be
looked at.

    .venv/bin/python -m benchmarks.search_quality --output OUT --labels DIR/labels.json

scores the sink output OUT of an ``imgflow run`` over a folder written by ``quality.py
--write-set DIR`` (rows are matched to labels by image file name).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.perf_common import environ

TOPIC = "images.enriched"
BATCH = 8  # rows per Avro file, like a small sink batch
TOP = 3
FIGURES = [
    "search_subject_main_top3",
    "search_subject_main_top3_when_named",
    "search_subject_main_precision3",
    "search_subject_any_top3",
    "search_subject_any_top3_when_named",
    "search_text_line_top3",
    "search_text_word_top3",
    "like_copies_in_nearest",
    "like_top1",
]
_ALPHA = re.compile(r"[^\W\d_]{3,}")


def photo_name(label: dict) -> str:
    """``tune-photo-chelsea-rotate+12`` -> ``chelsea`` (the photo a copy was made from)."""
    return label["id"].split("-")[2]


def sink_rows(enriched: list[dict], run_id: str) -> list[dict]:
    """The sink's rows (``ResultRow``) of the stage outputs, as if consumed at offsets 0..n-1."""
    from imgflow.output.rows import row_from_enriched

    rows = []
    for offset, e in enumerate(enriched):
        row = row_from_enriched(e, TOPIC, 0, offset)
        row["run_id"] = run_id
        rows.append(row)
    return rows


def write_output(folder: Path, rows: list[dict]) -> Path:
    """``rows`` as a sink output: per batch its Avro file, then its ``_index`` (the batch is
    complete), as ``imgflow.output.store.ResultStore.write`` does. Offsets are renumbered 0..n-1."""
    from imgflow.output.formats import avro_bytes, index_bytes
    from imgflow.output.layout import AVRO, INDEX, data_key
    from imgflow.output.storage import LocalStorage

    out = LocalStorage(folder)
    out.check()
    rows = [{**r, "source_topic": TOPIC, "source_partition": 0, "source_offset": i} for i, r in enumerate(rows)]
    for start in range(0, len(rows), BATCH):
        batch = rows[start : start + BATCH]
        out.put(data_key(AVRO, TOPIC, 0, start), avro_bytes(batch))
        out.put(data_key(INDEX, TOPIC, 0, start), index_bytes(batch))
    return folder


def written(row: dict) -> str:
    """What the enrichment wrote about an image: description, keywords, read text."""
    return " ".join([row.get("description") or "", " ".join(row.get("keywords") or []), row.get("image_text") or ""]).lower()


def _queries(labels: list[dict], written_of: dict[str, str]) -> list[dict]:
    """The queries over one split's images: kind, query, the ids that count as right, and
    whether the enrichment named the query on one of those (``named``)."""
    photos = [lab for lab in labels if lab["kind"] in ("photo", "photo_text")]
    texts = [lab for lab in labels if lab["text"]]
    qs: list[dict] = []
    main = {lab["subject"][0] for lab in photos}
    for word in sorted({w for lab in photos for w in lab["subject"]}):
        right = [lab["id"] for lab in photos if word in lab["subject"]]
        unseen = all(lab["unseen"] for lab in photos if word in lab["subject"])
        named = any(re.search(rf"\b{re.escape(word)}", written_of[i]) for i in right)  # as quality.score
        qs.append({"kind": "subject_any", "query": word, "right": right, "unseen": unseen, "named": named})
        if word in main:
            qs.append({"kind": "subject_main", "query": word, "right": right, "unseen": unseen, "named": named})
    shown = {lab["id"]: {w.lower() for w in _ALPHA.findall(lab["text"])} for lab in texts}
    for lab in texts:
        for line in lab["text"].split("\n"):
            qs.append({"kind": "text_line", "query": line, "right": [lab["id"]], "unseen": False})
        others = set().union(*(ws for i, ws in shown.items() if i != lab["id"]))
        for word in sorted(shown[lab["id"]] - others):
            qs.append({"kind": "text_word", "query": word.upper(), "right": [lab["id"]], "unseen": False})
    return qs


def evaluate_split(split: str, rows: list[dict], labels: list[dict], settings, tmp: Path) -> list[dict]:
    """Index ``rows`` (one split's) and run its queries; one record per query."""
    from imgflow.search.index import SearchIndex
    from imgflow.search.query import Searcher

    out = write_output(tmp / split / "out", rows)
    index = SearchIndex(out, settings, index_dir=tmp / split / "index")
    summary = index.sync()
    if summary.rows != len(rows):
        raise RuntimeError(f"{split}: {summary.rows} of {len(rows)} rows indexed ({summary})")
    searcher = Searcher(index, settings)
    id_of = {r["event_id"]: Path(r["image_path"]).stem for r in rows}
    eid_of = {v: k for k, v in id_of.items()}
    records = []
    for q in _queries(labels, {id_of[r["event_id"]]: written(r) for r in rows}):
        hits = searcher.search(q["query"], limit=TOP)
        top = [id_of[h.event_id] for h in hits]
        records.append(
            {
                **q,
                "split": split,
                "top": top,
                "matched": [h.matched for h in hits],
                "right_in_top": sum(t in q["right"] for t in top),
                "ok": bool(set(top) & set(q["right"])),
            }
        )
    groups: dict[str, list[dict]] = {}
    for lab in labels:
        if lab["kind"] in ("photo", "photo_text"):
            groups.setdefault(photo_name(lab), []).append(lab)
    for _name, copies in sorted(groups.items()):
        if len(copies) < 2:
            continue
        ids = {lab["id"] for lab in copies}
        for lab in copies:
            hits = searcher.like(eid_of[lab["id"]], limit=len(copies) - 1)
            top = [id_of[h.event_id] for h in hits]
            records.append(
                {
                    "kind": "like",
                    "query": lab["id"],
                    "right": sorted(ids - {lab["id"]}),
                    "unseen": lab["unseen"],
                    "split": split,
                    "top": top,
                    "copies_share": round(sum(t in ids for t in top) / (len(copies) - 1), 3),
                    "ok": bool(top) and top[0] in ids,
                }
            )
    return records


def _share(vals: list[bool]) -> float | None:
    return round(sum(vals) / len(vals), 3) if vals else None


def summarise(records: list[dict]) -> dict:
    by = {k: [r for r in records if r["kind"] == k] for k in ("subject_main", "subject_any", "text_line", "text_word", "like")}
    likes = by["like"]
    return {
        "search_subject_main_top3": _share([r["ok"] for r in by["subject_main"]]),
        "search_subject_main_top3_when_named": _share([r["ok"] for r in by["subject_main"] if r["named"]]),
        "search_subject_main_precision3": round(sum(r["right_in_top"] for r in by["subject_main"]) / (TOP * len(by["subject_main"])), 3)
        if by["subject_main"]
        else None,
        "search_subject_any_top3": _share([r["ok"] for r in by["subject_any"]]),
        "search_subject_any_top3_when_named": _share([r["ok"] for r in by["subject_any"] if r["named"]]),
        "search_text_line_top3": _share([r["ok"] for r in by["text_line"]]),
        "search_text_word_top3": _share([r["ok"] for r in by["text_word"]]),
        "like_copies_in_nearest": round(sum(r["copies_share"] for r in likes) / len(likes), 3) if likes else None,
        "like_top1": _share([r["ok"] for r in likes]),
    }


def evaluate(rows: list[dict], labels: list[dict], settings, progress=print) -> dict:
    """Search figures per split (``tune``, ``holdout``, ``all``, ``holdout_unseen_photos``)
    and every query's record. ``rows``: the sink's rows, image file stem = label id."""
    by_id = {lab["id"]: lab for lab in labels}
    rows = [r for r in rows if Path(r["image_path"]).stem in by_id and not r.get("error")]
    started = time.monotonic()
    records: list[dict] = []
    splits = sorted({lab["split"] for lab in labels})
    with tempfile.TemporaryDirectory(prefix="imgflow-search-quality-") as tmp:
        for split in splits + (["all"] if len(splits) > 1 else []):
            keep = [r for r in rows if split == "all" or by_id[Path(r["image_path"]).stem]["split"] == split]
            labs = [by_id[Path(r["image_path"]).stem] for r in keep]
            records += evaluate_split(split, keep, labs, settings, Path(tmp))
            progress(f"  search: {split} ({len(keep)} images) done ({time.monotonic() - started:.0f} s)")
    figures = {split: summarise([r for r in records if r["split"] == split]) for split in sorted({r["split"] for r in records})}
    if "all" not in figures and len(splits) == 1:
        figures["all"] = figures[splits[0]]
    unseen = [r for r in records if r["split"] == "holdout" and r["unseen"]]
    if unseen:
        figures["holdout_unseen_photos"] = summarise(unseen)
    return {
        "figures": figures,
        "queries": records,
        "seconds": round(time.monotonic() - started, 1),
        "models": {k: v for k, v in (rows[0]["models"] if rows else {}).items() if k in ("embed_text", "embed_image")},
    }


def merge(result: dict, search: dict) -> None:
    """Put the search figures into the quality result's figures (the same table and file)."""
    for split, figs in search["figures"].items():
        result["figures"].setdefault(split, {}).update(figs)
    result["search"] = {k: v for k, v in search.items() if k != "figures"}


def print_misses(search: dict) -> None:
    for r in search["queries"]:
        if r["kind"] == "like":
            if r["copies_share"] < 1:
                print(f"  like [{r['split']}] {r['query']}: nearest {r['top']}")
        elif not r["ok"]:
            named = "" if r.get("named", True) else " (no right image's description/keywords name it)"
            print(f"  miss [{r['split']}] {r['kind']} {r['query']!r}{named}: top {r['top']} (want {r['right'][:3]})")


def rows_of_output(out: Path) -> list[dict]:
    from imgflow.output.formats import read_avro
    from imgflow.output.layout import AVRO, INDEX, all_keys, sibling_key
    from imgflow.output.storage import LocalStorage

    output = LocalStorage(out)
    complete = set(all_keys(output, INDEX))
    rows = []
    for key in all_keys(output, AVRO):
        if sibling_key(key, INDEX) in complete:
            data = output.get(key)
            assert data is not None  # listed a moment ago, and the sink never deletes
            rows += read_avro(data)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.search_quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, required=True, help="a sink output folder (an imgflow run's)")
    ap.add_argument("--labels", type=Path, required=True, help="labels.json of quality.py --write-set")
    ap.add_argument("--set", action="append", default=[], metavar="ENV=VALUE", help="an IMGFLOW_* setting the run was made with (its models), repeatable")
    ap.add_argument("--out", type=Path, default=None, help="write the figures and queries to this JSON")
    args = ap.parse_args(argv)
    from imgflow.settings import Settings

    with environ(**dict(kv.split("=", 1) for kv in args.set)):
        settings = Settings()
    rows = rows_of_output(args.output)
    for r in rows:
        r["run_id"] = settings.run_id
    search = evaluate(rows, json.loads(args.labels.read_text()), settings)
    from benchmarks.quality import print_table

    print_table(f"search: {args.output}", search["figures"])
    print_misses(search)
    if args.out:
        args.out.write_text(json.dumps(search, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
