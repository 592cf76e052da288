"""The JSON API beside the pages: ``/api/search``, ``/api/row/{event_id}``, ``/api/status``."""

import time
from typing import Annotated

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse

from imgflow.search import SearchError
from imgflow.search.query import Filters
from imgflow.search.web.state import EVENT_ID, WebState


def add_api(app: FastAPI, state: WebState) -> None:
    @app.get("/api/search")
    def api_search(
        q: str | None = None,
        like: str | None = None,
        run: str | None = None,
        category: str | None = None,
        keyword: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 10,
    ):
        if bool((q or "").strip()) == bool(like):
            return JSONResponse({"error": "give one of q (words) or like (an event_id)"}, status_code=400)
        started = time.perf_counter()
        filters = Filters(category=category or None, keyword=keyword or None)
        model_error = state.model_error(q)
        with state.lock:
            try:
                if model_error:
                    raise model_error
                hits = state.searcher.like(like, limit, run, filters) if like else state.searcher.search(q or "", limit, run, filters)
            except SearchError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        return {
            "query": q,
            "like": like,
            "run": run or state.default_run(state.index.runs()),
            "seconds": round(time.perf_counter() - started, 4),
            "hits": [h.to_json() for h in hits],
        }

    @app.get("/api/row/{event_id}")
    def api_row(event_id: str):
        with state.lock:
            row = state.searcher.row(event_id) if EVENT_ID.fullmatch(event_id) else None
        if row is None:
            return JSONResponse({"error": f"no image with event_id {event_id!r} in the index"}, status_code=404)
        return row

    @app.get("/api/status")
    def api_status():
        with state.lock:
            index = state.index
            return {
                "output": str(state.out),
                "index": str(index.dir),
                "synced_at": state.synced_at,
                "sync_error": state.sync_error,
                "images_shown": state.images.allowed,
                "runs": {r: {"images": index.count(r), "failed": index.failed_count(r), "categories": index.categories(r)} for r in index.runs()},
            }
