"""`imgflow search` and `imgflow index` over the output of a real `imgflow run` (the session
fixture ``search_run``): by meaning, by words on the image, by look-alike, with filters; the
index following the output; and the errors a user can make."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fastavro
import pytest

from imgflow.output.formats import avro_bytes, index_bytes
from imgflow.output.layout import AVRO, INDEX, data_key, sibling_key
from imgflow.output.storage import LocalStorage, S3Storage
from imgflow.search import SearchError
from imgflow.search.index import SearchIndex
from imgflow.search.query import Filters, Searcher
from imgflow.settings import Settings


def first_names(proc, n: int = 1) -> list[str]:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return [Path(line.split()[2]).name for line in lines[:n]]


CATS = {"chelsea_cat.png", "chelsea_mirrored.jpg"}  # the same photo twice: either may rank first


@pytest.mark.parametrize(
    "query, expected",
    [
        ("a cat", CATS),
        ("a cup of coffee", {"coffee.jpg"}),
        ("a person", {"astronaut.jpg"}),
        ("HARBOR", {"harbor_ticket.png"}),  # a word printed on the image
        ("fresh bread", {"open_sign.png"}),
    ],
)
def test_search_puts_the_image_first(search_run, query, expected):
    names = first_names(search_run.imgflow("search", query, "--limit", "3"), n=len(expected))
    assert set(names) == expected


def test_search_json_filters_and_like(search_run):
    proc = search_run.imgflow("search", "a cat", "--json", "--limit", "20")
    hits = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    assert all(hits[i]["score"] >= hits[i + 1]["score"] for i in range(len(hits) - 1))
    assert {"broken.jpg"} & {Path(h["image_path"]).name for h in hits} == set()  # error rows are not hits
    assert {Path(h["image_path"]).name for h in hits[:2]} == CATS
    cat = next(h for h in hits if Path(h["image_path"]).name == "chelsea_cat.png")
    assert cat["category"] and cat["run_id"] == "live" and "text" in cat["matched"]

    only = search_run.imgflow("search", "a cat", "--json", "--category", cat["category"], "--limit", "20")
    cats = {json.loads(line)["category"] for line in only.stdout.splitlines()}
    assert cats == {cat["category"]}

    # more like this: the mirrored, smaller copy is the nearest; never the image itself
    like = search_run.imgflow("search", "--like", cat["image_path"], "--json")
    names = [Path(json.loads(line)["image_path"]).name for line in like.stdout.splitlines()]
    assert names[0] == "chelsea_mirrored.jpg" and "chelsea_cat.png" not in names
    by_id = search_run.imgflow("search", "--like", cat["event_id"], "--limit", "1")
    assert first_names(by_id) == ["chelsea_mirrored.jpg"]

    failed = search_run.imgflow("search", "--failed")
    assert "broken.jpg" in failed.stdout and "not an image" in failed.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["search", "cat", "--out", "/nonexistent/out"], "no sink output at /nonexistent/out"),
        (["search", "x" * 10_000], "query of 10000 characters; at most 1000"),
        (["search", "cat", "--category", "spaceship"], "no image of run 'live' has category 'spaceship'; categories:"),
        (["search", "--like", "/tmp/not-indexed.jpg"], "'/tmp/not-indexed.jpg' is not in the search index"),
        (["search", "cat", "--run", "nope"], "no run 'nope' in the results"),
        (["search"], "give one of: a QUERY, --like"),
        (["search", "cat", "--since", "yesterday"], "--since 'yesterday': not a date"),
    ],
)
def test_bad_requests_are_clear_errors(search_run, args, message):
    proc = search_run.imgflow(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_empty_output_is_a_clear_error(search_run, tmp_path):
    (tmp_path / "out").mkdir()
    proc = search_run.imgflow("search", "cat", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "is empty: no complete batch of results yet" in proc.stderr


# ---- the index itself ------------------------------------------------------------------------
def batches(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in (out / AVRO).rglob("*.avro"))


def copy_batch(src: Path, dest: Path, key: str, complete: bool = True) -> None:
    for k in [key] + ([sibling_key(key, INDEX)] if complete else []):
        (dest / k).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / k, dest / k)


def read_rows(out: Path, key: str) -> list[dict]:
    with (out / key).open("rb") as f:
        return list(fastavro.reader(f))


def local_settings(tmp_path: Path, **search) -> Settings:
    return Settings(data_dir=tmp_path / "data", search=search)


def test_index_follows_the_output_complete_batches_only(search_run, tmp_path):
    src, out = search_run.out, tmp_path / "out"
    keys = batches(src)
    rows_in = {k: len(read_rows(src, k)) for k in keys}
    assert len(keys) >= 2
    out.mkdir()
    copy_batch(src, out, keys[0])
    copy_batch(src, out, keys[1], complete=False)  # the sink is still writing this one
    settings = local_settings(tmp_path)
    index = SearchIndex(out, settings)
    first = index.sync()
    assert first.batches == 1 and first.incomplete == 1
    assert first.rows + first.failed == rows_in[keys[0]]

    for key in keys[1:]:
        copy_batch(src, out, key)
    second = index.sync()
    assert second.batches == len(keys) - 1 and second.incomplete == 0
    total = sum(rows_in.values())
    assert index.count() + index.failed_count() == total
    assert index.sync().batches == 0  # nothing new: nothing added twice

    # derived data: deleted, it is made again the same
    shutil.rmtree(index.dir)
    again = SearchIndex(out, settings)
    again.sync()
    assert again.count() == index.count() and again.failed_count() == index.failed_count()
    assert again.rebuild().rows == again.count()


def test_a_sync_cut_short_is_not_counted_twice(search_run, tmp_path):
    """A crash between appending a chunk and recording it: the next sync drops that chunk's
    rows and takes it in again (the pending keys of meta.json)."""
    out = tmp_path / "out"
    shutil.copytree(search_run.out / AVRO, out / AVRO)
    shutil.copytree(search_run.out / INDEX, out / INDEX)
    index = SearchIndex(out, local_settings(tmp_path))
    index.sync()
    images, failed = index.count(), index.failed_count()
    key = next(k for k, n in index.meta["batches"].items() if n)
    del index.meta["batches"][key]  # as if the crash came after the append, before the record
    index.meta["pending"] = [key]
    index._write_meta()
    again = SearchIndex(out, local_settings(tmp_path))
    assert again.sync().batches == 1
    assert (again.count(), again.failed_count()) == (images, failed)
    searcher = Searcher(again, again.settings)
    ids = [h.event_id for h in searcher.browse(limit=1000)]
    assert len(ids) == len(set(ids)) == images
    # pages of the newest-first listing: consecutive, together the whole listing
    pages = [h.event_id for o in range(0, images, 3) for h in searcher.browse(limit=3, offset=o)]
    assert pages == ids and [h.rank for h in searcher.browse(limit=2, offset=2)] == [3, 4]


def test_runs_are_kept_apart_and_models_checked(search_run, tmp_path):
    """A replay run's rows are searched only with --run; a run whose rows were embedded by
    another sentence model than the configured one says which."""
    out = tmp_path / "out"
    shutil.copytree(search_run.out / AVRO, out / AVRO)
    shutil.copytree(search_run.out / INDEX, out / INDEX)
    live_rows = [r for k in batches(search_run.out) for r in read_rows(search_run.out, k) if not r["error"]]
    cat = next(r for r in live_rows if r["image_path"].endswith("chelsea_cat.png"))
    replayed = [{**cat, "run_id": "replay-1", "source_offset": 0}]
    other_model = [
        {**r, "run_id": "other-model", "models": {**r["models"], "embed_text": "some-other-model@123"}, "source_offset": i} for i, r in enumerate(live_rows)
    ]
    output = LocalStorage(out)
    for offset, rows in ((900_000, replayed), (900_100, other_model)):
        key = data_key(AVRO, "images.enriched", 0, offset)
        output.put(key, avro_bytes(rows))
        output.put(sibling_key(key, INDEX), index_bytes(rows))
    settings = local_settings(tmp_path)
    index = SearchIndex(out, settings)
    index.sync()
    assert index.runs() == ["live", "other-model", "replay-1"]
    searcher = Searcher(index, settings)
    assert {h.run_id for h in searcher.search("a cat", 50)} == {"live"}
    assert [h.image_path for h in searcher.search("a cat", 50, run="replay-1")] == [cat["image_path"]]
    with pytest.raises(SearchError, match="indexed with sentence model some-other-model@123; the query would be embedded with all-MiniLM-L6-v2"):
        searcher.search("a cat", run="other-model")
    assert all(h.category == cat["categories"][0] for h in searcher.search("cat", 50, filters=Filters(keyword=cat["keywords"][0])))


def test_clip_text_tower_ranks_image_vectors(search_run, tmp_path):
    """Where the vision model is CLIP (production profile), the query also goes through its
    text encoder against image_vector: a second vector ranking in the fusion."""
    from PIL import Image

    from imgflow.models.cache import get_model_cache
    from imgflow.models.gpu.clip import OpenClipImageEmbedder
    from tests.tiny_models import build_tiny_clip

    cfg, weights = build_tiny_clip(tmp_path / "clip")
    settings = Settings(data_dir=tmp_path / "data", models={"clip": f"{cfg}:{weights}", "device": "cpu"})
    clip = OpenClipImageEmbedder(get_model_cache(settings), f"{cfg}:{weights}", "cpu")
    rows = [r for k in batches(search_run.out) for r in read_rows(search_run.out, k) if not r["error"]]
    for r in rows:
        with Image.open(r["image_path"]) as img:
            r["image_vector"] = clip.embed_images([img.convert("RGB")])[0].tolist()
        r["models"] = {**r["models"], "embed_image": clip.model_id}
    out = tmp_path / "out"
    key = data_key(AVRO, "images.enriched", 0, 0)
    LocalStorage(out).put(key, avro_bytes(rows))
    LocalStorage(out).put(sibling_key(key, INDEX), index_bytes(rows))
    index = SearchIndex(out, settings)
    index.sync()
    hits = Searcher(index, settings).search("a cat", 20)
    assert any("image" in h.matched for h in hits)
    assert hits[0].image_path.endswith(("chelsea_cat.png", "chelsea_mirrored.jpg"))


def test_search_an_s3_output(search_run, s3_server, s3_bucket, tmp_path):
    """An output on S3 (the sink's layout under s3://BUCKET/PREFIX/) is indexed the same."""
    uri = f"s3://{s3_bucket}/results/"
    settings = Settings(data_dir=tmp_path / "data", s3=s3_server.settings_section())
    output = S3Storage(uri, settings)
    for path in sorted((search_run.out / AVRO).rglob("*")) + sorted((search_run.out / INDEX).rglob("*")):
        if path.is_file():
            output.put(str(path.relative_to(search_run.out)), path.read_bytes())
    index = SearchIndex(uri, settings)
    summary = index.sync()
    local = SearchIndex(search_run.out, local_settings(tmp_path / "local"))
    local.sync()
    assert summary.rows == local.count() and summary.failed == local.failed_count()
    assert Searcher(index, settings).search("HARBOR", 1)[0].image_path.endswith("harbor_ticket.png")
