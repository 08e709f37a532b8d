"""The stack's configuration: where it lives, its ports and listeners, its lock."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ops.lib.common import ROOT

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


def redact(url: str) -> str:
    return re.sub(r"://([^:@/]+):[^@/]*@", r"://\1:***@", url)


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


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


def settings_file(settings: Mapping[str, str], sep: str, what: str = "") -> str:
    """A server's configuration file: one ``key<sep>value`` line a setting, under a line
    that says who wrote it (server.properties: ``=``; postgresql.conf: `` = ``)."""
    lines = [f"# written by ops/stack.py at every start{what}; edit there"]
    lines += [f"{key}{sep}{value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"
