"""The chaos run's configuration: its command line, fault orders, exit codes."""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ops.lib.common import progress
from processor.errors import (
    ConcurrencyVersionMismatch,
)
from processor.tools.chaos_check import (
    CLUSTER_FAULT_KINDS,
    FAULT_KINDS,
)

#: The short form's order: every kind once, the slow ones spread out.
SHORT_ORDER: Final = (
    "net-latency",
    "worker-kill9",
    "postgres-fast",
    "worker-add",
    "kafka-kill9",
    "net-reset",
    "worker-remove",
    "postgres-immediate",
    "worker-zombie",
    "net-partition",
)


#: The cluster run's short form: every cluster kind once.
CLUSTER_SHORT_ORDER: Final = (
    "kafka-net-latency",
    "broker-leader-kill9",
    "postgres-failover",
    "kafka-net-reset",
    "broker-pause",
    "kafka-net-partition",
    "overlap",
)


#: Two faults at once: the pairs ``overlap`` goes through in turn (the second starts a
#: drawn 0.5-4 s after the first). Pairs whose ``ops/stack`` commands would wait for each
#: other's lock (a broker restart and a failover) are left out: they would run in turn.
OVERLAPS: Final = (
    ("postgres-failover", "broker-pause"),
    ("broker-leader-kill9", "kafka-net-partition"),
    ("postgres-failover", "worker-kill9"),
)


#: The Kafka node the proxy stands in front of (its routed listener, see ops/stack.py).
ROUTED_NODE: Final = 3


#: Ports of a private cluster stack: 3 Kafka client, 9 controller/inter-broker/routed, 2
#: PostgreSQL, in one block found free in this range (PROCESSOR_CHAOS_CLUSTER_PORTS).
CLUSTER_PORTS: Final = 14


SESSION_TIMEOUT: Final = 10.0  # processor.kafka.make_consumer's session_timeout_ms


MAX_MESSAGE_BYTES: Final = 100_000  # the workers' PROCESSOR_MAX_MESSAGE_BYTES here


POISON: Final = -(10**12)  # what a stale update writes: an acceptance shows in the counters


EXIT_ANOMALIES: Final = 1


EXIT_SETUP: Final = 2


MISMATCH: Final = ConcurrencyVersionMismatch.code


logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def say(message: str) -> None:
    progress("chaos", message)


class SetupError(Exception):
    """The run could not start or keep its stack: exit 2, not an anomaly."""


@dataclass(frozen=True, slots=True)
class Config:
    duration: float  # of the fault phase (the short form: until every kind ran once)
    workers: int
    seed: int
    workdir: Path
    json_path: Path | None
    short: bool
    clients: int = 16
    rows: int = 300
    skew: float = 1.0
    delete_rows: int = 400
    partitions: int = 6
    stale_share: float = 0.05
    delete_share: float = 0.02
    hostile_share: float = 0.03
    reply_timeout: float = 15.0
    settle_limit: float = 180.0  # resending unanswered requests after the load stopped
    quiet_limit: float = 180.0  # waiting for the group to drain and transactions to end
    recovery_limit: float = 120.0  # waiting for a fault's recovery before the next one
    warmup: float = 8.0  # load before the first fault (the baseline)
    keep_stack: bool = False
    cluster: bool = False  # three brokers, PostgreSQL primary + standby, the cluster kinds

    @property
    def kinds(self) -> tuple[str, ...]:
        return CLUSTER_FAULT_KINDS if self.cluster else FAULT_KINDS


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        prog="ops/chaos",
        description="A contended load through a worker group while workers, the broker, the "
        "database and the network fail on a schedule; then the audit and the model checks. "
        "Exit status: 0 no anomaly, 1 anomalies, 2 bad arguments or stack/setup failure.",
    )
    parser.add_argument("--short", action="store_true", help="CI form: every fault kind once")
    parser.add_argument("--duration", type=float, help="seconds of faults [600; --short: 0]")
    parser.add_argument("--workers", type=int, default=3, help="workers at the start [3]")
    parser.add_argument("--seed", type=int, help="random seed [random, printed]")
    parser.add_argument("--workdir", type=Path, help="stack, logs and results [a temp dir]")
    parser.add_argument("--json", type=Path, help="result file [<workdir>/chaos.json]")
    parser.add_argument("--clients", type=int, default=16, help="virtual clients [16]")
    parser.add_argument("--rows", type=int, default=300, help="counter rows [300]")
    parser.add_argument("--keep-stack", action="store_true", help="leave the stack running")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="on a cluster stack (3 brokers, PostgreSQL primary + synchronous standby) with "
        "the cluster fault kinds",
    )
    args = parser.parse_args(argv)
    duration = args.duration if args.duration is not None else (0.0 if args.short else 600.0)
    problems = [
        (duration < 0, "--duration must be >= 0"),
        (not args.short and duration <= 0, "--duration must be > 0 without --short"),
        (args.workers < 2, "--workers must be >= 2 (one is killed, one removed)"),
        (args.workers > 6, "--workers must be <= 6 (the request topic has 6 partitions)"),
        (args.clients < 1, "--clients must be >= 1"),
        (args.rows < 10, "--rows must be >= 10"),
    ]
    for bad, message in problems:
        if bad:
            parser.error(message)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))).absolute()
    return Config(
        duration=duration,
        workers=args.workers,
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(10**6),
        workdir=workdir,
        json_path=args.json if args.json is not None else workdir / "chaos.json",
        short=args.short,
        clients=args.clients,
        rows=args.rows,
        keep_stack=args.keep_stack,
        cluster=args.cluster,
    )
