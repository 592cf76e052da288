"""The FastAPI app: the pages and the images (the JSON API: ``api.py``).

No JavaScript at all (the Content-Security-Policy forbids scripts). Images are addressed
only by ``event_id`` (``/thumb/{event_id}``, ``/image/{event_id}``): the id is looked up in the
index and its row's source URI read under the rules (``images.py``). No URL carries a path,
so no spelling of one can reach a file.
"""

import logging
import re
import time
from collections.abc import Callable
from importlib import resources
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse, Response

from imgflow.search import SearchError
from imgflow.search.query import Filters
from imgflow.search.web.api import add_api
from imgflow.search.web.images import PLACEHOLDER_SVG, ImageUnavailable
from imgflow.search.web.pages import Pages, row_fields
from imgflow.search.web.state import EVENT_ID, WebState

log = logging.getLogger(__name__)

PAGE_SIZE = 60  # images per page when browsing
SEARCH_LIMIT = 30  # hits per search
FAILED_PAGE = 100
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def header_text(text: str) -> str:
    """A reason fit for a response header (one line, ASCII, bounded)."""
    return re.sub(r"[^\x20-\x7e]", "?", text)[:200]


def link(**params) -> str:
    return "/?" + urlencode({k: v for k, v in params.items() if v not in (None, "", 0)})


def create_app(state: WebState) -> FastAPI:
    pages = Pages(state)
    css = resources.files("imgflow.search").joinpath("static/style.css").read_bytes()
    app = FastAPI(title="imgflow", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def security_headers(request, call_next):
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    def filters_of(category: str | None) -> Filters:
        return Filters(category=category or None)

    @app.get("/", response_class=HTMLResponse)
    def home(q: str | None = None, like: str | None = None, run: str | None = None, category: str | None = None, offset: Annotated[int, Query(ge=0)] = 0):
        q = (q or "").strip()
        started = time.perf_counter()
        model_error = state.model_error(q)  # before the lock: a first query may wait for them, pages go on
        with state.lock:
            run = run or state.default_run(state.index.runs())
            context: dict[str, Any] = {
                "run": run,
                "q": q,
                "category": category or "",
                "hits": [],
                "mode": "browse",
                "like_row": None,
                "newer": None,
                "older": None,
                "error": None,
            }
            if not state.index.runs():
                return pages.render("grid.html", **context)
            try:
                if model_error:
                    raise model_error
                if like:
                    if not EVENT_ID.fullmatch(like):
                        raise SearchError("more like this takes an image's event_id")
                    found = state.index.find(like)
                    context.update(mode="like", like_row=found[1] if found else None, hits=state.searcher.like(like, SEARCH_LIMIT, run, filters_of(category)))
                elif q:
                    context.update(mode="search", hits=state.searcher.search(q, SEARCH_LIMIT, run, filters_of(category)))
                else:
                    hits = state.searcher.browse(PAGE_SIZE + 1, offset, run, filters_of(category))
                    more, hits = len(hits) > PAGE_SIZE, hits[:PAGE_SIZE]
                    context.update(
                        hits=hits,
                        newer=link(run=run, category=category, offset=max(0, offset - PAGE_SIZE)) if offset else None,
                        older=link(run=run, category=category, offset=offset + PAGE_SIZE) if more else None,
                        offset=offset,
                    )
            except SearchError as exc:
                context["error"] = str(exc)
                return pages.render("grid.html", status=400, **context)
            log.debug("page %r in %.3f s", q or like or "browse", time.perf_counter() - started)
            return pages.render("grid.html", **context)

    @app.get("/item/{event_id}", response_class=HTMLResponse)
    def item(event_id: str):
        with state.lock:
            row = state.searcher.row(event_id) if EVENT_ID.fullmatch(event_id) else None
            if row is None:
                return pages.render("message.html", status=404, title="not found", message=f"no image with event_id {event_id!r} in the index")
            return pages.render("item.html", run=row.get("run_id"), row=row, fields=row_fields(row), failed=bool(row.get("error")))

    @app.get("/failed", response_class=HTMLResponse)
    def failed(run: str | None = None, offset: Annotated[int, Query(ge=0)] = 0):
        with state.lock:
            run = run or state.default_run(state.index.runs())
            rows = state.index.failed_rows(run, FAILED_PAGE + 1, offset)
            more, rows = len(rows) > FAILED_PAGE, rows[:FAILED_PAGE]
            return pages.render(
                "failed.html",
                run=run,
                rows=rows,
                offset=offset,
                newer=f"/failed?{urlencode({'run': run, 'offset': max(0, offset - FAILED_PAGE)})}" if offset else None,
                older=f"/failed?{urlencode({'run': run, 'offset': offset + FAILED_PAGE})}" if more else None,
            )

    def placeholder(reason: str) -> Response:
        return Response(PLACEHOLDER_SVG, media_type="image/svg+xml", headers={"Cache-Control": "no-store", "X-Imgflow-Placeholder": header_text(reason)})

    def from_source(event_id: str, what: str, respond: Callable[[str], Response]) -> Response:
        """``respond(uri)`` for an indexed image; 404 for an unknown id, a placeholder when its
        file is gone or refused (the page stays whole)."""
        uri = state.source_uri(event_id)
        if uri is None:
            return Response("no such image\n", status_code=404, media_type="text/plain")
        try:
            return respond(uri)
        except ImageUnavailable as exc:
            log.info("%s of %s: %s", what, event_id, exc)
            return placeholder(str(exc))

    @app.get("/thumb/{event_id}")
    def thumb(event_id: str):
        return from_source(
            event_id,
            "thumbnail",
            lambda uri: Response(state.images.thumbnail(event_id, uri), media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"}),
        )

    @app.get("/image/{event_id}")
    def image(event_id: str):
        def respond(uri: str) -> Response:
            data, mime = state.images.image(uri)
            return Response(data, media_type=mime, headers={"Cache-Control": "private, max-age=3600", "Content-Disposition": "inline"})

        return from_source(event_id, "image", respond)

    @app.get("/style.css")
    def style():
        return Response(css, media_type="text/css", headers={"Cache-Control": "max-age=300"})

    add_api(app, state)
    return app
