"""The approximate vector index: when a space gets one, how it is built, how it is queried.

Vectors are searched exactly (a flat scan) below ``search.ann_min_rows`` rows, through an
approximate index above (``search.ann_index_type``; figures in benchmarks/search_index.py).
New rows are searchable at once: Lance searches rows not yet in an index by scanning them,
and ``optimize`` folds them in every ``search.optimize_every_rows`` rows.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from imgflow.search.store import IndexStore
from imgflow.settings import Settings

log = logging.getLogger(__name__)


def maintain(store: IndexStore) -> None:
    """Approximate vector indexes once a space is large; fold new rows in now and then."""
    s = store.settings.search
    for space in store.meta["spaces"].values():
        if space["since_optimize"] < s.optimize_every_rows and (space["ann"] or space["rows"] < s.ann_min_rows):
            continue
        table = store.table(space["name"])
        if not space["ann"] and space["rows"] >= s.ann_min_rows:
            for column, dim in (("text_vector", space["dims"]["text"]), ("image_vector", space["dims"]["image"])):
                create_vector_index(table, column, dim, space["rows"], store.settings)
            space["ann"] = True
        else:
            table.optimize()
        space["since_optimize"] = 0


def create_vector_index(table: Any, column: str, dim: int, rows: int, settings: Settings) -> None:
    """The approximate index of one vector column (cosine). Partitions ~ sqrt(rows), as
    LanceDB advises for IVF; PQ sub-vectors of 16 dimensions (8 for dimensions not divisible)."""
    s = settings.search
    partitions = max(1, int(rows**0.5))
    t0 = time.monotonic()
    if s.ann_index_type == "IVF_PQ":
        sub = dim // 16 if dim % 16 == 0 else (dim // 8 if dim % 8 == 0 else 1)
        table.create_index(metric="cosine", vector_column_name=column, index_type="IVF_PQ", num_partitions=partitions, num_sub_vectors=sub, replace=True)
    else:
        table.create_index(metric="cosine", vector_column_name=column, index_type="IVF_HNSW_SQ", num_partitions=max(1, rows // 100_000), replace=True)
    log.info("search index: %s index on %s (%d rows, %d-d) in %.1f s", s.ann_index_type, column, rows, dim, time.monotonic() - t0)


def vector_query(table: Any, column: str, vector, limit: int, where: str | None, settings: Settings, ann: bool) -> Any:
    """A cosine nearest-neighbour query, filtered before the search (so a filter never
    empties a page of hits), exact below the ANN threshold."""
    q = table.search(np.asarray(vector, np.float32), vector_column_name=column).distance_type("cosine")
    if ann:
        q = q.nprobes(settings.search.ann_nprobes)
        if settings.search.ann_refine_factor > 1:  # re-rank refine x limit candidates on the full vectors
            q = q.refine_factor(settings.search.ann_refine_factor)
    else:
        q = q.bypass_vector_index()
    if where:
        q = q.where(where, prefilter=True)
    return q.limit(limit)
