"""Paths the user configures (the production models): setting names and clear start-up errors."""

from __future__ import annotations

from pathlib import Path

from imgflow.models.base import ModelConfigError


def setting(name: str) -> str:
    return f"models.{name} (IMGFLOW_MODELS__{name.upper()})"


def required(name: str, value: str, what: str) -> str:
    value = (value or "").strip()
    if not value:
        raise ModelConfigError(
            f"{setting(name)} is empty: the gpu profile loads {what} from a path you configure "
            f"(or name an embedded implementation for this job to mix profiles)"
        )
    return value


def existing(name: str, path: Path, kind: str = "path") -> Path:
    path = Path(path).expanduser()
    if kind == "dir" and not path.is_dir():
        raise ModelConfigError(f"{setting(name)} = {str(path)!r}: {'not a folder' if path.exists() else 'no such folder'}")
    if kind == "file" and not path.is_file():
        raise ModelConfigError(f"{setting(name)} = {str(path)!r}: {'not a file' if path.exists() else 'no such file'}")
    if not path.exists():
        raise ModelConfigError(f"{setting(name)} = {str(path)!r}: no such file or folder")
    return path


def invalid(name: str, path: Path | str, why: str) -> ModelConfigError:
    return ModelConfigError(f"{setting(name)} = {str(path)!r}: {why}")
