"""`imgflow search` and `imgflow index`: finding results from the command line."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

import typer

from imgflow.cli_support import command_settings, exit_with_error

OutOption = Annotated[str | None, typer.Option("--out", help="The sink output: a folder or s3://BUCKET/PREFIX/ (default: sink.out_dir, ./out).")]
RunOption = Annotated[str | None, typer.Option("--run", help="Which run (default: run_id, 'live').")]


def _when(text: str | None, option: str) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        exit_with_error(f"{option} {text!r}: not a date or time (ISO 8601, e.g. 2026-12-04 or 2026-12-04T10:00)")
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _open(settings, out: str | None, sync: bool = True, rebuild: bool = False):
    """The index of the output, brought up to date (a progress bar when there is much to read)."""
    from rich.console import Console
    from rich.progress import Progress

    from imgflow.search import SearchError
    from imgflow.search.index import SearchIndex

    where = out or str(settings.sink.out_dir)
    try:
        index = SearchIndex(where, settings)
        if sync or rebuild:
            with Progress(transient=True, console=Console(stderr=True)) as bar:  # stdout: hits only
                task = bar.add_task("indexing new results", total=None)

                def progress(done: int, total: int) -> None:
                    bar.update(task, completed=done, total=total)

                summary = index.rebuild(progress) if rebuild else index.sync(progress)
            return index, summary
        return index, None
    except SearchError as exc:
        exit_with_error(exc)


def search(
    query: Annotated[str | None, typer.Argument(help="What to find, in words.")] = None,
    like: Annotated[str | None, typer.Option("--like", help="Find the images that look like this one: its path or event_id.")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="List the images that failed, with their errors.")] = False,
    out: OutOption = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="How many hits.")] = 10,
    category: Annotated[str | None, typer.Option("--category", help="Only this category.")] = None,
    keyword: Annotated[str | None, typer.Option("--keyword", help="Only images with this keyword.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Processed at or after (ISO 8601).")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Processed before (ISO 8601).")] = None,
    run: RunOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per hit, for scripts.")] = False,
) -> None:
    """Find images by what is in them: by meaning (the description's sentence model, CLIP's
    text encoder where the vision model is CLIP), by words on the image and keywords, or by
    look-alike (--like). The index follows the output: new results are taken in first."""
    from imgflow.search import SearchError
    from imgflow.search.query import Filters, Searcher

    if sum(bool(x) for x in (query, like, failed)) != 1:
        exit_with_error("give one of: a QUERY, --like PATH_OR_EVENT_ID, or --failed (imgflow search --help)")
    settings = command_settings()
    index, _ = _open(settings, out)
    filters = Filters(category=category, keyword=keyword, since=_when(since, "--since"), until=_when(until, "--until"))
    searcher = Searcher(index, settings)
    try:
        if failed:
            _print_failed(index, run or settings.run_id, limit, as_json)
            return
        hits = searcher.like(like, limit, run, filters) if like else searcher.search(query or "", limit, run, filters)
    except SearchError as exc:
        exit_with_error(exc)
    if as_json:
        for hit in hits:
            typer.echo(json.dumps(hit.to_json(), ensure_ascii=False))
        return
    if not hits:
        typer.echo("no matches", err=True)
        raise typer.Exit(1)
    for hit in hits:
        typer.echo(f"{hit.rank:>3}  {hit.score:.4f}  {hit.image_path}  [{hit.category or '-'}]  {hit.description}")


def _print_failed(index, run: str, limit: int, as_json: bool) -> None:
    rows = index.failed_rows(run, limit)
    for row in rows:
        if as_json:
            typer.echo(json.dumps({k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items() if k != "batch"}, ensure_ascii=False))
        else:
            typer.echo(f"{row['image_path']}  [{row['failed_stage'] or '-'}]  {row['error']}")
    if not rows and not as_json:
        typer.echo(f"no failed images in run {run!r}", err=True)


def index(
    out: OutOption = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Drop the index and build it again from the output (it is derived data).")] = False,
) -> None:
    """Bring the search index of an output up to date (search and serve do this themselves),
    and say what it holds."""
    settings = command_settings()
    idx, summary = _open(settings, out, rebuild=rebuild)
    typer.echo(f"index {idx.dir}: {summary.batches} new batch(es), {summary.rows} row(s) added in {summary.seconds:.1f} s")
    if summary.incomplete:
        typer.echo(f"note: {summary.incomplete} batch(es) are still being written; searchable once complete")
    for run in idx.runs():
        cats = ", ".join(f"{c or '-'} {n}" for c, n in idx.categories(run).items())
        typer.echo(f"run {run}: {idx.count(run)} image(s), {idx.failed_count(run)} failed; {cats}")
