"""The embedded, durable broker stack, one command for every engine.

Run it as ``python -m infra.embedded --data-dir DIR [--engine tansu|kafka] [--port PORT]``.

* ``tansu`` (default; no Java): tansu on a local SeaweedFS (``infra/tansu.py``,
  ``infra/seaweedfs.py``); records, committed offsets and transactional ids live in S3 under
  ``DIR/s3`` and survive a restart.
* ``kafka``: Apache Kafka 4.x in KRaft mode from its Maven Central jars
  (``infra/kafka_broker.py``), one combined node, or ``--nodes 3`` for a real cluster; data
  under ``DIR/kafka``.
* Health is checked by creating and describing a topic, then the pipeline topics are created.
* ``DIR/stack.json`` is written atomically and one line ``ready bootstrap=HOST:PORT`` is printed.
* Afterwards the process supervises (``infra/supervisor.py``): whatever of the engine dies
  is restarted on the same ports and data. SIGTERM/SIGINT stops it all in order, removes
  ``stack.json`` and exits 0.

Exit codes: 0 clean stop, 1 start-up failure, 2 usage error (port in use, data dir in use).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from imgflow.process import free_ports, port_is_free
from infra.procs import EXIT_FAILED, EXIT_OK, EXIT_USAGE, StartupError, Stopping
from infra.supervisor import Supervisor

if TYPE_CHECKING:
    from infra.kafka_node import SaslSsl

log = logging.getLogger("infra.embedded")

DEFAULT_PORT = 19092
ENGINES = ("tansu", "kafka")


def setup_logging() -> None:
    try:
        from imgflow.logs import setup_logging as imgflow_setup_logging

        imgflow_setup_logging()
        return
    except Exception:  # noqa: BLE001 - module absent or broken: plain logging
        pass
    logging.basicConfig(
        level=os.environ.get("IMGFLOW_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m infra.embedded",
        description="Run the embedded durable broker: tansu on a local SeaweedFS, or Apache Kafka (KRaft).",
    )
    p.add_argument("--data-dir", type=Path, required=True, help="where broker data, logs and stack.json live")
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default=os.environ.get("IMGFLOW_BROKER__ENGINE", "tansu"),
        help="tansu (default, no Java needed) or kafka (Apache Kafka; Java 17+, Maven once)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"Kafka port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1", help="Kafka listen and advertised host")
    p.add_argument("--nodes", type=int, default=1, help="kafka engine: how many broker+controller nodes (1 or 3 ...)")
    p.add_argument(
        "--kafka-config", action="append", default=[], metavar="KEY=VALUE", help="kafka engine: an extra server.properties line for every node (repeatable)"
    )
    p.add_argument(
        "--sasl-ssl",
        type=Path,
        default=None,
        metavar="TLSDIR",
        help="kafka engine: add a SASL_SSL client listener (SCRAM-SHA-256/512) whose TLS key and "
        "certificate chain are TLSDIR/broker.pem (PEM: PKCS#8 key, then the chain); its "
        "address is stack.json's listeners.SASL_SSL",
    )
    p.add_argument(
        "--scram-users",
        type=Path,
        default=None,
        metavar="FILE",
        help='with --sasl-ssl: a JSON file {"NAME": "PASSWORD", ...} of the SCRAM users created '
        "when the storage is formatted (a file, so no password is on a command line)",
    )
    p.add_argument(
        "--ssl-client-auth",
        choices=("none", "requested", "required"),
        default="none",
        help="with --sasl-ssl: ask clients for a certificate signed by TLSDIR/ca.pem",
    )
    p.add_argument("--parent-pid", type=int, default=None, help="shut down when this process is gone")
    p.add_argument("--start-timeout", type=float, default=90.0, help="seconds to wait for the broker to become healthy")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error("--port must be between 0 and 65535")
    if not 1 <= args.nodes <= 9:
        p.error("--nodes must be between 1 and 9")
    if args.nodes > 1 and args.engine != "kafka":
        p.error("--nodes needs --engine kafka")
    if args.sasl_ssl is not None and args.engine != "kafka":
        p.error("--sasl-ssl needs --engine kafka")
    if (args.sasl_ssl is None) != (args.scram_users is None):
        p.error("--sasl-ssl and --scram-users go together")
    for item in args.kafka_config:
        if "=" not in item:
            p.error(f"--kafka-config {item!r}: expected KEY=VALUE")
    return args


def usage_error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def sasl_ssl_from_args(tls_dir: Path, users_file: Path, client_auth: str) -> SaslSsl:
    """The SASL_SSL listener of ``--sasl-ssl``, ``--scram-users`` and ``--ssl-client-auth``."""
    import json

    from infra.kafka_node import sasl_ssl_listener

    try:
        users = json.loads(Path(users_file).read_text())
    except (OSError, ValueError) as exc:
        raise StartupError(f"--scram-users {users_file}: cannot read it as JSON {{name: password}} ({type(exc).__name__})") from None
    if not isinstance(users, dict) or not all(isinstance(v, str) for v in users.values()):
        raise StartupError(f"--scram-users {users_file}: expected a JSON object {{name: password}}")
    return sasl_ssl_listener(tls_dir, users, client_auth)


def make_engine(args: argparse.Namespace, data_dir: Path, port: int):
    if args.engine == "kafka":
        from infra.kafka_broker import KafkaEngine

        props = dict(item.split("=", 1) for item in args.kafka_config)
        sasl_ssl = sasl_ssl_from_args(args.sasl_ssl, args.scram_users, args.ssl_client_auth) if args.sasl_ssl is not None else None
        return KafkaEngine(data_dir, args.host, port, nodes=args.nodes, props=props, sasl_ssl=sasl_ssl)
    from infra.tansu import TansuEngine

    return TansuEngine(data_dir, args.host, port)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    data_dir: Path = args.data_dir.expanduser().resolve()

    # Port first: a port in use is the commonest mistake, report it before doing anything.
    port = args.port
    if port == 0:
        port = 0 if args.engine == "kafka" else free_ports(1, args.host)[0]  # kafka keeps its saved ports
    elif not port_is_free(args.host, port):
        return usage_error(f"port {args.host}:{port} is already in use (another broker or stack running?); stop it or use --port 0 to pick a free port")

    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "logs").mkdir(exist_ok=True)
    lock_file = open(data_dir / ".stack.lock", "a+")  # noqa: SIM115 - held for our lifetime
    try:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return usage_error(f"data dir {data_dir} is in use by another running stack")
        raise
    with contextlib.suppress(FileNotFoundError):
        (data_dir / "stack.json").unlink()  # stale, from a stack that was killed

    try:
        engine = make_engine(args, data_dir, port)
    except StartupError as e:  # e.g. --sasl-ssl without broker.pem
        log.error("%s", e)
        return EXIT_FAILED
    sup = Supervisor(engine, data_dir, args.parent_pid, args.start_timeout)
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGINT, sup.request_stop)
    signal.signal(signal.SIGHUP, sup.request_stop)
    code = EXIT_OK
    try:
        sup.start()
        sup.supervise()
    except Stopping as e:
        log.info("stopping: %s", e)
    except StartupError as e:
        log.error("%s", e)
        code = EXIT_FAILED
    except Exception:  # noqa: BLE001
        log.exception("embedded stack failed")
        code = EXIT_FAILED
    finally:
        sup.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
