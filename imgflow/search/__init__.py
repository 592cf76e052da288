"""Finding results: a vector and full-text index derived from a sink output.

- ``index.py``: ``SearchIndex``, the LanceDB database that follows the output (its complete
  Avro batches are the source of truth; the index is rebuildable and never more), made of
  ``schema.py`` (the tables' columns), ``store.py`` (the folder, its tables, lookups),
  ``sync.py`` (taking in new batches) and ``ann.py`` (the approximate vector index);
- ``query.py``: ``Searcher``, search by meaning, by look-alike, and browsing, with filters;
- ``commands.py``: ``imgflow search`` and ``imgflow index``;
- ``web/``: ``imgflow serve``, the results as a web page.
"""

from __future__ import annotations

from imgflow.errors import ImgflowError


class SearchError(ImgflowError, ValueError):
    """A search that cannot be answered as asked; its message says what and what to do."""
