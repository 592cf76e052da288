"""What every command does the same way: settings from options, and failing on a user's error."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NoReturn

import typer
from pydantic import ValidationError

if TYPE_CHECKING:
    from imgflow.settings import Settings


def exit_with_error(exc: BaseException | str, code: int = 2) -> NoReturn:
    """The one way a command fails on a user's error: the message on stderr, exit ``code``."""
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code) from None


def command_settings(**env: object) -> Settings:
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
