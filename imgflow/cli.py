"""`imgflow`: the one console script."""

from __future__ import annotations

import os
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError

app = typer.Typer(help="Streaming, exactly-once image enrichment on Kafka.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
watch_app = typer.Typer(help="Publish new-image events.", no_args_is_help=True)
app.add_typer(watch_app, name="watch")

DataDir = Annotated[Optional[Path], typer.Option("--data-dir", help="Broker and watcher state "
                                                 "(default: $IMGFLOW_DATA_DIR or ~/.local/state/imgflow).")]


def _settings(**env: object):
    """Command-line options become IMGFLOW_* variables, so child processes see them too."""
    for key, value in env.items():
        if value is not None:
            os.environ[f"IMGFLOW_{key.upper()}"] = str(value)
    from imgflow.logs import setup_logging
    from imgflow.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        typer.echo(f"error: invalid configuration:\n{exc}", err=True)
        raise typer.Exit(2) from None
    setup_logging(settings.log_level, settings.log_format)
    return settings


@app.command()
def run(
    input_dir: Annotated[Optional[Path], typer.Argument(help="Folder of images (default: a generated sample folder).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder for results.csv and avro/ (default: ./out).")] = None,
    once: Annotated[bool, typer.Option("--once", help="Exit 0 when every image present at start has its result row.")] = False,
    data_dir: DataDir = None,
    port: Annotated[int, typer.Option(help="Embedded broker port (taken free if in use; 0: any free port).")] = 19092,
) -> None:
    """Embedded broker + local watcher + vision + enrich + sink, in one command."""
    settings = _settings(data_dir=data_dir, sink__out_dir=out)
    from imgflow.pipeline import Pipeline
    from imgflow.samples import write_samples

    if input_dir is None:
        input_dir = write_samples(settings.data_dir / "sample-images")
        typer.echo(f"no input folder given: processing the sample folder {input_dir}")
    if not input_dir.is_dir():
        typer.echo(f"error: input folder does not exist: {input_dir}", err=True)
        raise typer.Exit(2)
    from imgflow.stack import StackError

    try:
        code = Pipeline(settings, input_dir, settings.sink.out_dir, settings.data_dir, port, once).run()
    except StackError as exc:
        typer.echo(f"error: the embedded broker did not start: {exc}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


class StageName(str, Enum):
    vision = "vision"
    enrich = "enrich"
    sink = "sink"


@app.command()
def stage(name: Annotated[StageName, typer.Argument(help="Which stage.")],
          group: Annotated[Optional[str], typer.Option(help="Consumer group (default imgflow-<stage>).")] = None) -> None:
    """Run one stage as its own process against the configured broker (IMGFLOW_KAFKA__BOOTSTRAP)."""
    early_stop: list[int] = []  # a SIGTERM during start-up (model loading) still means a clean stop
    signal.signal(signal.SIGTERM, lambda signum, _frame: early_stop.append(signum))
    settings = _settings()
    from imgflow.metrics import serve_metrics
    from imgflow.models.base import ModelConfigError

    serve_metrics(settings.metrics_port, name.value)
    if name is StageName.sink:
        from consumers.sink import SinkLockedError, SinkRunner

        runner = SinkRunner(settings, **({"group_id": group} if group else {}))
    else:
        from imgflow.stage import StageRunner

        if name is StageName.vision:
            from consumers.vision import VisionTransform as T
        else:
            from consumers.enrich import EnrichTransform as T
        runner = StageRunner(T(settings), settings, group_id=group)
    signal.signal(signal.SIGTERM, runner.request_stop)
    signal.signal(signal.SIGINT, runner.request_stop)
    if early_stop:
        runner.request_stop()
    try:
        runner.run()
    except ModelConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except Exception as exc:
        if name is StageName.sink and isinstance(exc, SinkLockedError):
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        raise


@watch_app.command("local")
def watch_local(folder: Annotated[Path, typer.Argument(help="Folder to watch (recursively).")],
                data_dir: DataDir = None,
                high: Annotated[bool, typer.Option("--high", help="Publish to the high-priority topic.")] = False) -> None:
    """Publish an event for every new or changed image in FOLDER, polling."""
    settings = _settings(data_dir=data_dir)
    from imgflow.metrics import serve_metrics
    from watchers.local import LocalWatcher

    serve_metrics(settings.metrics_port, "watcher")
    try:
        watcher = LocalWatcher(folder, settings, priority="HIGH" if high else "NORMAL")
    except NotADirectoryError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    signal.signal(signal.SIGTERM, watcher.request_stop)
    signal.signal(signal.SIGINT, watcher.request_stop)
    watcher.run()


@app.command()
def broker(data_dir: DataDir = None,
           port: Annotated[int, typer.Option(help="Kafka port (0: any free port).")] = 19092) -> None:
    """The embedded Kafka-compatible broker alone (tansu on a local SeaweedFS), in the foreground."""
    settings = _settings(data_dir=data_dir)
    os.execv(sys.executable, [sys.executable, "-m", "infra.embedded", "--data-dir",
                              str(settings.data_dir / "broker"), "--port", str(port)])


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
