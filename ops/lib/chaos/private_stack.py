"""The run's private stack: its own state dir and ports, started and stopped through
``ops/stack``."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from ops.lib import common
from ops.lib.chaos.config import CLUSTER_PORTS, ROUTED_NODE, SetupError
from ops.lib.common import STACK
from processor.kafka import clients as kafka


async def topics_visible(access: kafka.KafkaAccess, topics: list[str], limit: float = 60) -> None:
    """A topic created a moment ago may be missing from a loaded broker's metadata for a
    while; the clients started next would take it for a missing topic."""
    admin = kafka.admin_client(access)
    await admin.start()
    try:
        deadline = time.monotonic() + limit
        while not set(topics) <= set(await admin.list_topics()):
            if time.monotonic() > deadline:
                raise SetupError(f"topics {topics} not visible after {limit:.0f}s")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


def free_block(count: int) -> int:
    """The first of ``count`` consecutive ports free now, in PROCESSOR_CHAOS_CLUSTER_PORTS
    (LOW-HIGH, default 39000-39999)."""
    raw = os.environ.get("PROCESSOR_CHAOS_CLUSTER_PORTS", "39000-39999")
    low, _, high = raw.partition("-")
    try:
        base = common.free_block(count, int(low), int(high))
    except ValueError:
        raise SetupError(f"PROCESSOR_CHAOS_CLUSTER_PORTS={raw!r}: must be LOW-HIGH") from None
    if base is None:
        raise SetupError(f"no {count} consecutive free ports in {raw}")
    return base


class PrivateStack:
    """An ``ops/stack`` instance of the run's own: its state dir and ports (``cluster``:
    the cluster form, with a proxy's port in front of one broker's routed listener)."""

    def __init__(self, directory: Path, log: Path, cluster: bool = False) -> None:
        self.dir = directory
        self.log = log
        self.cluster = cluster
        self.route: int | None = None  # the broker proxy's port (cluster)
        if cluster:
            base = free_block(CLUSTER_PORTS)
            self.kafka_port, self.controller_port, self.pg_port = base, base + 3, base + 12
        else:
            self.kafka_port, self.controller_port, self.pg_port = common.free_ports(3)

    @property
    def bootstrap(self) -> str:
        if self.cluster:
            return ",".join(f"127.0.0.1:{self.kafka_port + i}" for i in range(3))
        return f"127.0.0.1:{self.kafka_port}"

    def database_url(self, port: int | None = None) -> str:
        if self.cluster:  # both servers: the clients follow a failover (ops/stack.py)
            hosts = f"127.0.0.1:{self.pg_port},127.0.0.1:{self.pg_port + 1}"
            return f"postgresql://postgres@{hosts}/processor?target_session_attrs=read-write"
        return f"postgresql://postgres@127.0.0.1:{port or self.pg_port}/processor"

    def status(self) -> dict[str, Any]:
        done = subprocess.run(
            [str(STACK), "status", "--json"], env=self.env(), capture_output=True, text=True
        )
        try:
            status: dict[str, Any] = json.loads(done.stdout)
        except ValueError:
            raise SetupError(f"`ops/stack status --json` failed: {done.stderr[-500:]}") from None
        return status

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL")  # else `up` starts nothing
        }
        env.update(
            PROCESSOR_STACK_DIR=str(self.dir),
            PROCESSOR_STACK_KAFKA_PORT=str(self.kafka_port),
            PROCESSOR_STACK_CONTROLLER_PORT=str(self.controller_port),
            PROCESSOR_STACK_PG_PORT=str(self.pg_port),
        )
        if self.cluster:
            env["PROCESSOR_STACK_CLUSTER"] = "1"
            if self.route is not None:
                env["PROCESSOR_STACK_KAFKA_ROUTE"] = f"kafka-{ROUTED_NODE}={self.route}"
        return env

    def run(self, *args: str) -> None:
        with self.log.open("a") as out:
            out.write(f"\n$ ops/stack {' '.join(args)}  ({time.strftime('%H:%M:%S')})\n")
            out.flush()
            done = subprocess.run(
                [str(STACK), *args], env=self.env(), stdout=out, stderr=subprocess.STDOUT
            )
        if done.returncode != 0:
            raise SetupError(
                f"`ops/stack {' '.join(args)}` failed (exit {done.returncode}); see {self.log}"
            )

    def up(self) -> None:
        self.run("up", "--timeout", "240")

    def stop(self, service: str, immediate: bool) -> None:
        self.run("stop", service, *(("--immediate",) if immediate else ()))

    def down(self) -> None:
        self.run("down", "--immediate")
