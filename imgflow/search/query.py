"""``Searcher``: search by meaning, by look-alike, and browse, over a ``SearchIndex``.

A text query is ranked three ways and the rankings fused (reciprocal rank fusion: each list
adds 1 / (60 + rank), so an image found by several ways rises, and no list's score scale
has to be comparable with another's):

1. the query through the sentence model that made ``text_vector`` (the description's);
2. where the vision model has a text tower (CLIP, the production profile), the query through
   it against ``image_vector``;
3. full text over description, keywords, read text (``words``): a word printed on the image
   or a keyword finds it even where the description's meaning does not.

``--like`` ranks by ``image_vector`` alone, in the space (run + models) of the image asked about.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime

from imgflow.search import SearchError
from imgflow.search.ann import vector_query
from imgflow.search.index import SearchIndex
from imgflow.search.schema import SHOWN, sql_text
from imgflow.search.store import Space
from imgflow.settings import Settings

log = logging.getLogger(__name__)

RRF_K = 60
CANDIDATES = 5  # each list is asked for this many times the hits wanted


@dataclass
class Hit:
    rank: int
    score: float
    event_id: str
    run_id: str
    image_path: str
    source_uri: str
    category: str
    description: str
    keywords: list[str]
    image_text: str
    timestamp: str
    matched: list[str] = field(default_factory=list)  # which rankings found it: text, image, words

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Filters:
    category: str | None = None
    keyword: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def where(self) -> str | None:
        parts = []
        if self.category:
            parts.append(f"category = {sql_text(self.category)}")
        if self.keyword:
            parts.append(f"array_has(keywords, {sql_text(self.keyword)})")
        if self.since:
            parts.append(f"timestamp >= TIMESTAMP '{self.since.isoformat(sep=' ')}'")
        if self.until:
            parts.append(f"timestamp < TIMESTAMP '{self.until.isoformat(sep=' ')}'")
        return " AND ".join(parts) or None


def _hit(row: dict, rank: int, score: float, matched: list[str]) -> Hit:
    ts = row.get("timestamp")
    return Hit(
        rank=rank,
        score=round(float(score), 6),
        event_id=row["event_id"],
        run_id=row["run_id"],
        image_path=row["image_path"],
        source_uri=row["source_uri"],
        category=row["category"],
        description=row["description"],
        keywords=list(row["keywords"] or []),
        image_text=row["image_text"],
        timestamp=ts.isoformat() if isinstance(ts, datetime) else str(ts),
        matched=matched,
    )


def fts_terms(query: str) -> str:
    """The query as plain words: full-text syntax (quotes, colons, operators) never errors."""
    return " ".join(re.findall(r"\w+", query))


class Searcher:
    def __init__(self, index: SearchIndex, settings: Settings, cache=None) -> None:
        self.index = index
        self.settings = settings
        self._cache = cache
        self._text_model = None
        self._image_model = None

    # -- models: the ones the pipeline is configured with, so a query is embedded as the rows were
    def _adapter(self, job: str):
        from imgflow.models.registry import build_adapter

        return build_adapter(self.settings, job, self._cache)

    @property
    def text_model(self):
        if self._text_model is None:
            self._text_model = self._adapter("embed_text")
        return self._text_model

    @property
    def image_model(self):
        if self._image_model is None:
            self._image_model = self._adapter("embed_image")
        return self._image_model

    # -- which space a query goes to
    def _run(self, run: str | None) -> str:
        run = run or self.settings.run_id
        if not self.index.spaces:
            raise SearchError(
                f"the search index of {self.index.out} is empty: no complete batch of results yet (is the sink running? imgflow index shows what is there)"
            )
        if run not in self.index.runs():
            raise SearchError(f"no run {run!r} in the results at {self.index.out}; runs: {', '.join(self.index.runs())} (--run)")
        return run

    def _space(self, run: str) -> Space:
        """The run's space whose sentence model is the configured one."""
        spaces = self.index.spaces_of(run)
        if not spaces:
            raise SearchError(f"run {run!r} has only error rows: nothing to search")
        want = self.text_model.model_id
        for space in spaces:
            if space.models.get("embed_text") == want:
                return space
        made = ", ".join(sorted({s.models.get("embed_text") or "?" for s in spaces}))
        raise SearchError(
            f"run {run!r} was indexed with sentence model {made}; the query would be embedded with "
            f"{want} (models.embed_text / models.sentence): set the model the run was made with, "
            "or replay the run with this one"
        )

    def _check_filters(self, run: str, filters: Filters) -> None:
        if filters.category:
            known = self.index.categories(run)
            if filters.category not in known:
                raise SearchError(f"no image of run {run!r} has category {filters.category!r}; categories: {', '.join(c for c in known if c) or 'none'}")

    def _check_query(self, query: str) -> str:
        query = query.strip()
        if not query:
            raise SearchError("empty query: give words to search for, or --like PATH_OR_EVENT_ID")
        limit = self.settings.search.max_query_chars
        if len(query) > limit:
            raise SearchError(f"query of {len(query)} characters; at most {limit} (search.max_query_chars): a query is a phrase, not a document")
        return query

    # -- the three ways
    def search(self, query: str, limit: int = 10, run: str | None = None, filters: Filters | None = None) -> list[Hit]:
        query = self._check_query(query)
        filters = filters or Filters()
        run = self._run(run)
        self._check_filters(run, filters)
        space = self._space(run)
        table = self.index.table(space.name)
        where = filters.where()
        k = max(limit * CANDIDATES, 20)
        rankings: dict[str, list[dict]] = {}
        text_vec = self.text_model.embed_texts([query])[0]
        rankings["text"] = vector_query(table, "text_vector", text_vec, k, where, self.settings, space.ann).to_list()
        # CLIP's text tower, where the rows' image vectors are CLIP's (the model is built only then)
        clip_text = getattr(self.image_model, "embed_query_texts", None) if space.models.get("embed_image", "").startswith("open_clip:") else None
        if clip_text is not None and space.models.get("embed_image") == self.image_model.model_id:
            vec = clip_text([query])[0]
            rankings["image"] = vector_query(table, "image_vector", vec, k, where, self.settings, space.ann).to_list()
        terms = fts_terms(query)
        if terms:
            q = table.search(terms, query_type="fts", fts_columns="words")
            if where:
                q = q.where(where, prefilter=True)
            rankings["words"] = q.limit(k).to_list()
        return fuse(rankings, limit)

    def like(self, ref: str, limit: int = 10, run: str | None = None, filters: Filters | None = None) -> list[Hit]:
        filters = filters or Filters()
        if not self.index.spaces:
            self._run(run)
        found = self.index.find(ref, run)
        if found is None:
            in_run = f" in run {run!r}" if run else ""
            raise SearchError(
                f"{ref!r} is not in the search index{in_run}: give an indexed image's path or event_id "
                "(an image that failed has no vectors; see imgflow search --failed)"
            )
        space, row = found
        self._check_filters(space.run_id, filters)
        table = self.index.table(space.name)
        where = filters.where()
        not_itself = f"event_id != {sql_text(row['event_id'])}"
        where = f"{where} AND {not_itself}" if where else not_itself
        rows = vector_query(table, "image_vector", row["image_vector"], limit, where, self.settings, space.ann).to_list()
        return [_hit(r, i, 1.0 - float(r["_distance"]), ["image"]) for i, r in enumerate(rows, 1)]

    def browse(self, limit: int = 60, offset: int = 0, run: str | None = None, filters: Filters | None = None) -> list[Hit]:
        """The newest images first (the results page with no query). Rows are appended as
        the sink's batches complete, so the newest are the last: a page is read from the end,
        never the whole table (memory: one page)."""
        filters = filters or Filters()
        run = self._run(run)
        self._check_filters(run, filters)
        where = filters.where()
        hits: list[Hit] = []
        skip = offset
        for space in reversed(self.index.spaces_of(run)):
            table = self.index.table(space.name)
            total = table.count_rows(where) if where else space.rows
            if skip >= total:
                skip -= total
                continue
            want = limit - len(hits)
            start = max(0, total - skip - want)
            q = table.search().select(SHOWN)
            if where:
                q = q.where(where)
            rows = q.offset(start).limit(total - skip - start).to_list()
            skip = 0
            hits += [_hit(r, 0, 0.0, []) for r in reversed(rows)]
            if len(hits) >= limit:
                break
        for i, hit in enumerate(hits, offset + 1):
            hit.rank = i
        return hits

    def row(self, event_id: str) -> dict | None:
        """An image's full row (a result or an error row), vectors as lists."""
        found = self.index.find(event_id, by_id_only=True)
        stored = found[1] if found is not None else self.index.find_failed(event_id)
        if stored is None:
            return None
        row = dict(stored)
        row.pop("words", None)
        row.pop("batch", None)
        row["models"] = json.loads(row.get("models") or "{}")
        for key, value in list(row.items()):
            if hasattr(value, "tolist"):
                row[key] = value.tolist()
            elif hasattr(value, "isoformat"):
                row[key] = value.isoformat()
        return row


def fuse(rankings: dict[str, list[dict]], limit: int) -> list[Hit]:
    """Reciprocal rank fusion of the rankings (module docstring)."""
    scores: dict[str, float] = {}
    rows: dict[str, dict] = {}
    found_by: dict[str, list[str]] = {}
    for name, ranked in rankings.items():
        # equal scores (copies of one image: the same description) in a stable order
        ranked = sorted(ranked, key=lambda r: (r.get("_distance", -r.get("_score", 0.0)), r["event_id"]))
        for rank, row in enumerate(ranked, 1):
            eid = row["event_id"]
            scores[eid] = scores.get(eid, 0.0) + 1.0 / (RRF_K + rank)
            rows.setdefault(eid, row)
            found_by.setdefault(eid, []).append(name)
    best = sorted(scores, key=lambda e: (-scores[e], e))[:limit]
    return [_hit(rows[e], i, scores[e], found_by[e]) for i, e in enumerate(best, 1)]
