"""``imgflow serve``: the results as a web page.

One FastAPI app, rendered on the server with Jinja2 (autoescape on: descriptions and read
text come from images anyone can drop in a folder, so a sign reading ``<script>`` is text),
no JavaScript at all (the Content-Security-Policy forbids scripts), and a small JSON API
beside it (``/api/search``, ``/api/row/{event_id}``, ``/api/status``).

Images are addressed only by ``event_id`` (``/thumb/{event_id}``, ``/image/{event_id}``):
the id is looked up in the index and its row's source URI read through ``ImageSource``,
the vision stage's rules (``allowed_roots``, ``s3.allowed_prefixes``, symlinks resolved,
``models.image_max_bytes``). No URL carries a path, so no spelling of one can reach a file.
With no allowed folder or prefix configured (nor ``--allow``) no image is served at all:
a web server, unlike a stage, must not read "anywhere" by default.

The index follows the output while serving: a thread syncs its own ``SearchIndex`` every
``search.sync_interval_s`` and, when the index changed (this sync or another process's),
the requests' index is reloaded under the one lock that requests hold.
"""

import io
import json
import logging
import math
import os
import re
import socket
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

from imgflow.cli_support import command_settings, exit_with_error

log = logging.getLogger(__name__)

THUMB_SIZE = 256  # longest side of a thumbnail, pixels
THUMB_QUALITY = 82
PAGE_SIZE = 60  # images per page when browsing
SEARCH_LIMIT = 30  # hits per search
FAILED_PAGE = 100
VECTOR_HEAD = 6  # values of a vector shown on an image's page
# event_ids are hex digests (imgflow.events.event_id_for: 32 characters); anything else
# in /thumb/ or /image/ is refused before any lookup.
EVENT_ID = re.compile(r"[0-9a-f]{16,64}")
# What a browser shows as it is; other formats Pillow reads are sent re-encoded as JPEG.
BROWSER_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
PLACEHOLDER_SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="256" height="192" viewBox="0 0 256 192">'
    b'<rect width="256" height="192" fill="#e4e4e7"/>'
    b'<path d="M88 124l28-36 22 26 14-16 22 26z" fill="#a1a1aa"/><circle cx="160" cy="74" r="10" fill="#a1a1aa"/>'
    b'<text x="128" y="168" font-family="sans-serif" font-size="14" fill="#52525b" text-anchor="middle">'
    b"image not available</text></svg>"
)


class ImageUnavailable(Exception):
    """The row is there, its image cannot be shown (refused, missing, not an image, store down)."""


class WebState:
    """What the app serves from: the requests' index and searcher, the sync thread, the images."""

    def __init__(self, out: str, settings) -> None:
        from imgflow.images import ImageSource
        from imgflow.search.index import SearchIndex
        from imgflow.search.query import Searcher

        self.out = out
        self.settings = settings
        self.index = SearchIndex(out, settings)  # the requests' view, reloaded after syncs
        self._syncer = SearchIndex(out, settings)  # the sync thread's own
        self.searcher = Searcher(self.index, settings)
        self.lock = threading.RLock()  # requests vs. reload
        self.model_lock = threading.Lock()  # the query models load once
        # A page must not hang for s3.outage_retry_s on a store that is down: a placeholder now.
        quick = settings.model_copy(deep=True)
        quick.s3.outage_retry_s = 0.0
        self.source = ImageSource(quick)
        self.images_allowed = bool(self.source.roots or self.source.prefixes)
        self.thumbs = self.index.dir / "thumbs"
        self.sync_error: str | None = None
        self.synced_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warming = False

    # -- following the output
    def sync(self) -> None:
        """One sync; the requests see its result (and any other process's) from now on."""
        self._syncer.sync()
        self.synced_at = time.time()
        self.sync_error = None
        if self._syncer.meta != self.index.meta:
            with self.lock:
                self.index.reload()
        if self._thread is not None:
            self._warm_if_needed()

    def _follow(self) -> None:
        from imgflow.search import SearchError

        while not self._stop.wait(self.settings.search.sync_interval_s):
            try:
                self.sync()
            except SearchError as exc:
                self.sync_error = str(exc)
                log.warning("search index: %s (trying again in %.0f s)", exc, self.settings.search.sync_interval_s)
            except Exception as exc:  # noqa: BLE001 - logged, never fatal: the page serves what it has
                self.sync_error = f"{type(exc).__name__}: {exc}"
                log.exception("search index: sync failed (trying again in %.0f s)", self.settings.search.sync_interval_s)

    def _warm_if_needed(self) -> None:
        """Once there is something to search (an empty output loads no model until it fills)."""
        if not self._warming and self.index.spaces:
            self._warming = True
            threading.Thread(target=self.warm_up, name="warm-up", daemon=True).start()

    def warm_up(self) -> None:
        """Load the query models now, so the first search does not wait for them."""
        try:
            self.models()
        except Exception as exc:  # noqa: BLE001 - a search will say it again, with the reason
            log.warning("could not load the query models: %s", exc)

    def models(self) -> None:
        """The query models, loaded once; a model that cannot load is a SearchError (a page
        that says why, not a 500)."""
        from imgflow.search import SearchError

        with self.model_lock:
            try:
                self.searcher.text_model  # noqa: B018 - loads it
                self.searcher.image_model  # noqa: B018
            except Exception as exc:  # noqa: BLE001 - ModelError, a missing file...: said on the page
                raise SearchError(f"the query models could not be loaded: {exc} (imgflow models)") from None

    def start(self) -> None:
        self._warm_if_needed()
        self._thread = threading.Thread(target=self._follow, name="index-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    # -- images
    def source_uri(self, event_id: str) -> str | None:
        """The source URI of an indexed row (image or error row), None if there is none."""
        from imgflow.search.schema import sql_text

        if not EVENT_ID.fullmatch(event_id):
            return None
        with self.lock:
            found = self.index.find(event_id)
            if found is not None:
                return found[1]["source_uri"] if found[1]["event_id"] == event_id else None
            for run in self.index.runs():
                table = self.index.failed_table(run)
                if table is None:
                    continue
                rows = table.search().where(f"event_id = {sql_text(event_id)}").select(["source_uri"]).limit(1).to_list()
                if rows:
                    return rows[0]["source_uri"]
        return None

    def _read(self, uri: str) -> bytes:
        from imgflow.errors import BadInput
        from imgflow.s3 import S3Error

        if not self.images_allowed:
            raise ImageUnavailable("no allowed folder or prefix (allowed_roots, s3.allowed_prefixes, --allow)")
        try:
            return self.source.read(uri)
        except (BadInput, S3Error) as exc:
            raise ImageUnavailable(str(exc)) from None

    def _may_read(self, uri: str) -> bool:
        """Whether the rules still allow ``uri`` (a cached thumbnail is not served past them)."""
        from imgflow.events import path_from_uri
        from imgflow.s3 import parse_s3_uri

        if not self.images_allowed:
            return False
        try:
            if uri.startswith("s3://"):
                loc = parse_s3_uri(uri)
                return self.source.allowed(loc.bucket, loc.key)
            resolved = path_from_uri(uri).resolve()
        except (ValueError, OSError, RuntimeError):
            return False
        return not self.source.roots or any(resolved.is_relative_to(r) for r in self.source.roots)

    def thumbnail(self, event_id: str, uri: str) -> bytes:
        from imgflow.images import BadImage, prepare_image

        cached = self.thumbs / f"{event_id}.jpg"
        if cached.exists() and self._may_read(uri):
            return cached.read_bytes()
        data = self._read(uri)
        try:
            prepared = prepare_image(data, THUMB_SIZE, self.settings.models.image_max_pixels)
        except BadImage as exc:
            raise ImageUnavailable(str(exc)) from None
        buf = io.BytesIO()
        prepared.image.save(buf, "JPEG", quality=THUMB_QUALITY, optimize=True)
        self.thumbs.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.thumbs, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, cached)  # whole or not at all; made once per event_id (its content version)
        return buf.getvalue()

    def image(self, uri: str) -> tuple[bytes, str]:
        from PIL import Image, UnidentifiedImageError

        from imgflow.images import BadImage, prepare_image

        data = self._read(uri)
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format or ""
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise ImageUnavailable(f"not an image: {exc}") from None
        if fmt in BROWSER_FORMATS:
            return data, BROWSER_FORMATS[fmt]
        try:
            prepared = prepare_image(data, 4096, self.settings.models.image_max_pixels)
        except BadImage as exc:
            raise ImageUnavailable(str(exc)) from None
        buf = io.BytesIO()
        prepared.image.save(buf, "JPEG", quality=90)
        return buf.getvalue(), "image/jpeg"


# -- what the templates show ------------------------------------------------------------------
def _when(value) -> str:
    """A timestamp as 2026-12-04 23:19:59 UTC."""
    text = value.isoformat() if hasattr(value, "isoformat") else str(value or "")
    match = re.match(r"(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d:\d\d)", text)
    return f"{match.group(1)} {match.group(2)} UTC" if match else text


def vector_summary(values) -> dict:
    values = [float(v) for v in values or []]
    return {"dim": len(values), "head": [f"{v:.4f}" for v in values[:VECTOR_HEAD]], "norm": f"{math.sqrt(sum(v * v for v in values)):.4f}"}


def row_fields(row: dict) -> list[dict]:
    """Every column of a row, each as a kind the template knows how to show."""
    fields = []
    for name, value in row.items():
        if name.endswith("_vector"):
            fields.append({"name": name, "kind": "vector", "value": vector_summary(value)})
        elif isinstance(value, dict):
            fields.append({"name": name, "kind": "map", "value": sorted((k, str(v)) for k, v in value.items())})
        elif isinstance(value, list):
            fields.append({"name": name, "kind": "list", "value": [str(v) for v in value]})
        elif name == "llama_extracted" and value:
            try:
                pretty = json.dumps(json.loads(value), indent=2, ensure_ascii=False)
            except ValueError:
                pretty = str(value)
            fields.append({"name": name, "kind": "pre", "value": pretty})
        elif name == "timestamp":
            fields.append({"name": name, "kind": "text", "value": _when(value)})
        else:
            fields.append({"name": name, "kind": "text", "value": "" if value is None else str(value)})
    return fields


def _templates():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("imgflow.search", "templates"),
        autoescape=True,  # every value is text unless a template says otherwise (none does)
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["basename"] = lambda p: (p or "").rstrip("/").rsplit("/", 1)[-1]
    return env


# -- the app ----------------------------------------------------------------------------------
def create_app(state: WebState):
    from urllib.parse import urlencode

    from fastapi import FastAPI, Query
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    from imgflow.search import SearchError
    from imgflow.search.query import Filters

    env = _templates()
    css = resources.files("imgflow.search").joinpath("static/style.css").read_bytes()
    app = FastAPI(title="imgflow", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def security_headers(request, call_next):
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    def page(name: str, status: int = 200, **context) -> HTMLResponse:
        index = state.index
        runs = index.runs()
        base = {
            "runs": runs,
            "run": context.pop("run", None) or default_run(runs),
            "categories": {},
            "category": "",
            "q": "",
            "total": 0,
            "failed_total": 0,
            "images_allowed": state.images_allowed,
            "sync_error": state.sync_error,
            "out": str(state.out),
            "empty": not runs,
        }
        base["categories"] = {c: n for c, n in index.categories(base["run"]).items() if c}
        base["total"] = index.count(base["run"])
        base["failed_total"] = index.failed_count(base["run"])
        base.update(context)
        return HTMLResponse(env.get_template(name).render(**base), status_code=status)

    def default_run(runs: list[str]) -> str:
        if state.settings.run_id in runs or not runs:
            return state.settings.run_id
        return max(runs, key=lambda r: (state.index.count(r), r))

    def filters_of(category: str | None) -> Filters:
        return Filters(category=category or None)

    def link(**params) -> str:
        return "/?" + urlencode({k: v for k, v in params.items() if v not in (None, "", 0)})

    def models_for(q: str | None) -> SearchError | None:
        """The query models loaded for a text query; what went wrong if they cannot be."""
        if not (q or "").strip():
            return None
        try:
            state.models()
        except SearchError as exc:
            return exc
        return None

    @app.get("/", response_class=HTMLResponse)
    def home(q: str | None = None, like: str | None = None, run: str | None = None, category: str | None = None, offset: Annotated[int, Query(ge=0)] = 0):
        q = (q or "").strip()
        started = time.perf_counter()
        model_error = models_for(q)  # before the lock: a first query may wait for them, pages go on
        with state.lock:
            run = run or default_run(state.index.runs())
            context = {
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
                return page("grid.html", **context)
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
                return page("grid.html", status=400, **context)
            log.debug("page %r in %.3f s", q or like or "browse", time.perf_counter() - started)
            return page("grid.html", **context)

    @app.get("/item/{event_id}", response_class=HTMLResponse)
    def item(event_id: str):
        with state.lock:
            row = state.searcher.row(event_id) if EVENT_ID.fullmatch(event_id) else None
            if row is None:
                return page("message.html", status=404, title="not found", message=f"no image with event_id {event_id!r} in the index")
            return page("item.html", run=row.get("run_id"), row=row, fields=row_fields(row), failed=bool(row.get("error")))

    @app.get("/failed", response_class=HTMLResponse)
    def failed(run: str | None = None, offset: Annotated[int, Query(ge=0)] = 0):
        with state.lock:
            run = run or default_run(state.index.runs())
            rows = state.index.failed_rows(run, FAILED_PAGE + 1, offset)
            more, rows = len(rows) > FAILED_PAGE, rows[:FAILED_PAGE]
            return page(
                "failed.html",
                run=run,
                rows=rows,
                offset=offset,
                newer=f"/failed?{urlencode({'run': run, 'offset': max(0, offset - FAILED_PAGE)})}" if offset else None,
                older=f"/failed?{urlencode({'run': run, 'offset': offset + FAILED_PAGE})}" if more else None,
            )

    def placeholder(reason: str) -> Response:
        return Response(PLACEHOLDER_SVG, media_type="image/svg+xml", headers={"Cache-Control": "no-store", "X-Imgflow-Placeholder": _header_text(reason)})

    def from_source(event_id: str, what: str, respond) -> Response:
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
            lambda uri: Response(state.thumbnail(event_id, uri), media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"}),
        )

    @app.get("/image/{event_id}")
    def image(event_id: str):
        def respond(uri: str) -> Response:
            data, mime = state.image(uri)
            return Response(data, media_type=mime, headers={"Cache-Control": "private, max-age=3600", "Content-Disposition": "inline"})

        return from_source(event_id, "image", respond)

    @app.get("/style.css")
    def style():
        return Response(css, media_type="text/css", headers={"Cache-Control": "max-age=300"})

    # -- JSON
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
        model_error = models_for(q)
        with state.lock:
            try:
                if model_error:
                    raise model_error
                hits = state.searcher.like(like, limit, run, filters) if like else state.searcher.search(q, limit, run, filters)
            except SearchError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        return {
            "query": q,
            "like": like,
            "run": run or default_run(state.index.runs()),
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
                "images_shown": state.images_allowed,
                "runs": {r: {"images": index.count(r), "failed": index.failed_count(r), "categories": index.categories(r)} for r in index.runs()},
            }

    return app


def _header_text(text: str) -> str:
    """A reason fit for a response header (one line, ASCII, bounded)."""
    return re.sub(r"[^\x20-\x7e]", "?", text)[:200]


# -- the command ------------------------------------------------------------------------------
def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == 98:  # EADDRINUSE
            exit_with_error(f"port {port} on {host} is in use (another imgflow serve?): choose another with --port, or --port 0 for any free one")
        exit_with_error(f"cannot listen on {host}:{port}: {exc.strerror or exc} (--host, --port)")
    sock.set_inheritable(True)
    return sock


def _allow(settings, allow: list[str]) -> None:
    """--allow: folders join allowed_roots, s3:// prefixes s3.allowed_prefixes."""
    from imgflow.s3 import parse_s3_uri

    for where in allow:
        if where.startswith("s3://"):
            try:
                parse_s3_uri(where)
            except ValueError as exc:
                exit_with_error(f"--allow {where}: {exc}")
            settings.s3.allowed_prefixes = [*settings.s3.allowed_prefixes, where]
        else:
            path = Path(where).expanduser().resolve()
            if not path.is_dir():
                exit_with_error(f"--allow {where}: no such folder (give a folder of images or an s3://BUCKET/PREFIX/)")
            settings.allowed_roots = [*settings.allowed_roots, path]


def serve(
    out: Annotated[str | None, typer.Option("--out", help="The sink output: a folder or s3://BUCKET/PREFIX/ (default: sink.out_dir, ./out).")] = None,
    host: Annotated[
        str,
        typer.Option(
            "--host", help="Address to listen on. The page has no login: keep 127.0.0.1 unless everyone who can reach the address may see the results."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free one).")] = 8080,
    allow: Annotated[
        list[str] | None,
        typer.Option(
            "--allow",
            metavar="DIR_OR_PREFIX",
            help="Show the images below this folder or s3://BUCKET/PREFIX/ (repeatable; added to "
            "allowed_roots / s3.allowed_prefixes). Images outside every allowed place are shown "
            "as a placeholder, and with none at all no image is read.",
        ),
    ] = None,
) -> None:
    """Browse and search the results in a web browser: thumbnails with description, category,
    keywords and read text; search by meaning and words; more like this; filters by run and
    category; every column of an image; the images that failed, with their errors. The index
    follows the output while serving (every search.sync_interval_s). Ctrl-C stops it."""
    from imgflow.images import ImageSource  # noqa: F401 - its settings errors, before anything starts
    from imgflow.search import SearchError

    settings = command_settings()
    _allow(settings, allow or [])
    where = out or str(settings.sink.out_dir)
    try:
        state = WebState(where, settings)
    except SearchError as exc:
        exit_with_error(exc)
    except Exception as exc:  # noqa: BLE001 - StageConfigError: a bad s3.allowed_prefixes
        from imgflow.errors import StageConfigError

        if isinstance(exc, StageConfigError):
            exit_with_error(exc)
        raise
    sock = _listen(host, port)  # before the first sync: a port in use is said at once
    from rich.progress import Progress

    try:
        with Progress(transient=True) as bar:
            bar.add_task("indexing new results", total=None)
            state.sync()
    except SearchError as exc:
        sock.close()
        exit_with_error(exc)
    import uvicorn

    app = create_app(state)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    index = state.index
    runs = index.runs()
    held = "; ".join(f"run {r}: {index.count(r)} image(s), {index.failed_count(r)} failed" for r in runs) or "no results yet"
    typer.echo(f"serving {where} ({held}) on http://{shown}:{bound_port}/  (Ctrl-C to stop)")
    if not state.images_allowed:
        typer.echo(
            "note: no allowed folder or prefix (allowed_roots, s3.allowed_prefixes): images are shown as "
            "placeholders; give --allow FOLDER or --allow s3://BUCKET/PREFIX/",
            err=True,
        )
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"note: listening on {host}: anyone who can reach it sees the results (there is no login)", err=True)
    state.start()
    config = uvicorn.Config(app, log_level="warning", access_log=False, log_config=None, timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        state.stop()
        sock.close()
