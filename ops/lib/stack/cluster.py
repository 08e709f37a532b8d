"""The cluster: three KRaft nodes, a PostgreSQL primary and a synchronous standby."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ops.lib.stack.config import (
    CLUSTER_JAVA_HEAP,
    CLUSTER_SERVICES,
    DATABASE,
    HOST,
    KAFKA_NODE_NAMES,
    KAFKA_NODES,
    PG_NODE_NAMES,
    PG_NODES,
    Stack,
    StackError,
    say,
    settings_file,
)
from ops.lib.stack.kafka_node import BROKER_COMMON, new_cluster_id, start_kafka
from ops.lib.stack.postgres import (
    chown_tree,
    ensure_traversable,
    pg_bindir,
    pg_user,
    run_pg,
    start_postgres,
)
from ops.lib.stack.procs import kafka_pid, postgres_pid, wait_gone
from ops.lib.stack.readiness import (
    ensure_database,
    kafka_answers,
    pg_fetch,
    postgres_answers,
    wait_until,
)


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
        **BROKER_COMMON,
        "num.io.threads": "2",
        "num.replica.fetchers": "1",
        "num.recovery.threads.per.data.dir": "1",
    }
    return settings_file(settings, "=", " (cluster node)")


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


def cluster_running(cluster: Cluster) -> dict[str, int | None]:
    found = {name: kafka_pid(node) for name, node in cluster.named_kafka()}
    found |= {name: postgres_pid(node) for name, node in cluster.named_pg()}
    return found


async def sync_standby(cluster: Cluster) -> str | None:
    """None when the primary streams to a synchronous standby (commits can return)."""
    url = cluster.pg_node(cluster.primary()).database_url("postgres")
    states = await pg_fetch(url, "SELECT application_name, sync_state FROM pg_stat_replication")
    if isinstance(states, str):
        return states
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
