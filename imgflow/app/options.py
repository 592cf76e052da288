"""What several `imgflow` commands share: option types, and the checks and signal handling
of a command that runs against a cluster."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Protocol

import typer

from imgflow.cli_support import exit_with_error
from imgflow.settings import Settings

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Broker and watcher state (default: $IMGFLOW_DATA_DIR or ~/.local/state/imgflow).")]


class BrokerEngine(StrEnum):
    tansu = "tansu"
    kafka = "kafka"


class StageName(StrEnum):
    vision = "vision"
    enrich = "enrich"
    sink = "sink"


class Stoppable(Protocol):
    def request_stop(self, *_: object) -> None: ...


def require_kafka(settings: Settings) -> None:
    """A long-running command against a cluster: the cluster must answer first (exit 2
    naming kafka.bootstrap, or the security setting it refused, after kafka.connect_timeout_s)."""
    from imgflow.kafka import KafkaUnreachable, check_kafka

    try:
        check_kafka(settings, settings.kafka.connect_timeout_s)
    except KafkaUnreachable as exc:
        exit_with_error(exc)


def stop_on_signals(runner: Stoppable) -> None:
    """SIGTERM and Ctrl-C ask ``runner`` to finish its current work and stop."""
    from imgflow.stage import install_signal_handlers

    install_signal_handlers(runner)
