"""Kafka security end to end, on the real Apache Kafka (engine kafka) with a SASL_SSL listener:
SCRAM-SHA-256/512 users created when its storage is formatted, a CA, a broker certificate
and a client certificate (its key encrypted) made here with openssl, client certificates
required. The right settings work through `imgflow run --bootstrap`; a wrong password, an
untrusted broker certificate, a missing client certificate and a wrong key password are each
one clear error naming the setting; no secret appears in any output, log or result."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from skimage import data as skdata

from imgflow.kafka import KafkaUnreachable, check_kafka
from imgflow.output.formats import read_csv_rows
from imgflow.output.store import ResultStore
from imgflow.samples import render_text_image
from imgflow.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
IMGFLOW = [sys.executable, "-m", "imgflow"]
USER = "alice"
# Unique strings: finding one anywhere is a leak, not a coincidence.
PASSWORD = "pw-" + secrets.token_hex(12)
KEY_PASSWORD = "kp-" + secrets.token_hex(12)
WRONG_PASSWORD = "wrong-" + secrets.token_hex(12)

pytestmark = pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("java")), reason="needs openssl (certificates) and Java 17+ (Apache Kafka)")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


TLS_DAYS = "2"  # how long the certificates made here are valid


def _new_ca(name: str, subject: str, folder: Path) -> None:
    """A self-signed CA: NAME.pem and its unencrypted key NAME.key."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", TLS_DAYS, "-subj", subject, cwd=folder)


def _sign_with_ca(csr: str, out: str, folder: Path, *extra: str) -> None:
    """The certificate of a signing request, signed by ca.pem."""
    _openssl("x509", "-req", "-in", csr, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", out, "-days", TLS_DAYS, *extra, cwd=folder)


def make_tls(folder: Path) -> None:
    """ca.pem (+ ca.key); broker.pem: the broker's PKCS#8 key, unencrypted, then its certificate
    (SAN 127.0.0.1 and localhost) and the CA; client.pem and client.key (PKCS#8, encrypted with
    KEY_PASSWORD), signed by the CA; other-ca.pem: a CA that signed nothing here."""
    _new_ca("ca", "/CN=imgflow test CA", folder)
    _new_ca("other-ca", "/CN=some other CA", folder)
    (folder / "broker.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr", "-subj", "/CN=localhost", cwd=folder)
    _sign_with_ca("broker.csr", "broker.crt", folder, "-extfile", "broker.ext")
    _openssl("pkcs8", "-topk8", "-nocrypt", "-in", "broker.key", "-out", "broker.p8", cwd=folder)
    (folder / "broker.pem").write_text("".join((folder / n).read_text() for n in ("broker.p8", "broker.crt", "ca.pem")))
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client-plain.key", "-out", "client.csr", "-subj", f"/CN={USER}", cwd=folder)
    _sign_with_ca("client.csr", "client.pem", folder)
    subprocess.run(
        ["openssl", "pkcs8", "-topk8", "-in", "client-plain.key", "-out", "client.key", "-v2", "aes-256-cbc", "-passout", "env:KEY_PASSWORD"],
        cwd=folder,
        check=True,
        capture_output=True,
        timeout=60,
        env={**os.environ, "KEY_PASSWORD": KEY_PASSWORD},
    )
    (folder / "client-plain.key").unlink()


@dataclass
class SecureKafka:
    stack: object
    tls: Path
    bootstrap: str  # the SASL_SSL listener

    def kafka_settings(self, **overrides) -> dict:
        base = {
            "bootstrap": self.bootstrap,
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-256",
            "sasl_username": USER,
            "sasl_password": PASSWORD,
            "ssl_ca_location": str(self.tls / "ca.pem"),
            "ssl_certificate_location": str(self.tls / "client.pem"),
            "ssl_key_location": str(self.tls / "client.key"),
            "ssl_key_password": KEY_PASSWORD,
        }
        return {**base, **overrides}

    def env(self, **overrides) -> dict:
        """A child's environment: no IMGFLOW_* of the developer's, the kafka.* settings as
        IMGFLOW_KAFKA__* variables."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMGFLOW_")}
        env.update({f"IMGFLOW_KAFKA__{k.upper()}": v for k, v in self.kafka_settings(**overrides).items()})
        env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "IMGFLOW_MODELS__LLM": "smollm2-135m"})
        return env


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory):
    from imgflow.app.stack import EmbeddedStack

    tls = tmp_path_factory.mktemp("tls")
    make_tls(tls)
    data = tmp_path_factory.mktemp("secure-kafka")
    stack = EmbeddedStack(
        data, port=0, log_file=data / "logs" / "embedded.log", engine="kafka", sasl_ssl=tls, scram_users={USER: PASSWORD}, ssl_client_auth="required"
    ).start()
    try:
        yield SecureKafka(stack, tls, stack.listeners["SASL_SSL"])
    finally:
        stack.stop()


def _leaks(text: str) -> list[str]:
    return [name for name, secret in (("PASSWORD", PASSWORD), ("KEY_PASSWORD", KEY_PASSWORD), ("WRONG_PASSWORD", WRONG_PASSWORD)) if secret in text]


def _files_with_secrets(*folders: Path) -> list[str]:
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                text = path.read_bytes().decode("utf-8", "replace")
                found += [f"{path}: {leak}" for leak in _leaks(text)]
    return found


# --------------------------------------------------------------------------------------------
# the runner


def test_runner_reports_the_sasl_ssl_listener_and_keeps_no_password(secure_kafka):
    stack = secure_kafka.stack
    info = stack.info()
    assert info["listeners"] == {"SASL_SSL": secure_kafka.bootstrap}
    assert secure_kafka.bootstrap != stack.bootstrap  # the internal PLAINTEXT listener is another port
    assert not (stack.data_dir / "scram-users.json").exists()  # handed to the runner, then removed
    assert _files_with_secrets(stack.data_dir) == []  # logs, server.properties, Kafka's metadata log


# --------------------------------------------------------------------------------------------
# the right settings, end to end


@pytest.fixture(scope="module")
def secure_run(secure_kafka, tmp_path_factory):
    folder = tmp_path_factory.mktemp("secure-images")
    Image.fromarray(skdata.chelsea()).resize((150, 115)).save(folder / "cat.png")
    Image.fromarray(skdata.coffee()).resize((150, 100)).save(folder / "coffee.jpg")
    render_text_image(["PIER 7 PASS"]).save(folder / "ticket.png")
    work = tmp_path_factory.mktemp("secure-run")
    args = [
        *IMGFLOW,
        "run",
        str(folder),
        "--once",
        "--out",
        str(work / "out"),
        "--data-dir",
        str(work / "data"),
        "--bootstrap",
        secure_kafka.bootstrap,
        "--metrics-port",
        "0",
    ]
    try:
        proc = subprocess.run(args, cwd=ROOT, env=secure_kafka.env(), capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as exc:  # keep what it said, for the failure message
        proc = subprocess.CompletedProcess(args, -9, _text(exc.stdout), _text(exc.stderr) + "\n(timed out)")
    return proc, work


def _text(out) -> str:
    return out.decode("utf-8", "replace") if isinstance(out, bytes) else out or ""


def test_run_with_the_right_credentials_writes_one_row_per_image(secure_run):
    proc, work = secure_run
    logs = "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in sorted((work / "data" / "logs").rglob("*.log")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    assert "using the Kafka cluster at" in proc.stdout
    out = work / "out"
    rows = list(read_csv_rows(out / "results.csv", ResultStore(out).committed_length()))
    assert sorted(Path(r["image_path"]).name for r in rows) == ["cat.png", "coffee.jpg", "ticket.png"]
    assert all(r["error"] == "" for r in rows), [r["error"] for r in rows]
    assert list((out / "avro").rglob("*.avro"))


def test_no_secret_in_output_logs_or_results(secure_run, secure_kafka):
    proc, work = secure_run
    assert _leaks(proc.stdout + proc.stderr) == []
    # every file the run wrote: its logs, state, the CSV and Avro results; and the broker's
    assert _files_with_secrets(work / "data", work / "out", secure_kafka.stack.data_dir) == []


# --------------------------------------------------------------------------------------------
# wrong settings: one clear error naming the setting, at once


def _run_cli(args: list[str], env: dict, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run([*IMGFLOW, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - started


def _assert_one_clear_error(proc: subprocess.CompletedProcess, seconds: float, setting: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert setting in proc.stderr, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) <= 3, output  # the error, not a flood of librdkafka lines
    assert "Traceback" not in output, output
    assert seconds < 30, f"{seconds:.1f}s: {output}"  # kafka.connect_timeout_s is 60: it did not wait it out
    assert _leaks(output) == [], output


@pytest.mark.parametrize("command", [["stage", "vision"], ["topics", "--wait", "60"]])
def test_wrong_password_from_the_settings_file_is_one_clear_error(secure_kafka, command, tmp_path):
    # The credentials from imgflow.toml this time (IMGFLOW_CONFIG); the environment has none.
    k = secure_kafka.kafka_settings(sasl_password=WRONG_PASSWORD)
    toml = tmp_path / "imgflow.toml"
    toml.write_text("[kafka]\n" + "".join(f'{key} = "{value}"\n' for key, value in k.items()))
    env = {key: v for key, v in secure_kafka.env().items() if not key.startswith("IMGFLOW_KAFKA__")}
    env.update({"IMGFLOW_CONFIG": str(toml), "IMGFLOW_DATA_DIR": str(tmp_path / "data")})
    proc, seconds = _run_cli(command, env)
    _assert_one_clear_error(proc, seconds, "kafka.sasl_password")
    assert "refused the credentials of user 'alice'" in proc.stderr


@pytest.mark.parametrize("command", [["stage", "vision"], ["topics", "--wait", "60"]])
def test_untrusted_broker_certificate_is_one_clear_error(secure_kafka, command, tmp_path):
    env = secure_kafka.env(ssl_ca_location=str(secure_kafka.tls / "other-ca.pem"))
    env["IMGFLOW_DATA_DIR"] = str(tmp_path / "data")
    proc, seconds = _run_cli(command, env)
    _assert_one_clear_error(proc, seconds, "kafka.ssl_ca_location")
    assert "not trusted" in proc.stderr and "other-ca.pem" in proc.stderr


def test_run_with_a_wrong_password_exits_2_naming_the_setting(secure_kafka, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    render_text_image(["NEVER READ"]).save(folder / "one.png")
    env = secure_kafka.env(sasl_password=WRONG_PASSWORD)
    proc, seconds = _run_cli(
        [
            "run",
            str(folder),
            "--once",
            "--out",
            str(tmp_path / "out"),
            "--data-dir",
            str(tmp_path / "data"),
            "--bootstrap",
            secure_kafka.bootstrap,
            "--metrics-port",
            "0",
        ],
        env,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "kafka.sasl_password" in proc.stderr and seconds < 30
    assert _leaks(proc.stdout + proc.stderr) == []
    assert _files_with_secrets(tmp_path) == []


@pytest.mark.parametrize(
    "case, overrides, setting",
    [
        ("SCRAM-SHA-512 works too", {"sasl_mechanism": "SCRAM-SHA-512"}, None),
        ("a user the broker does not know", {"sasl_username": "mallory"}, "kafka.sasl_username / kafka.sasl_password"),
        ("a mechanism the listener does not offer", {"sasl_mechanism": "PLAIN"}, "kafka.sasl_mechanism"),
        ("no client certificate", {"ssl_certificate_location": "", "ssl_key_location": "", "ssl_key_password": ""}, "kafka.ssl_certificate_location"),
        ("a wrong key password", {"ssl_key_password": WRONG_PASSWORD}, "kafka.ssl_key_password"),
        ("a CA file that is not there", {"ssl_ca_location": "/nonexistent/ca.pem"}, "kafka.ssl_ca_location"),
    ],
)
def test_check_kafka_names_the_setting(secure_kafka, case, overrides, setting, monkeypatch):
    for key in list(os.environ):
        if key.startswith("IMGFLOW_"):
            monkeypatch.delenv(key)
    settings = Settings(kafka=secure_kafka.kafka_settings(**overrides))
    started = time.monotonic()
    if setting is None:
        check_kafka(settings, 20)
        return
    with pytest.raises(KafkaUnreachable) as err:
        check_kafka(settings, 20)
    assert setting in str(err.value), case
    assert time.monotonic() - started < 10, case
    assert _leaks(str(err.value)) == [], case


def test_secrets_are_not_in_the_settings_repr(secure_kafka, monkeypatch):
    for key in list(os.environ):
        if key.startswith("IMGFLOW_"):
            monkeypatch.delenv(key)
    settings = Settings(kafka=secure_kafka.kafka_settings())
    assert _leaks(repr(settings) + str(settings) + settings.model_dump_json()) == []


def test_run_with_its_own_broker_ignores_the_clusters_security_settings(secure_kafka, tmp_path):
    """Security settings meant for the cluster (here in the environment) do not stop `imgflow run`
    without --bootstrap: its embedded broker speaks PLAINTEXT on loopback, and it says so."""
    folder = tmp_path / "images"
    folder.mkdir()
    render_text_image(["LOCAL 42"]).save(folder / "local.png")
    env = secure_kafka.env()
    env["IMGFLOW_KAFKA__CONNECT_TIMEOUT_S"] = "20"  # a child that tried SASL_SSL would fail within this
    proc, _ = _run_cli(
        ["run", str(folder), "--once", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"), "--port", "0", "--metrics-port", "0"],
        env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the embedded broker speaks PLAINTEXT" in proc.stdout and "done: 1 images" in proc.stdout
    assert _leaks(proc.stdout + proc.stderr) == [] and _files_with_secrets(tmp_path) == []
