"""The commands on a cluster stack (``ops/stack --cluster ...``)."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ops.lib.stack.cluster import (
    Cluster,
    check_cluster_ports,
    cluster_id,
    cluster_nodes_named,
    cluster_pg_conf,
    cluster_running,
    kill_group,
    promote,
    rebuild_standby,
    replace_port,
    start_kafka_node,
    start_pg_cluster,
    wait_cluster,
)
from ops.lib.stack.config import (
    HOST,
    KAFKA_NODE_NAMES,
    PG_NODE_NAMES,
    PG_NODES,
    SERVICES,
    StackError,
    locked,
    say,
)
from ops.lib.stack.kafka_node import java_cmd, kafka_version, stop_kafka
from ops.lib.stack.postgres import pg_bindir, start_postgres, stop_postgres
from ops.lib.stack.procs import check_port_free, in_parallel, postgres_pid
from ops.lib.stack.single import check_recorded_ports, endpoints_of, print_env, served_from_outside
from processor.tools.procs import children


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
        in_parallel(starters)
        asyncio.run(wait_cluster(cluster, timeout))
    if starters:
        say(
            f"cluster up in {time.monotonic() - started:.1f}s: `ops/stack env` prints its endpoints"
        )
    return 0


def cmd_cluster_down(cluster: Cluster, immediate: bool, services: Sequence[str] = SERVICES) -> int:
    names = [n for s in services for n in cluster_nodes_named(s)]
    with locked(cluster.dir / "stack.lock"):
        stops: list[Callable[[], object]] = [
            functools.partial(stop_kafka, node, immediate)
            for name, node in cluster.named_kafka()
            if name in names
        ]
        stops += [
            functools.partial(stop_postgres, node, immediate)
            for name, node in cluster.named_pg()
            if name in names
        ]
        in_parallel(stops)
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


def cmd_cluster_env(cluster: Cluster, as_json: bool, sasl_ssl: bool = False) -> int:
    if sasl_ssl:
        raise StackError("the cluster has no SASL_SSL listener")
    return print_env(endpoints_of(cluster.bootstrap, cluster.database_url()), as_json)


def cmd_cluster_wait(cluster: Cluster, timeout: float) -> int:
    asyncio.run(wait_cluster(cluster, timeout))
    return 0
