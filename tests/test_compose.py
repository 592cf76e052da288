"""docker-compose.yml and the Dockerfile, proved as far as a machine without a Docker engine
can: the file is valid Compose, every command is a real `imgflow` command with real options,
every IMGFLOW_* variable is a real setting with a valid value, every mounted file exists,
every port Prometheus scrapes is served, and the image installs what `make install` does."""

from __future__ import annotations

import importlib.resources
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from imgflow.app.cli import METRICS_COMMANDS, cli
from imgflow.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
# The variables an operator sets (README); everything else has a default in the file.
OPERATOR_ENV = {"MINIO_ROOT_USER": "admin", "MINIO_ROOT_PASSWORD": "change-me-please"}
VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def interpolate(value, env: dict):
    """Compose's variable interpolation: ${X}, ${X:-default}, ${X-default}, ${X:?error}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        present = env.get(name)
        if op in (":-", "-"):
            return present if present or (op == "-" and name in env) else arg
        if op in (":?", "?"):
            if not present:
                raise AssertionError(f"{name} is required: {arg}")
            return present
        return present or ""

    return VARIABLE.sub(one, value)


def compose(env: dict | None = None) -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), {**OPERATOR_ENV, **(env or {})})


def imgflow_services(doc: dict) -> dict[str, dict]:
    """The services that run the imgflow image (its ENTRYPOINT is `imgflow`)."""
    return {name: s for name, s in doc["services"].items() if s.get("build") == "." and "entrypoint" not in s}


def test_compose_file_is_valid_against_the_compose_specification():
    # The Compose specification's JSON schema, as vendored by check-jsonschema (its source:
    # the compose-spec/compose-spec repository, schema/compose-spec.json).
    schema = json.loads((importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    doc = compose()
    errors = sorted(validator.iter_errors(doc), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
    # The validator does catch a wrong file.
    broken = {**doc, "services": {**doc["services"], "vision": {**doc["services"]["vision"], "gpus_please": 1}}}
    assert any(True for _ in validator.iter_errors(broken))


def test_the_stack_has_every_part():
    doc = compose()
    services = doc["services"]
    assert {"kafka", "kafka-init", "minio", "minio-init", "s3-watcher", "vision", "enrich", "sink", "prometheus", "grafana"} <= set(services)
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    devices = services["vision"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    minio_env = services["minio"]["environment"]
    assert minio_env["MINIO_NOTIFY_KAFKA_ENABLE_IMGFLOW"] == "on"
    topic = minio_env["MINIO_NOTIFY_KAFKA_TOPIC_IMGFLOW"]
    assert services["s3-watcher"]["environment"]["IMGFLOW_WATCH__S3_NOTIFY_TOPIC"] == topic
    assert "arn:minio:sqs::IMGFLOW:kafka" in " ".join(services["minio-init"]["command"])
    assert services["sink"]["environment"]["IMGFLOW_SINK__OUT_DIR"].startswith("s3://results/")
    for tool in ("backfill", "replay"):  # on demand, not started by `up`
        assert services[tool]["profiles"] == ["tools"] and services[tool]["command"][0] == tool
    assert any(v.endswith(":/models:ro") for v in services["vision"]["volumes"])  # models from a host folder


def _leaf(args: list[str]):
    """Parse ``imgflow ARGS`` as the CLI would, without running it: the leaf command and
    its context with the parsed parameters (an unknown command or option, or a bad value,
    raises)."""
    command, rest, path = cli(), list(args), []
    while hasattr(command, "commands"):
        assert rest and rest[0] in command.commands, f"no command {' '.join([*path, *rest[:1]])!r}"
        path.append(rest[0])
        command, rest = command.commands[rest[0]], rest[1:]
    command.path = path
    return command, command.make_context(" ".join(["imgflow", *path]), rest)


def test_every_service_command_is_a_real_imgflow_command_with_real_options():
    doc = compose()
    services = imgflow_services(doc)
    assert len(services) >= 5
    helps: dict[tuple, subprocess.CompletedProcess] = {}
    for name, service in services.items():
        args = service["command"]
        command, ctx = _leaf(args)  # raises on an unknown command or option, or a bad value
        assert ctx.params, name
        # ... and the command's own --help, through the real console script, works.
        key = tuple(command.path)
        if key not in helps:
            helps[key] = subprocess.run([sys.executable, "-m", "imgflow", *key, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        result = helps[key]
        assert result.returncode == 0 and "Usage:" in result.stdout, (name, result.stderr)
        for option in (a.split("=")[0] for a in args if a.startswith("--")):
            assert option in result.stdout, (name, option)


def _mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path (relative to the repo) of each bind mount."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (ROOT / source).resolve() if source.startswith(".") else Path(source)
    return mounts


def _settings_of(service: dict, monkeypatch) -> Settings:
    """Load the service's IMGFLOW_* variables through the one settings class, with container
    paths of files it reads (IMGFLOW_CONFIG) mapped to the repo through its mounts."""
    env = {k: str(v) for k, v in service.get("environment", {}).items() if k.startswith("IMGFLOW_")}
    for key in list(__import__("os").environ):
        if key.startswith("IMGFLOW_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        for target, source in _mounts(service).items():
            if value.startswith(target + "/"):
                value = str(source / value[len(target) + 1 :])
        monkeypatch.setenv(key, value)
    return Settings()


def _is_setting(name: str) -> bool:
    model, parts = Settings, name.removeprefix("IMGFLOW_").lower().split("__")
    for part in parts:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return part == "config" and parts == ["config"]  # IMGFLOW_CONFIG names the settings file
        model = fields[part].annotation
    return True


@pytest.mark.parametrize("profile", ["gpu", "embedded"])
def test_every_imgflow_variable_is_a_real_setting_with_a_valid_value(profile, monkeypatch):
    doc = compose({"IMGFLOW_PROFILE": profile})
    for name, service in imgflow_services(doc).items():
        for key in service.get("environment", {}):
            if key.startswith("IMGFLOW_"):
                assert _is_setting(key), f"{name}: {key} is not a setting"
        settings = _settings_of(service, monkeypatch)
        assert settings.kafka.bootstrap == "kafka:9092", name
        if service["command"][0] == "stage":
            # The one variable IMGFLOW_PROFILE picks the models of every stage.
            assert settings.models.profile == profile, name
            if profile == "gpu":
                assert settings.models.vlm.startswith("/models/"), name


def test_every_mounted_file_exists_in_the_repo():
    doc = compose({"IMGFLOW_MODELS_DIR": "/srv/models"})
    for name, service in doc["services"].items():
        for target, source in _mounts(service).items():
            if target == "/models":
                assert source == Path("/srv/models")  # the operator's model folder, not the repo's
                continue
            assert source.exists(), f"{name}: {source} (mounted at {target}) is not in the repo"
    prometheus = _mounts(doc["services"]["prometheus"])
    config = yaml.safe_load((prometheus["/etc/prometheus/prometheus.yml"]).read_text())
    for rule_file in config["rule_files"]:
        assert f"/etc/prometheus/{rule_file}" in prometheus, rule_file
    grafana = _mounts(doc["services"]["grafana"])
    provider = yaml.safe_load((grafana["/etc/grafana/provisioning"] / "dashboards" / "imgflow.yml").read_text())
    dashboards = grafana[provider["providers"][0]["options"]["path"]]
    assert (dashboards / "imgflow.json").exists()
    source = yaml.safe_load((grafana["/etc/grafana/provisioning"] / "datasources" / "prometheus.yml").read_text())
    url = source["datasources"][0]["url"]
    assert url == "http://prometheus:9090" and "9090:9090" in doc["services"]["prometheus"]["ports"]
    uids = {t["datasource"]["uid"] for p in json.loads((dashboards / "imgflow.json").read_text())["panels"] for t in p["targets"]}
    assert uids == {source["datasources"][0]["uid"]}


def test_every_port_prometheus_scrapes_is_served(monkeypatch):
    doc = compose()
    services = imgflow_services(doc)
    config = yaml.safe_load((ROOT / "infra" / "prometheus" / "prometheus.yml").read_text())
    targets = [(t, static.get("labels", {})) for job in config["scrape_configs"] for static in job["static_configs"] for t in static["targets"]]
    assert targets
    scraped = set()
    for target, labels in targets:
        host, port = target.rsplit(":", 1)
        assert host in services, f"Prometheus scrapes {target}, but there is no imgflow service {host!r}"
        service = services[host]
        settings = _settings_of(service, monkeypatch)
        assert settings.metrics_port == int(port) and settings.metrics_addr == "0.0.0.0", target
        command, _ = _leaf(service["command"])
        path = " ".join(a for a in service["command"][:2] if not a.startswith("-"))
        assert path in METRICS_COMMANDS or path.split()[0] in METRICS_COMMANDS, f"{host} serves no metrics"
        assert labels.get("process") == host
        scraped.add(host)
    # ... and every process that serves metrics is scraped.
    assert scraped == {n for n, s in services.items() if s["command"][0] in ("stage", "watch")}


def test_dockerfile_imgflow_variables_are_valid_settings(monkeypatch):
    env = dict(re.findall(r"(IMGFLOW_\w+)=(\S+)", (ROOT / "Dockerfile").read_text()))
    assert env
    for key in env:
        assert _is_setting(key), key
    settings = _settings_of({"environment": env}, monkeypatch)
    assert settings.metrics_port == 9100 and settings.metrics_addr == "0.0.0.0"


def test_dockerfile_installs_exactly_what_make_install_installs():
    dockerfile = (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    runs = " ".join(re.findall(r"^RUN (.+)$", dockerfile, re.M))
    assert "make deps" in runs and "pip install" not in runs
    recipe = makefile.split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    assert "$(MAKE) deps" in recipe
    assert [line for line in recipe.splitlines() if "pip install" in line] == ["\t$(BIN)/pip install -q --upgrade pip"]
    assert 'ENTRYPOINT ["imgflow"]' in dockerfile
    copied = set(re.findall(r"^COPY (\S+)", dockerfile, re.M))
    packages = re.search(r"include = \[([^\]]+)\]", (ROOT / "pyproject.toml").read_text()).group(1)
    for package in re.findall(r'"(\w+)\*"', packages):
        assert package in copied, f"the image lacks the package {package}"


# Kafka's replication and security, from variables (README "Kafka security").
SECURED_ENV = {
    "IMGFLOW_KAFKA__BOOTSTRAP": "k1.example:9094,k2.example:9094,k3.example:9094",
    "IMGFLOW_TOPICS__REPLICATION_FACTOR": "3",
    "IMGFLOW_TOPICS__MIN_INSYNC_REPLICAS": "2",
    "IMGFLOW_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
    "IMGFLOW_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
    "IMGFLOW_KAFKA__SASL_USERNAME": "imgflow",
    "IMGFLOW_KAFKA__SASL_PASSWORD": "not-a-real-password",
    "IMGFLOW_KAFKA__SSL_CA_LOCATION": "/etc/kafka-tls/ca.pem",
    "IMGFLOW_KAFKA__SSL_CERTIFICATE_LOCATION": "/etc/kafka-tls/client.pem",
    "IMGFLOW_KAFKA__SSL_KEY_LOCATION": "/etc/kafka-tls/client.key",
    "IMGFLOW_KAFKA__SSL_KEY_PASSWORD": "not-a-real-key-password",
    "IMGFLOW_KAFKA_TLS_DIR": "/srv/kafka-tls",
    "MINIO_KAFKA_SASL": "on",
    "MINIO_KAFKA_TLS": "on",
}


def test_kafka_replication_and_security_defaults_are_the_bundled_single_node_broker(monkeypatch):
    doc = compose()
    kafka = doc["services"]["kafka"]["environment"]
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_DEFAULT_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
        "KAFKA_MIN_INSYNC_REPLICAS",
    ):
        assert str(kafka[key]) == "1", key
    services = imgflow_services(doc)
    assert "kafka-init" in services and {"s3-watcher", "vision", "enrich", "sink", "backfill", "replay"} <= set(services)
    for name, service in services.items():
        k = _settings_of(service, monkeypatch)
        assert (k.kafka.bootstrap, k.kafka.security_protocol, k.kafka.sasl_mechanism) == ("kafka:9092", "PLAINTEXT", ""), name
        assert k.kafka.sasl_password.get_secret_value() == "" and k.kafka.ssl_ca_location == "", name
        assert (k.topics.replication_factor, k.topics.min_insync_replicas) == (1, 1), name
    assert doc["services"]["minio"]["environment"]["MINIO_NOTIFY_KAFKA_BROKERS_IMGFLOW"] == "kafka:9092"
    assert doc["services"]["minio"]["environment"]["MINIO_NOTIFY_KAFKA_SASL_IMGFLOW"] == "off"


def test_kafka_replication_and_security_variables_reach_every_imgflow_service(monkeypatch):
    doc = compose(SECURED_ENV)
    services = imgflow_services(doc)
    for name, service in services.items():
        env = service["environment"]
        for key in (k for k in SECURED_ENV if k.startswith("IMGFLOW_") and "__" in k):
            assert env.get(key) == SECURED_ENV[key], (name, key)
        # ... and through the one settings class they are what the variables say.
        settings = _settings_of(service, monkeypatch)
        k = settings.kafka
        assert k.bootstrap == SECURED_ENV["IMGFLOW_KAFKA__BOOTSTRAP"], name
        assert (k.security_protocol, k.sasl_mechanism, k.sasl_username) == ("SASL_SSL", "SCRAM-SHA-512", "imgflow"), name
        assert k.sasl_password.get_secret_value() == "not-a-real-password", name
        assert k.ssl_key_password.get_secret_value() == "not-a-real-key-password", name
        assert "not-a-real" not in repr(settings), name  # secrets stay secret values
        assert (settings.topics.replication_factor, settings.topics.min_insync_replicas) == (3, 2), name
        # The TLS files are read inside the container from the operator's folder, mounted read-only.
        assert f"{SECURED_ENV['IMGFLOW_KAFKA_TLS_DIR']}:/etc/kafka-tls:ro" in service["volumes"], name
        for path in (k.ssl_ca_location, k.ssl_certificate_location, k.ssl_key_location):
            assert path.startswith("/srv/kafka-tls/"), (name, path)  # the container path maps into that mount
    kafka = doc["services"]["kafka"]["environment"]
    assert kafka["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3" and kafka["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
    minio = doc["services"]["minio"]["environment"]
    assert minio["MINIO_NOTIFY_KAFKA_BROKERS_IMGFLOW"] == SECURED_ENV["IMGFLOW_KAFKA__BOOTSTRAP"]
    assert (minio["MINIO_NOTIFY_KAFKA_SASL_IMGFLOW"], minio["MINIO_NOTIFY_KAFKA_TLS_IMGFLOW"]) == ("on", "on")
    assert minio["MINIO_NOTIFY_KAFKA_SASL_USERNAME_IMGFLOW"] == "imgflow"
    # Still valid Compose with every variable set.
    schema = json.loads((importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    errors = list(jsonschema.validators.validator_for(schema)(schema).iter_errors(doc))
    assert not errors, errors[:3]


def test_every_kafka_variable_of_the_compose_file_is_documented_in_it():
    text = COMPOSE.read_text()
    header = text.split("\nx-", 1)[0]
    used = {m.group(1) for m in VARIABLE.finditer(text) if m.group(1)}
    kafka_variables = sorted(v for v in used if v.startswith(("IMGFLOW_KAFKA", "IMGFLOW_TOPICS", "MINIO_KAFKA")))
    assert len(kafka_variables) >= 14, kafka_variables
    for name in kafka_variables:
        assert name in header, f"{name} is used in docker-compose.yml but not documented in its header comment"
