"""The commands that run the pipeline or a part of it: `run`, `stage`, `watch local|s3`,
`broker`, `topics`."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from imgflow.app.options import BrokerEngine, DataDir, StageName, require_kafka, stop_on_signals
from imgflow.cli_support import command_settings, exit_with_error
from imgflow.settings import Settings

if TYPE_CHECKING:
    from consumers.sink import SinkRunner
    from imgflow.s3 import S3Location
    from imgflow.stage import RangeBounds, StageRunner, Transform


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

    settings = command_settings(data_dir=data_dir, sink__out_dir=out, broker__engine=engine.value if engine else None, kafka__bootstrap=bootstrap)
    from imgflow.app.pipeline import Pipeline
    from imgflow.samples import write_samples

    source: Path | S3Location
    if input_dir is not None and is_s3_uri(input_dir):
        source = checked_s3_location(settings, input_dir)
    elif input_dir is None:
        source = write_samples(settings.data_dir / "sample-images")
        typer.echo(f"no input folder given: processing the sample folder {source}")
    else:
        source = Path(input_dir)
    if isinstance(source, Path) and not source.is_dir():
        typer.echo(f"error: input folder does not exist: {source}", err=True)
        raise typer.Exit(2)
    check_output(settings)
    from imgflow.app.stack import StackError
    from imgflow.kafka import KafkaUnreachable

    try:
        code = Pipeline(
            settings, source, settings.sink.out_dir, settings.data_dir, port, once, metrics_port=settings.metrics_port, bootstrap=bootstrap or ""
        ).run()
    except StackError as exc:
        typer.echo(f"error: the embedded broker ({settings.broker.engine}) did not start: {exc}", err=True)
        raise typer.Exit(1) from None
    except KafkaUnreachable as exc:
        exit_with_error(exc)
    raise typer.Exit(code)


def check_output(settings: Settings) -> None:
    """An s3:// output must be writable before anything starts (exit 2 naming the setting);
    a sink started on its own retries instead, as a service should."""
    from imgflow.output.storage import is_s3_output, open_storage
    from imgflow.s3 import S3Error

    if is_s3_output(settings.sink.out_dir):
        try:
            open_storage(settings.sink.out_dir, settings).check()
        except S3Error as exc:
            exit_with_error(exc)


def checked_s3_location(settings: Settings, uri: str) -> S3Location:
    """The parsed s3://BUCKET/PREFIX, after one listing proves bucket and credentials work
    (exit 2 with the setting to fix otherwise)."""
    from imgflow.s3 import S3Error, check_location, parse_s3_uri, s3_client

    try:
        location = parse_s3_uri(uri)
        check_location(s3_client(settings), location)
    except (ValueError, S3Error) as exc:
        exit_with_error(exc)
    return location


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
    settings = command_settings(sink__out_dir=out)
    require_kafka(settings)
    bounds: RangeBounds | None = None  # a replay run's stage: its own settings, group, range and run_id
    if run_id is not None:
        from imgflow.app.replay_range import ReplayError
        from imgflow.app.runs import stage_plan

        try:
            plan = stage_plan(settings, name.value, run_id)
        except ReplayError as exc:
            exit_with_error(exc)
        settings, group, bounds = plan.settings, plan.group_id, plan.bounds
    from imgflow.errors import ImgflowError
    from imgflow.metrics import serve_metrics

    serve_metrics(settings.metrics_port, name.value, settings.metrics_addr)
    runner: SinkRunner | StageRunner
    if name is StageName.sink:
        from consumers.sink import SinkRunner

        runner = SinkRunner(settings, group_id=group or None, run_id=run_id, bounds=bounds)
    else:
        from imgflow.stage import StageRunner

        runner = StageRunner(_transform(name, settings), settings, group_id=group or None, run_id=run_id, bounds=bounds)
    stop_on_signals(runner)
    if early_stop:
        runner.request_stop()
    try:
        runner.run()
    except ImgflowError as exc:  # a setting, a locked output, an unreachable store: the message says which
        exit_with_error(exc)


def _transform(name: StageName, settings: Settings) -> Transform:
    if name is StageName.vision:
        from consumers.vision import VisionTransform

        return VisionTransform(settings)
    from consumers.enrich import EnrichTransform

    return EnrichTransform(settings)


def watch_local(
    folder: Annotated[Path, typer.Argument(help="Folder to watch (recursively).")],
    data_dir: DataDir = None,
    high: Annotated[bool, typer.Option("--high", help="Publish to the high-priority topic.")] = False,
) -> None:
    """Publish an event for every new or changed image in FOLDER, polling."""
    settings = command_settings(data_dir=data_dir)
    require_kafka(settings)
    from imgflow.metrics import serve_metrics
    from watchers.local import LocalWatcher

    serve_metrics(settings.metrics_port, "watcher", settings.metrics_addr)
    try:
        watcher = LocalWatcher(folder, settings, priority="HIGH" if high else "NORMAL")
    except NotADirectoryError as exc:
        exit_with_error(exc)
    stop_on_signals(watcher)
    watcher.run()


def watch_s3(
    uri: Annotated[str, typer.Argument(help="s3://BUCKET/PREFIX to watch.")],
    data_dir: DataDir = None,
    high: Annotated[bool, typer.Option("--high", help="Publish to the high-priority topic.")] = False,
    notify: Annotated[str | None, typer.Option("--notify", help="Also consume bucket notifications: seaweedfs | minio (watch.s3_notify).")] = None,
    check: Annotated[bool, typer.Option("--check/--no-check", help="Exit 2 at once if the bucket cannot be listed (else retry).")] = True,
) -> None:
    """Publish an event for every new or overwritten image object under s3://BUCKET/PREFIX:
    polling with a persisted cursor, plus bucket notifications with --notify."""
    settings = command_settings(data_dir=data_dir, watch__s3_notify=notify)
    require_kafka(settings)
    from imgflow.metrics import serve_metrics
    from imgflow.s3 import S3Error, parse_s3_uri
    from watchers.s3_watcher import S3Watcher

    try:
        location = parse_s3_uri(uri)
    except ValueError as exc:
        exit_with_error(exc)
    serve_metrics(settings.metrics_port, "watcher", settings.metrics_addr)
    try:
        watcher = S3Watcher(location, settings, priority="HIGH" if high else "NORMAL")
        if check:
            watcher.check()
    except S3Error as exc:
        exit_with_error(exc)
    stop_on_signals(watcher)
    watcher.run()


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
    settings = command_settings(data_dir=data_dir, broker__engine=engine.value if engine else None)
    if nodes > 1 and settings.broker.engine != "kafka":
        exit_with_error(ValueError("--nodes needs --engine kafka"))
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


def topics(wait: Annotated[float, typer.Option("--wait", help="Seconds to wait for the broker to answer.")] = 120) -> None:
    """Create the pipeline's topics on the configured broker if missing (idempotent; what
    docker-compose's init service runs)."""
    settings = command_settings()
    from imgflow.kafka import KafkaUnreachable, check_kafka, ensure_topics
    from imgflow.topics import all_topic_specs

    try:
        check_kafka(settings, wait)
    except KafkaUnreachable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    ensure_topics(settings)
    typer.echo(f"topics ready on {settings.kafka.bootstrap}: {', '.join(t.name for t in all_topic_specs(settings))}")
