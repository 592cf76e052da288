"""``imgflow serve``: the options, the listening socket, the first sync, the server.

Imports only typer at start (the CLI imports this module); the app is loaded when serving.
"""

import socket
from pathlib import Path
from typing import Annotated

import typer

from imgflow.cli_support import command_settings, exit_with_error


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
    from imgflow.search.web.state import WebState

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

    from imgflow.search.web.app import create_app

    app = create_app(state)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    index = state.index
    runs = index.runs()
    held = "; ".join(f"run {r}: {index.count(r)} image(s), {index.failed_count(r)} failed" for r in runs) or "no results yet"
    typer.echo(f"serving {where} ({held}) on http://{shown}:{bound_port}/  (Ctrl-C to stop)")
    if not state.images.allowed:
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
