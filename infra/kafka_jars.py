"""Java and Apache Kafka's jars for the kafka engine (``infra/kafka_broker.py``).

``infra/kafka/pom.xml`` (the broker plus a log4j2 binding, versions pinned) is resolved once by
Maven into ``~/.cache/imgflow/kafka/<pom hash>/libs`` and reused (Maven's own downloads stay in
``~/.m2``). Java 17+ runs the broker; Maven is needed only for that first resolve.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from infra.procs import StartupError

log = logging.getLogger("infra.embedded")

HERE = Path(__file__).resolve().parent / "kafka"
POM = HERE / "pom.xml"
LOG4J_CONFIG = HERE / "log4j2.properties"
NO_JAVA_HINT = "--engine tansu (the default) needs neither Java nor Maven"

# Sized for a 2-core machine beside the models: a small heap, one GC thread, the C1 JIT only
# (the broker starts in ~4 s instead of ~9 s and its steady CPU is the same at this load).
JVM_OPTS = ["-Xms256m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:ActiveProcessorCount=2", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true"]


def java_binary() -> str:
    """The ``java`` that runs the broker: ``$JAVA_HOME/bin/java``, else the one on PATH; 17+."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home and (Path(home) / "bin" / "java").is_file() else shutil.which("java")
    if not java:
        raise StartupError(
            f"--engine kafka needs Java 17 or newer, and no `java` was found on PATH "
            f"or in JAVA_HOME (install a JDK, e.g. apt-get install openjdk-17-jre-headless); "
            f"{NO_JAVA_HINT}"
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    major = int(match.group(1)) if match else 0
    if major == 1 and match and match.group(2):  # "1.8.0_x"
        major = int(match.group(2))
    if major < 17:
        raise StartupError(
            f"--engine kafka needs Java 17 or newer; {java} is Java {major or '?'} ({(out.stderr or out.stdout).strip().splitlines()[:1]}); {NO_JAVA_HINT}"
        )
    return java


def default_jars_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "imgflow" / "kafka"


def pom_version() -> str:
    match = re.search(r"<kafka.version>([^<]+)</kafka.version>", POM.read_text())
    return match.group(1) if match else "?"


def kafka_libs(jars_dir: Path | None = None) -> Path:
    """The folder of the broker's jars, resolved from Maven Central on first use."""
    jars_dir = jars_dir or default_jars_dir()
    key = hashlib.sha256(POM.read_bytes()).hexdigest()[:12]
    target = jars_dir / f"{pom_version()}-{key}"
    libs = target / "libs"
    if (target / ".complete").exists():
        return libs
    jars_dir.mkdir(parents=True, exist_ok=True)
    with open(jars_dir / ".lock", "a+") as lock:  # several test sessions may start at once
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if (target / ".complete").exists():
            return libs
        mvn = shutil.which("mvn")
        if not mvn:
            raise StartupError(
                f"--engine kafka resolves Apache Kafka's jars with Maven the first time, "
                f"and `mvn` was not found on PATH (install it, e.g. apt-get install maven); "
                f"{NO_JAVA_HINT}"
            )
        java_binary()  # Maven needs it too: say so as clearly
        tmp = target / "libs.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        log.info("resolving Apache Kafka %s jars from Maven Central into %s (first start only)", pom_version(), libs)
        t0 = time.monotonic()
        cmd = [mvn, "-B", "-q", "-f", str(POM), "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={tmp}"]
        # Offline first: with ~/.m2 filled (a second data dir, a cleared cache) no network is needed.
        done = subprocess.run([*cmd[:1], "-o", *cmd[1:]], capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
            output = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise StartupError(
                f"Maven could not resolve Apache Kafka {pom_version()} ({POM}); is the Maven "
                f"repository (Maven Central, or the mirror in ~/.m2/settings.xml) reachable? "
                f"{NO_JAVA_HINT}. Maven said:\n{output}"
            )
        shutil.rmtree(libs, ignore_errors=True)
        tmp.rename(libs)
        (target / ".complete").write_text(f"{time.time():.0f}\n")
        log.info("Apache Kafka jars resolved in %.1f s (%d jars)", time.monotonic() - t0, len(list(libs.glob("*.jar"))))
    return libs


def java_cmd(libs: Path, main: str, *args: str) -> list[str]:
    """The command line that runs ``main`` of the broker's jars in ``libs``."""
    return [java_binary(), *JVM_OPTS, f"-Dlog4j2.configurationFile={LOG4J_CONFIG}", "-cp", f"{libs}/*", main, *args]


if __name__ == "__main__":  # resolve the jars alone: `python -m infra.kafka_jars`
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    print(kafka_libs())
