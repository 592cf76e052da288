"""`imgflow`: the one console script (also `python -m imgflow`). The command tree, and the
options every command has; the commands themselves are in run_commands and batch_commands."""

from __future__ import annotations

import functools
import inspect
import os
from enum import StrEnum
from typing import Annotated

import typer
from pydantic import ValidationError

from imgflow.app import batch_commands, run_commands
from imgflow.search import commands as search_commands
from imgflow.search.web import command as search_web

app = typer.Typer(help="Streaming, exactly-once image enrichment on Kafka.", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
watch_app = typer.Typer(help="Publish new-image events.", no_args_is_help=True)
app.add_typer(watch_app, name="watch")
export_app = typer.Typer(help="Export results.", no_args_is_help=True)
app.add_typer(export_app, name="export")

# In the order `imgflow --help` lists them.
app.command()(run_commands.run)
app.command()(run_commands.stage)
watch_app.command("local")(run_commands.watch_local)
watch_app.command("s3")(run_commands.watch_s3)
app.command()(run_commands.broker)
app.command()(run_commands.topics)
app.command()(batch_commands.models)
app.command()(batch_commands.backfill)
app.command()(batch_commands.replay)
export_app.command("csv")(batch_commands.export_csv)
# ---- finding results (imgflow/search/)
app.command("search")(search_commands.search)
app.command("index")(search_commands.index)
app.command("serve")(search_web.serve)


# ---- options every command has ---------------------------------------------------------------
RUN_METRICS_PORT = 9400  # `imgflow run` serves every process's metrics here by default (README)
# Commands that serve /metrics, and their default port (None: IMGFLOW_METRICS_PORT, default 0: none).
METRICS_COMMANDS = {"run": RUN_METRICS_PORT, "stage": None, "watch local": None, "watch s3": None}


class LogLevel(StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class LogFormat(StrEnum):
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
