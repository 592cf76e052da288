"""The command line and the one settings object, as a user meets them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from imgflow.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [[], ["run"], ["stage"], ["watch"], ["watch", "local"], ["broker"], ["models"]]


def imgflow(*args: str, env: dict | None = None, cwd: Path = ROOT, timeout: float = 120):
    base = {k: v for k, v in os.environ.items() if not k.startswith("IMGFLOW_")}
    return subprocess.run([sys.executable, "-m", "imgflow", *args], cwd=cwd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "imgflow")
def test_every_command_has_help(command):
    result = imgflow(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and "--help" in result.stdout


def test_settings_from_toml_file_and_env_override(tmp_path, monkeypatch):
    config = tmp_path / "imgflow.toml"
    config.write_text('run_id = "from-file"\n[kafka]\nbootstrap = "kafka:9092"\n[stage]\nbatch_size = 16\n')
    monkeypatch.setenv("IMGFLOW_CONFIG", str(config))
    monkeypatch.setenv("IMGFLOW_STAGE__BATCH_SIZE", "4")
    settings = Settings()
    assert settings.run_id == "from-file" and settings.kafka.bootstrap == "kafka:9092"
    assert settings.stage.batch_size == 4  # the environment wins over the file


def test_bad_setting_value_is_a_clear_error(tmp_path):
    result = imgflow("stage", "sink", env={"IMGFLOW_STAGE__BATCH_SIZE": "lots"})
    assert result.returncode == 2
    assert "stage.batch_size" in result.stderr and "lots" in result.stderr
    with pytest.raises(ValidationError, match="log_level"):
        Settings(log_level="chatty")


def test_unknown_setting_in_config_file_is_refused(tmp_path):
    (tmp_path / "imgflow.toml").write_text("[stage]\nbatch_sise = 3\n")
    result = imgflow("stage", "sink", cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and "batch_sise" in result.stderr


def test_missing_input_folder_is_a_clear_error(tmp_path):
    result = imgflow("run", str(tmp_path / "nope"), "--once", "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_broker_port_in_use_is_a_clear_error_not_a_hang(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = imgflow("broker", "--data-dir", str(tmp_path), "--port", str(port), timeout=60)
    assert result.returncode == 2
    assert "in use" in (result.stdout + result.stderr)
