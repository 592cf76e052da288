"""`imgflow`: the one console script."""

from __future__ import annotations

import functools
import inspect
import os
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from imgflow.cli_support import command_settings, exit_with_error

app = typer.Typer(help="Streaming, exactly-once image enrichment on Kafka.", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
watch_app = typer.Typer(help="Publish new-image events.", no_args_is_help=True)
app.add_typer(watch_app, name="watch")
export_app = typer.Typer(help="Export results.", no_args_is_help=True)
app.add_typer(export_app, name="export")

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Broker and watcher state (default: $IMGFLOW_DATA_DIR or ~/.local/state/imgflow).")]


class BrokerEngine(str, Enum):
    tansu = "tansu"
    kafka = "kafka"


_exit_with_error = exit_with_error


def _require_kafka(settings) -> None:
    """A long-running command against a cluster: the cluster must answer first (exit 2
    naming kafka.bootstrap, or the security setting it refused, after kafka.connect_timeout_s)."""
    from imgflow.kafka import KafkaUnreachable, check_kafka

    try:
        check_kafka(settings, settings.kafka.connect_timeout_s)
    except KafkaUnreachable as exc:
        _exit_with_error(exc)


def _stop_on_signals(runner) -> None:
    """SIGTERM and Ctrl-C ask ``runner`` to finish its current work and stop."""
    from imgflow.stage import install_signal_handlers

    install_signal_handlers(runner)


_settings = command_settings


@app.command()
def run(
    input_dir: Annotated[str | None, typer.Argument(help="Folder of images, or s3://BUCKET/PREFIX (default: a generated sample folder).")] = None,
    out: Annotated[
        str | None, typer.Option("--out", help="Output folder (results.csv, avro/) or s3://BUCKET/PREFIX/ (avro/, csv/ parts; default: ./out).")
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="Exit 0 when every image present at start has its result row.")] = False,
    data_dir: DataDir = None,
    port: Annotated[int, typer.Option(help="Embedded broker port (taken free if in use; 0: any free port).")] = 19092,
    engine: Annotated[
        BrokerEngine | None,
        typer.Option("--engine", help="Local broker to start: tansu (default, no Java) or kafka (Apache Kafka; Java 17+). Setting broker.engine."),
    ] = None,
    bootstrap: Annotated[
        str | None,
        typer.Option(
            "--bootstrap", help="Use this running Kafka cluster (HOST:PORT,...) instead of starting a local broker; security from the kafka.* settings."
        ),
    ] = None,
) -> None:
    """Embedded broker + watcher (folder or S3) + vision + enrich + sink, in one command."""
    from imgflow.s3 import is_s3_uri

    s3_input = is_s3_uri(input_dir)
    settings = _settings(data_dir=data_dir, sink__out_dir=out, broker__engine=engine.value if engine else None, kafka__bootstrap=bootstrap)
    from imgflow.pipeline import Pipeline
    from imgflow.samples import write_samples

    if s3_input:
        input_dir = _checked_s3_location(settings, input_dir)
    elif input_dir is None:
        input_dir = write_samples(settings.data_dir / "sample-images")
        typer.echo(f"no input folder given: processing the sample folder {input_dir}")
    else:
        input_dir = Path(input_dir)
    if not s3_input and not input_dir.is_dir():
        typer.echo(f"error: input folder does not exist: {input_dir}", err=True)
        raise typer.Exit(2)
    _check_output(settings)
    from imgflow.kafka import KafkaUnreachable
    from imgflow.stack import StackError

    try:
        code = Pipeline(
            settings, input_dir, settings.sink.out_dir, settings.data_dir, port, once, metrics_port=settings.metrics_port, bootstrap=bootstrap or ""
        ).run()
    except StackError as exc:
        typer.echo(f"error: the embedded broker ({settings.broker.engine}) did not start: {exc}", err=True)
        raise typer.Exit(1) from None
    except KafkaUnreachable as exc:
        _exit_with_error(exc)
    raise typer.Exit(code)


def _check_output(settings) -> None:
    """An s3:// output must be writable before anything starts (exit 2 naming the setting);
    a sink started on its own retries instead, as a service should."""
    from imgflow.output.storage import is_s3_output, open_storage
    from imgflow.s3 import S3Error

    if is_s3_output(settings.sink.out_dir):
        try:
            open_storage(settings.sink.out_dir, settings).check()
        except S3Error as exc:
            _exit_with_error(exc)


class StageName(str, Enum):
    vision = "vision"
    enrich = "enrich"
    sink = "sink"


@app.command()
def stage(
    name: Annotated[StageName, typer.Argument(help="Which stage.")],
    group: Annotated[str | None, typer.Option(help="Consumer group (default <kafka.group_prefix>-<stage>, i.e. imgflow-<stage>).")] = None,
    run_id: Annotated[
        str | None, typer.Option("--run", help="Run this stage as part of replay run RUN_ID (its topics, group and range; what `imgflow replay` starts).")
    ] = None,
    out: Annotated[str | None, typer.Option("--out", help="sink: output folder or s3://BUCKET/PREFIX/ (default: sink.out_dir).")] = None,
) -> None:
    """Run one stage as its own process against the configured broker (IMGFLOW_KAFKA__BOOTSTRAP)."""
    early_stop: list[int] = []  # a SIGTERM during start-up (model loading) still means a clean stop
    signal.signal(signal.SIGTERM, lambda signum, _frame: early_stop.append(signum))
    settings = _settings(sink__out_dir=out)
    _require_kafka(settings)
    scope = {}  # a replay run's stage: its own settings, group, range and run_id
    if run_id is not None:
        from imgflow.replay import ReplayError, stage_plan

        try:
            plan = stage_plan(settings, name.value, run_id)
        except ReplayError as exc:
            _exit_with_error(exc)
        settings, group = plan.settings, plan.group_id
        scope = {"bounds": plan.bounds, "run_id": plan.run_id}
    from imgflow.errors import ImgflowError
    from imgflow.metrics import serve_metrics

    serve_metrics(settings.metrics_port, name.value, settings.metrics_addr)
    if name is StageName.sink:
        from consumers.sink import SinkRunner

        runner = SinkRunner(settings, **({"group_id": group} if group else {}), **scope)
    else:
        from imgflow.stage import StageRunner

        if name is StageName.vision:
            from consumers.vision import VisionTransform as T
        else:
            from consumers.enrich import EnrichTransform as T
        runner = StageRunner(T(settings), settings, group_id=group, **scope)
    _stop_on_signals(runner)
    if early_stop:
        runner.request_stop()
    try:
        runner.run()
    except ImgflowError as exc:  # a setting, a locked output, an unreachable store: the message says which
        _exit_with_error(exc)


@watch_app.command("local")
def watch_local(
    folder: Annotated[Path, typer.Argument(help="Folder to watch (recursively).")],
    data_dir: DataDir = None,
    high: Annotated[bool, typer.Option("--high", help="Publish to the high-priority topic.")] = False,
) -> None:
    """Publish an event for every new or changed image in FOLDER, polling."""
    settings = _settings(data_dir=data_dir)
    _require_kafka(settings)
    from imgflow.metrics import serve_metrics
    from watchers.local import LocalWatcher

    serve_metrics(settings.metrics_port, "watcher", settings.metrics_addr)
    try:
        watcher = LocalWatcher(folder, settings, priority="HIGH" if high else "NORMAL")
    except NotADirectoryError as exc:
        _exit_with_error(exc)
    _stop_on_signals(watcher)
    watcher.run()


def _checked_s3_location(settings, uri: str):
    """The parsed s3://BUCKET/PREFIX, after one listing proves bucket and credentials work
    (exit 2 with the setting to fix otherwise)."""
    from imgflow.s3 import S3Error, check_location, parse_s3_uri, s3_client

    try:
        location = parse_s3_uri(uri)
        check_location(s3_client(settings), location)
    except (ValueError, S3Error) as exc:
        _exit_with_error(exc)
    return location


@watch_app.command("s3")
def watch_s3(
    uri: Annotated[str, typer.Argument(help="s3://BUCKET/PREFIX to watch.")],
    data_dir: DataDir = None,
    high: Annotated[bool, typer.Option("--high", help="Publish to the high-priority topic.")] = False,
    notify: Annotated[str | None, typer.Option("--notify", help="Also consume bucket notifications: seaweedfs | minio (watch.s3_notify).")] = None,
    check: Annotated[bool, typer.Option("--check/--no-check", help="Exit 2 at once if the bucket cannot be listed (else retry).")] = True,
) -> None:
    """Publish an event for every new or overwritten image object under s3://BUCKET/PREFIX:
    polling with a persisted cursor, plus bucket notifications with --notify."""
    settings = _settings(data_dir=data_dir, watch__s3_notify=notify)
    _require_kafka(settings)
    from imgflow.metrics import serve_metrics
    from imgflow.s3 import S3Error, parse_s3_uri
    from watchers.s3_watcher import S3Watcher

    try:
        location = parse_s3_uri(uri)
    except ValueError as exc:
        _exit_with_error(exc)
    serve_metrics(settings.metrics_port, "watcher", settings.metrics_addr)
    try:
        watcher = S3Watcher(location, settings, priority="HIGH" if high else "NORMAL")
        if check:
            watcher.check()
    except S3Error as exc:
        _exit_with_error(exc)
    _stop_on_signals(watcher)
    watcher.run()


@app.command()
def broker(
    data_dir: DataDir = None,
    port: Annotated[int, typer.Option(help="Kafka port (0: any free port).")] = 19092,
    engine: Annotated[
        BrokerEngine | None,
        typer.Option(
            "--engine",
            help="tansu (default: on a local SeaweedFS, no Java) or kafka (Apache Kafka in "
            "KRaft mode; Java 17+, Maven for the first start). Setting broker.engine.",
        ),
    ] = None,
    nodes: Annotated[int, typer.Option("--nodes", min=1, max=9, help="kafka engine: broker+controller nodes (3: a real cluster).")] = 1,
) -> None:
    """The embedded broker alone, in the foreground, durable in the data dir: tansu on a local
    SeaweedFS, or Apache Kafka (KRaft)."""
    settings = _settings(data_dir=data_dir, broker__engine=engine.value if engine else None)
    if nodes > 1 and settings.broker.engine != "kafka":
        _exit_with_error(ValueError("--nodes needs --engine kafka"))
    os.execv(
        sys.executable,
        [
            sys.executable,
            "-m",
            "infra.embedded",
            "--data-dir",
            str(settings.data_dir / "broker"),
            "--port",
            str(port),
            "--engine",
            settings.broker.engine,
            "--nodes",
            str(nodes),
        ],
    )


@app.command()
def topics(wait: Annotated[float, typer.Option("--wait", help="Seconds to wait for the broker to answer.")] = 120) -> None:
    """Create the pipeline's topics on the configured broker if missing (idempotent; what
    docker-compose's init service runs)."""
    settings = _settings()
    from imgflow.kafka import KafkaUnreachable, check_kafka, ensure_topics
    from imgflow.topics import all_topic_specs

    try:
        check_kafka(settings, wait)
    except KafkaUnreachable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    ensure_topics(settings)
    typer.echo(f"topics ready on {settings.kafka.bootstrap}: {', '.join(t.name for t in all_topic_specs(settings))}")


@app.command()
def models(load: Annotated[bool, typer.Option("--load", help="Also load every model (slower, proves it loads).")] = False) -> None:
    """List the configured models, where they load from, and whether they load."""
    settings = _settings()
    from imgflow.models.registry import check_models

    failed = 0
    for job, where, ok, message in check_models(settings, load=load):
        failed += not ok
        typer.echo(f"{'ok ' if ok else 'ERR'} {job:<15} {where}{'' if ok else '  ' + message}")
    raise typer.Exit(1 if failed else 0)


@app.command()
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
    settings = _settings(data_dir=data_dir)
    _require_kafka(settings)
    from confluent_kafka import KafkaException

    from imgflow.kafka import ensure_topics
    from watchers.backfill import Backfill, BackfillError, ProgressBar, open_source, pick_job

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
        _stop_on_signals(runner)
        bar = ProgressBar(src.count(), job.published + job.skipped, "backfill")
        try:
            job = runner.run(src, bar, dry_run=dry_run)
        finally:
            bar.close()
    except (BackfillError, KafkaException) as exc:
        _exit_with_error(exc, 2 if isinstance(exc, BackfillError) else 1)
    verb = "would publish" if dry_run else "published"
    state = "complete" if job.status == "done" else "interrupted (run the same command again to resume)"
    typer.echo(f"backfill {job.job_id} {state}: {verb} {job.published}, skipped {job.skipped} that have a result")


@app.command()
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
    settings = _settings(data_dir=data_dir)
    _require_kafka(settings)
    from imgflow import replay as rp

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
        start, stop = rp.parse_point(range_from, "--from"), rp.parse_point(range_to, "--to")
        if start.kind == "end" or stop.kind == "start":
            raise rp.ReplayError("--from must not be 'end' and --to must not be 'start'")
        record, resumed = rp.prepare_run(settings, stage_name.value, start, stop, run_id, out)
    except rp.ReplayError as exc:
        _exit_with_error(exc)
    if resumed and record.status != "done":
        typer.echo(f"resuming run {record.run_id}")
    stop_requested: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stop_requested.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _frame: stop_requested.append(signum))
    code = rp.execute(settings, record, settings.data_dir / "logs" / "replay", lambda: bool(stop_requested), say=lambda line: typer.echo(line))
    raise typer.Exit(code)


@export_app.command("csv")
def export_csv(
    src: Annotated[str, typer.Argument(help="A sink output: folder or s3://BUCKET/PREFIX/.")],
    out: Annotated[Path | None, typer.Option("--out", help="CSV file to write (default: standard output).")] = None,
) -> None:
    """One CSV with the seed's header from a sink output: on S3 its CSV parts merged in
    (topic, partition, offset) order; locally the complete part of results.csv."""
    settings = _settings()
    from imgflow.output.export import export_csv as export
    from imgflow.s3 import S3Error

    tmp = out.with_name(out.name + ".tmp") if out is not None else None
    try:
        if tmp is None:
            summary = export(src, settings, sys.stdout.buffer)
        else:
            from rich.progress import Progress

            with tmp.open("wb") as dest, Progress(transient=True) as bar:
                task = bar.add_task("merging CSV parts", total=None)
                summary = export(src, settings, dest, progress=lambda n, total: bar.update(task, completed=n, total=total))
            os.replace(tmp, out)  # the file appears whole or not at all
    except (S3Error, ValueError) as exc:
        _exit_with_error(exc)
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


# ---- finding results (imgflow/search/)
from imgflow.search import commands as search_commands  # noqa: E402 - registered after the pipeline's
from imgflow.search.web import command as search_web  # noqa: E402

app.command("search")(search_commands.search)
app.command("index")(search_commands.index)
app.command("serve")(search_web.serve)


# ---- options every command has ---------------------------------------------------------------
RUN_METRICS_PORT = 9400  # `imgflow run` serves every process's metrics here by default (README)
# Commands that serve /metrics, and their default port (None: IMGFLOW_METRICS_PORT, default 0: none).
METRICS_COMMANDS = {"run": RUN_METRICS_PORT, "stage": None, "watch local": None, "watch s3": None}


class LogLevel(str, Enum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class LogFormat(str, Enum):
    text = "text"
    json = "json"


def _logging_options(
    log_level: Annotated[LogLevel | None, typer.Option("--log-level", case_sensitive=False, help="Log level (default: $IMGFLOW_LOG_LEVEL or INFO).")] = None,
    log_format: Annotated[
        LogFormat | None,
        typer.Option("--log-format", help="text, or json: one object per line with event_id and stage (default: $IMGFLOW_LOG_FORMAT or text)."),
    ] = None,
) -> None: ...


def _metrics_option(
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=0,
            max=65535,
            help=f"Serve /metrics on this port (default: $IMGFLOW_METRICS_PORT, else 0: none; `run`: {RUN_METRICS_PORT}, every process on one endpoint).",
        ),
    ] = None,
) -> None: ...


def _metrics_port_configured() -> bool:
    """Whether IMGFLOW_METRICS_PORT or the settings file sets the metrics port."""
    if "IMGFLOW_METRICS_PORT" in os.environ:
        return True
    from imgflow.settings import Settings

    try:
        return "metrics_port" in Settings().model_fields_set
    except ValidationError:
        return True  # the command reports the bad configuration itself


def _params_of(function) -> list:
    """The click parameters Typer makes of a function's options."""
    one = typer.Typer(add_completion=False)
    one.command()(function)
    names = set(inspect.signature(function).parameters)
    return [p for p in typer.main.get_command(one).params if p.name in names]


def _common_options(command, path: str = ""):
    """Give every command (also ones added later) --log-level and --log-format, and the
    commands that serve metrics --metrics-port. They become IMGFLOW_* variables before the
    command runs, so the one settings object and every child process see them."""
    if hasattr(command, "commands"):  # a group
        for name, sub in command.commands.items():
            _common_options(sub, f"{path} {name}".strip())
        return command
    serves_metrics = path in METRICS_COMMANDS
    command.params += _params_of(_logging_options) + (_params_of(_metrics_option) if serves_metrics else [])
    callback = command.callback

    @functools.wraps(callback)
    def with_options(*args, log_level=None, log_format=None, metrics_port=None, **kwargs):
        for key, value in (("LOG_LEVEL", log_level), ("LOG_FORMAT", log_format), ("METRICS_PORT", metrics_port)):
            if value is not None:
                os.environ[f"IMGFLOW_{key}"] = str(getattr(value, "value", value))
        if serves_metrics and METRICS_COMMANDS[path] and not _metrics_port_configured():
            os.environ["IMGFLOW_METRICS_PORT"] = str(METRICS_COMMANDS[path])
        return callback(*args, **kwargs)

    command.callback = with_options
    return command


def cli():
    """The whole command tree as click sees it (also what tests introspect)."""
    return _common_options(typer.main.get_command(app))


def main() -> None:
    cli()(prog_name="imgflow")


if __name__ == "__main__":
    main()
