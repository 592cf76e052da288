"""The commands that work through what is already there: `backfill`, `replay`, `export csv`,
`models`."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from imgflow.app.options import DataDir, StageName, require_kafka, stop_on_signals
from imgflow.cli_support import command_settings, exit_with_error


def backfill(
    source: Annotated[str, typer.Argument(help="Folder (searched recursively) or s3://BUCKET/PREFIX.")],
    force: Annotated[
        bool, typer.Option("--force", help="Reprocess images that already have a result (as a run of its own: new rows with this backfill's run id).")
    ] = False,
    high: Annotated[bool, typer.Option("--high", help="Publish to the high-priority topic.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would be published and skipped; publish nothing.")] = False,
    run_id: Annotated[str | None, typer.Option("--run-id", help="Name of the backfill (default: new, or the unfinished one of the same command).")] = None,
    out: Annotated[str | None, typer.Option("--out", help="Output whose results the skip check reads (default: sink.out_dir).")] = None,
    chunk_size: Annotated[int, typer.Option("--chunk-size", min=1, help="Events per Kafka transaction.")] = 5000,
    data_dir: DataDir = None,
) -> None:
    """Publish one event per image of SOURCE in bulk, skipping images that already have a result.
    Safe to interrupt: the same command again resumes and publishes nothing twice."""
    settings = command_settings(data_dir=data_dir)
    require_kafka(settings)
    from confluent_kafka import KafkaException

    from imgflow.kafka import ensure_topics
    from watchers.backfill import Backfill, BackfillError, BackfillProgress, open_source, pick_job

    try:
        src = open_source(source, settings)
        ensure_topics(settings)
        job, resumed = pick_job(settings, source, force, high, run_id)
        if job.status == "done":
            typer.echo(f"backfill {job.job_id} is already complete: {job.published} published, {job.skipped} skipped")
            return
        typer.echo(
            f"{'resuming' if resumed else 'starting'} backfill {job.job_id} of {job.source}"
            f"{' (dry run)' if dry_run else ''}: events with run_id {job.run_id!r}"
            f"{', forced' if force else ''} to {settings.topics.new_high if high else settings.topics.new}"
        )
        runner = Backfill(settings, job, out or settings.sink.out_dir, chunk=chunk_size)
        stop_on_signals(runner)
        bar = BackfillProgress(src.count(), job.published + job.skipped)
        try:
            job = runner.run(src, bar, dry_run=dry_run)
        finally:
            bar.close()
    except (BackfillError, KafkaException) as exc:
        exit_with_error(exc, 2 if isinstance(exc, BackfillError) else 1)
    verb = "would publish" if dry_run else "published"
    state = "complete" if job.status == "done" else "interrupted (run the same command again to resume)"
    typer.echo(f"backfill {job.job_id} {state}: {verb} {job.published}, skipped {job.skipped} that have a result")


def replay(
    stage_name: Annotated[StageName | None, typer.Option("--stage", help="The stage to re-run; the stages after it run too.")] = None,
    range_from: Annotated[
        str, typer.Option("--from", help="Start: an offset (every partition), a time (2026-11-29T01:00:00Z, @<epoch ms>) or 'start'.")
    ] = "start",
    range_to: Annotated[str, typer.Option("--to", help="End, exclusive: an offset, a time, or 'end' (the end when the run is created).")] = "end",
    run_id: Annotated[str | None, typer.Option("--run-id", help="Name of the run (default: new, or the unfinished run of the same command).")] = None,
    out: Annotated[str | None, typer.Option("--out", help="Output folder or s3:// prefix of the run (default: <live out>/runs/<run id>/).")] = None,
    list_runs: Annotated[bool, typer.Option("--list", help="List past and running replays and exit.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Re-run a stage (and those after it) over a range of its input topic as a separate run:
    own groups, topics, run_id and output; the live pipeline is not touched."""
    settings = command_settings(data_dir=data_dir)
    require_kafka(settings)
    from imgflow.app import replay as rp
    from imgflow.app.replay_range import ReplayError, parse_point

    try:
        if list_runs:
            runs = rp.list_runs(settings)
            typer.echo(f"{'run id':<32} {'stage':<7} {'range':<48} {'created':<26} {'status':<8} results")
            for r in runs:
                results = "" if r.results < 0 else f"{r.results} ({r.errors} errors)"
                typer.echo(f"{r.run_id:<32} {r.stage:<7} {r.range_from + ' .. ' + r.range_to:<48} {r.created_at:<26} {r.status:<8} {results}")
            if not runs:
                typer.echo("no replays yet")
            return
        if stage_name is None:
            typer.echo("error: --stage vision|enrich|sink is required (or --list)", err=True)
            raise typer.Exit(2)
        start, stop = parse_point(range_from, "--from"), parse_point(range_to, "--to")
        if start.kind == "end" or stop.kind == "start":
            raise ReplayError("--from must not be 'end' and --to must not be 'start'")
        record, resumed = rp.prepare_run(settings, stage_name.value, start, stop, run_id, out)
    except ReplayError as exc:
        exit_with_error(exc)
    if resumed and record.status != "done":
        typer.echo(f"resuming run {record.run_id}")
    stop_requested: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stop_requested.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _frame: stop_requested.append(signum))
    code = rp.execute(settings, record, settings.data_dir / "logs" / "replay", lambda: bool(stop_requested), say=lambda line: typer.echo(line))
    raise typer.Exit(code)


def export_csv(
    src: Annotated[str, typer.Argument(help="A sink output: folder or s3://BUCKET/PREFIX/.")],
    out: Annotated[Path | None, typer.Option("--out", help="CSV file to write (default: standard output).")] = None,
) -> None:
    """One CSV with the seed's header from a sink output: on S3 its CSV parts merged in
    (topic, partition, offset) order; locally the complete part of results.csv."""
    settings = command_settings()
    from imgflow.output.export import export_csv as export
    from imgflow.s3 import S3Error

    tmp = out.with_name(out.name + ".tmp") if out is not None else None
    try:
        if out is None or tmp is None:
            summary = export(src, settings, sys.stdout.buffer)
        else:
            from imgflow.progress import ProgressBar

            bar = ProgressBar("merging CSV parts", None, noun="parts", unit="", transient=True)
            try:
                with tmp.open("wb") as dest:
                    summary = export(src, settings, dest, progress=lambda n, total: bar.update(n, total=total))
            finally:
                bar.close()
            os.replace(tmp, out)  # the file appears whole or not at all
    except (S3Error, ValueError) as exc:
        exit_with_error(exc)
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()
    if summary.incomplete:
        typer.echo(
            f"note: {summary.incomplete} batch(es) have Avro files but no CSV part yet (being written, or "
            "completed when the sink next starts); their rows are not in this export",
            err=True,
        )
    if out is not None:
        typer.echo(f"wrote {out} ({summary.rows_files} part(s))", err=True)


def models(load: Annotated[bool, typer.Option("--load", help="Also load every model (slower, proves it loads).")] = False) -> None:
    """List the configured models, where they load from, and whether they load."""
    settings = command_settings()
    from imgflow.models.registry import check_models

    failed = 0
    for job, where, ok, message in check_models(settings, load=load):
        failed += not ok
        typer.echo(f"{'ok ' if ok else 'ERR'} {job:<15} {where}{'' if ok else '  ' + message}")
    raise typer.Exit(1 if failed else 0)
