"""The chaos run: a contended load through a worker group while faults are injected, then
a Jepsen-style check of the whole history.

Run it through ``ops/chaos`` (the project's .venv python)::

    ops/chaos --short                      # CI: every fault kind once (~3-4 min in all)
    ops/chaos --duration 600 --workers 3   # the long form: rounds of faults for 10 min

It always runs on a **private stack** (its own state dir under the workdir and its own
free ports, started and stopped with ``ops/stack``): it kills the broker and the database,
so it never touches the shared ``.stack/``.

1. Starts the stack, the demo schema, ledger and topics, the counter rows, a TCP proxy
   between the workers and PostgreSQL (the network faults), and ``--workers`` workers.
2. Drives a closed-loop load through :class:`processor.client.Client`: read-modify-write
   increments (retrieve, then update IfRowVersionMatches with the version read; retried on
   ConcurrencyVersionMismatch) on a few hundred rows with a Zipf-like skew, updates with a
   known stale version (must fault ConcurrencyVersionMismatch), deletes of a separate range
   of rows, and hostile records produced straight to the request topic. A request without
   a reply in time is resent as is (same request_id) until it gets one: the ledger makes
   that safe, and every request ends with a known outcome.
3. Meanwhile injects faults one after another, waiting after each for the service to
   recover: worker-kill9, worker-zombie, worker-add, worker-remove, kafka-kill9,
   postgres-immediate, postgres-fast, net-latency, net-reset, net-partition.
4. The quiet period: the load stops, everything is healed, and the run waits until the
   group has consumed the whole request topic and no transaction is open on the reply and
   dead-letter topics (last stable offset = high watermark), then stops the workers.
5. The checker (:mod:`processor.chaos`): the audit over everything (:mod:`processor.audit`)
   plus the model checks; anomalies by name, figures, a JSON file. Exit status: 0 clean,
   1 any anomaly, 2 bad arguments or a stack/setup failure (the message says which).

Recovery time of a fault: from its heal (the restart returned, SIGCONT, the proxy healed,
the worker started or signalled) until every partition of the request topic has delivered
a reply to the clients again. Disruption: the same, from the fault's injection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import asyncpg
import msgspec
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

from processor.audit import ANOMALIES, AuditOptions, AuditReport, run_audit
from processor.chaos import (
    ALL_ANOMALIES,
    CLUSTER_FAULT_KINDS,
    FAULT_KINDS,
    ClientHistory,
    Hostile,
    Observed,
    Verdict,
    judge,
    model_anomalies,
)
from processor.client import Client, new_request_id
from processor.config import Settings, redact_url
from processor.contract import (
    DeleteRequest,
    Reply,
    Request,
    RetrieveRequest,
    UpdateRequest,
    request_key,
)
from processor.demo import DEFAULT_REGISTRY, install_demo
from processor.errors import (
    ConcurrencyVersionMismatch,
    EntityNotFound,
    InvalidArgument,
    ObjectDoesNotExist,
    ProcessorError,
    ReplyTimeout,
    RequestTooLarge,
    TransientError,
)
from processor.kafka import clients as kafka

ROOT: Final = Path(__file__).resolve().parent.parent
STACK: Final = ROOT / "ops" / "stack"
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
    print(f"chaos {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


class SetupError(Exception):
    """The run could not start or keep its stack: exit 2, not an anomaly."""


# --- configuration ---------------------------------------------------------------------------


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


# --- the private stack -----------------------------------------------------------------------


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


def free_ports(count: int) -> list[int]:
    """Ports free right now on 127.0.0.1 (held together, so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_block(count: int) -> int:
    """The first of ``count`` consecutive ports free now, in PROCESSOR_CHAOS_CLUSTER_PORTS
    (LOW-HIGH, default 39000-39999)."""
    raw = os.environ.get("PROCESSOR_CHAOS_CLUSTER_PORTS", "39000-39999")
    low, _, high = raw.partition("-")
    try:
        bases = list(range(int(low), int(high) - count + 1))
    except ValueError:
        raise SetupError(f"PROCESSOR_CHAOS_CLUSTER_PORTS={raw!r}: must be LOW-HIGH") from None
    random.SystemRandom().shuffle(bases)

    def free(port: int) -> bool:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True

    for base in bases[:1000]:
        if all(free(p) for p in range(base, base + count)):
            return base
    raise SetupError(f"no {count} consecutive free ports in {raw}")


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
            self.kafka_port, self.controller_port, self.pg_port = free_ports(3)

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


# --- the network: a TCP proxy between the workers and PostgreSQL ------------------------------


def netem_probe() -> str | None:
    """None if ``tc qdisc ... netem`` works in a scratch network namespace, else why not."""
    name = f"chaos-probe-{os.getpid()}"
    try:
        add = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    except OSError as exc:
        return f"ip: {exc}"
    if add.returncode != 0:
        return f"ip netns add: {add.stderr.strip()}"
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=False)
        try:
            tc = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    name,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    "lo",
                    "root",
                    "netem",
                    "delay",
                    "1ms",
                ],
                capture_output=True,
                text=True,
            )
        except OSError as exc:
            return f"tc: {exc}"
        return None if tc.returncode == 0 else f"tc netem: {tc.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


class Proxy:
    """A userspace TCP proxy (its own thread and event loop) with three faults:

    - ``latency``: every chunk forwarded, either way, waits this long;
    - ``reset``: every second each connection is reset (RST) with this probability, and
      a new connection is refused with it;
    - ``partition``: nothing is forwarded either way, new connections are held unanswered
      (a blackhole); on heal the held data flows again, as after a real short partition.
    """

    def __init__(self, upstream_port: int, seed: int) -> None:
        self.upstream_port = upstream_port
        self.rng = random.Random(seed)
        self.latency = 0.0
        self.reset_share = 0.0
        self.port = 0
        self.connections = 0
        self.resets = 0
        self._loop = asyncio.new_event_loop()
        self._open: asyncio.Event | None = None
        self._live: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="chaos-proxy", daemon=True)

    def start(self) -> int:
        self._thread.start()
        if not self._ready.wait(10):
            raise SetupError("the network proxy did not start")
        return self.port

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            while True:
                await asyncio.sleep(1.0)
                if self.reset_share > 0:
                    for pair in list(self._live):
                        if self.rng.random() < self.reset_share:
                            self._reset(pair)

    def _reset(self, pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        self.resets += 1
        self._live.discard(pair)
        for writer in pair:
            with contextlib.suppress(OSError, AttributeError):
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._open is not None
        self.connections += 1
        await self._open.wait()  # a partition holds new connections unanswered
        if self.reset_share > 0 and self.rng.random() < self.reset_share:
            self.resets += 1
            with contextlib.suppress(OSError, AttributeError):
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.upstream_port), 10
            )
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._live.add(pair)
        try:
            await asyncio.gather(
                self._pump(reader, up_writer),
                self._pump(up_reader, writer),
                return_exceptions=True,
            )
        finally:
            self._live.discard(pair)
            for w in pair:
                w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._open is not None
        try:
            while data := await reader.read(65536):
                await self._open.wait()
                if self.latency > 0:
                    await asyncio.sleep(self.latency)
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()  # one side gone: the whole connection is

    def _call(self, fn: Callable[[], None]) -> None:
        self._loop.call_soon_threadsafe(fn)

    def set_latency(self, seconds: float) -> None:
        self.latency = seconds

    def set_reset(self, share: float) -> None:
        self.reset_share = share

    def set_partition(self, on: bool) -> None:
        def apply() -> None:
            assert self._open is not None
            if on:
                self._open.clear()
            else:
                self._open.set()

        self._call(apply)

    def heal(self) -> None:
        self.set_latency(0.0)
        self.set_reset(0.0)
        self.set_partition(False)


# --- the workers -----------------------------------------------------------------------------


class Workers:
    """``processor run`` subprocesses; each has a number and a log file."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env = env
        self.logdir = logdir
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.paused: set[int] = set()
        self.ended: dict[int, str] = {}  # number -> how it ended, by our hand
        self.ids: dict[int, str] = {}  # number -> PROCESSOR_WORKER_ID
        self.ports: dict[int, int] = {}  # number -> its /metrics port
        self.next = 0

    def start(self, worker_id: str | None = None) -> int:
        """A new worker process; ``worker_id`` given: a restart under that id, as a
        supervisor would do it (its first transaction aborts its previous life's)."""
        number = self.next
        self.next += 1
        self.ids[number] = worker_id or f"w{number}"
        (self.ports[number],) = free_ports(1)
        env = dict(
            self.env,
            PROCESSOR_WORKER_ID=self.ids[number],
            PROCESSOR_METRICS_PORT=str(self.ports[number]),
        )
        with (self.logdir / f"worker-{number}.log").open("wb") as log:
            self.procs[number] = subprocess.Popen(
                [sys.executable, "-m", "processor", "run"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.logdir,
            )
        return number

    def live(self) -> list[int]:
        return [n for n, p in self.procs.items() if p.poll() is None and n not in self.paused]

    def metric(self, number: int, name: str) -> float | None:
        """A sample of the worker's /metrics (summed over labels), None if it does not answer."""
        try:
            with socket.create_connection(("127.0.0.1", self.ports[number]), timeout=2) as conn:
                conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                chunks = []
                while chunk := conn.recv(65536):
                    chunks.append(chunk)
        except OSError:
            return None
        total = None
        for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
                total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
        return total

    def assigned(self, number: int) -> bool:
        """The worker received a partition assignment (it is in the group, the rebalance
        done): its processor_assignments_total metric."""
        return (self.metric(number, "processor_assignments_total") or 0) >= 1

    def unexpected_exits(self) -> dict[int, int]:
        """Workers that exited without our signal: number -> exit status."""
        return {
            n: p.returncode
            for n, p in self.procs.items()
            if p.poll() is not None and n not in self.ended
        }

    def kill9(self, number: int) -> None:
        self.ended[number] = "SIGKILL"
        self.procs[number].send_signal(signal.SIGKILL)
        self.procs[number].wait()

    def pause(self, number: int) -> None:
        self.paused.add(number)
        self.procs[number].send_signal(signal.SIGSTOP)

    def resume(self, number: int) -> None:
        self.procs[number].send_signal(signal.SIGCONT)
        self.paused.discard(number)

    def terminate(self, number: int, timeout: float = 60) -> int:
        self.ended[number] = "SIGTERM"
        proc = self.procs[number]
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        return int(code)

    def stop_all(self) -> dict[int, int]:
        for n in list(self.paused):
            self.resume(n)
        running = [n for n, p in self.procs.items() if p.poll() is None]
        for n in running:
            self.ended[n] = "SIGTERM (end of run)"
            self.procs[n].send_signal(signal.SIGTERM)
        codes = {}
        for n in running:
            try:
                codes[n] = self.procs[n].wait(60)
            except subprocess.TimeoutExpired:
                self.procs[n].kill()
                codes[n] = self.procs[n].wait()
        return codes


# --- the load ------------------------------------------------------------------------------


def _cumulative(rows: int, skew: float) -> list[float]:
    out, total = [], 0.0
    for i in range(rows):
        total += 1.0 / (i + 1) ** skew
        out.append(total)
    return out


class Load:
    """Virtual clients sharing one Client; everything they did goes to ``history``."""

    def __init__(
        self,
        cfg: Config,
        client: Client,
        hostile_producer: Any,
        request_topic: str,
        stale: dict[int, str],
        history: ClientHistory,
    ) -> None:
        self.cfg = cfg
        self.client = client
        self.producer = hostile_producer
        self.request_topic = request_topic
        self.stale = stale
        self.history = history
        self.rng = random.Random(cfg.seed)
        self.rows = sorted(history.initial)
        self.weights = _cumulative(len(self.rows), cfg.skew)
        self.delete_queue = list(history.delete_ids)
        self.rng.shuffle(self.delete_queue)
        self.running = True
        self.give_up_at = math.inf
        self.t0 = time.monotonic()
        self.ops: Counter[str] = Counter()
        self.sends = 0
        self.resends = 0
        self.replies = 0
        self.conflicts = 0
        self.hostile_unknown = 0
        self.client_errors: Counter[str] = Counter()
        self.request_ids: set[str] = set()
        self.per_second: Counter[int] = Counter()  # replies per second since t0
        self._watch: dict[int, float] | None = None
        self._watch_since = 0.0
        self._complete = asyncio.Event()
        client.observer = self._observe

    # -- bookkeeping ---------------------------------------------------------------------

    def _observe(self, request: Request, reply: Reply | None, _elapsed: float) -> None:
        self.sends += 1
        self.request_ids.add(request.request_id)
        if reply is None:
            return
        now = time.monotonic()
        self.replies += 1
        self.per_second[int(now - self.t0)] += 1
        if self._watch is not None and now >= self._watch_since:
            partition = self.partition_of(request_key(request))
            self._watch.setdefault(partition, now)
            if len(self._watch) >= self.cfg.partitions:
                self._complete.set()

    def partition_of(self, key: bytes) -> int:
        return int(murmur2(key) & 0x7FFFFFFF) % self.cfg.partitions

    def watch(self, since: float) -> None:
        """Start noting the first reply per partition at or after ``since``."""
        self._watch, self._watch_since = {}, since
        self._complete = asyncio.Event()

    def recovered_at(self) -> float | None:
        """When every partition had delivered a reply since ``watch`` (None: not yet)."""
        if self._watch is None or len(self._watch) < self.cfg.partitions:
            return None
        return max(self._watch.values())

    async def wait_recovered(self, limit: float) -> float | None:
        """``recovered_at``, once known, or None after ``limit`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._complete.wait(), limit)
        return self.recovered_at()

    def rate(self, start: float, end: float) -> float:
        """Replies per second between two monotonic times (whole seconds)."""
        first, last = int(start - self.t0), int(end - self.t0)
        if last <= first:
            return 0.0
        return sum(self.per_second[s] for s in range(first, last)) / (last - first)

    # -- requests --------------------------------------------------------------------------

    async def send(self, request: Request) -> Reply | None:
        """Send until a reply comes (the same request_id each time), or the run gives up."""
        first = True
        while True:
            if not first:
                self.resends += 1
            first = False
            try:
                return await self.client.send(request, timeout=self.cfg.reply_timeout)
            except ReplyTimeout:
                pass
            except (TransientError, KafkaError):
                await asyncio.sleep(1.0)  # Kafka refused it (down?): the same again soon
            except ProcessorError as exc:  # the client broke: the outcome is unknown
                self.client_errors[type(exc).__name__] += 1
                await asyncio.sleep(1.0)
            if time.monotonic() > self.give_up_at:
                self.history.unsettled.append(request.request_id)
                return None

    def _row(self) -> int:
        import bisect

        at = bisect.bisect_right(self.weights, self.rng.random() * self.weights[-1])
        return self.rows[min(at, len(self.rows) - 1)]

    async def increment(self, row: int) -> str:
        for attempt in range(20):
            current = await self.send(
                RetrieveRequest(request_id=new_request_id(), entity="counter", id=row)
            )
            if current is None:
                return "unsettled-retrieve"
            if current.status != "success" or current.attributes is None:
                return f"retrieve-fault-{current.fault.name if current.fault else '?'}"
            update = UpdateRequest(
                request_id=new_request_id(),
                entity="counter",
                id=row,
                attributes={"n": int(current.attributes["n"]) + 1},
                row_version=current.row_version,
                concurrency_behavior="IfRowVersionMatches",
            )
            reply = await self.send(update)
            if reply is None:
                self.history.unknown[row] += 1
                return "unknown"
            if reply.status == "success":
                self.history.acked[row] += 1
                return "ok"
            if reply.fault is None or reply.fault.code != MISMATCH:
                return f"fault-{reply.fault.name if reply.fault else '?'}"
            self.conflicts += 1
            await asyncio.sleep(self.rng.uniform(0, min(1.0, 0.01 * 2**attempt)))
        return "gave-up"

    async def stale_update(self, row: int) -> str:
        request = UpdateRequest(
            request_id=new_request_id(),
            entity="counter",
            id=row,
            attributes={"n": POISON},
            row_version=self.stale[row],
            concurrency_behavior="IfRowVersionMatches",
        )
        reply = await self.send(request)
        if reply is None:
            return "unsettled"
        if reply.status == "success":
            self.history.stale_accepted.append(request.request_id)
            return "ACCEPTED"
        return "rejected" if reply.fault and reply.fault.code == MISMATCH else "other-fault"

    async def delete(self) -> str:
        if self.delete_queue:
            row = self.delete_queue.pop()
        else:
            row = self.rng.choice(self.history.delete_ids)  # gone already: ObjectDoesNotExist
        reply = await self.send(
            DeleteRequest(
                request_id=new_request_id(),
                entity="counter",
                id=row,
                concurrency_behavior="AlwaysOverwrite",
            )
        )
        if reply is None:
            self.history.delete_unknown.add(row)
            return "unknown"
        if reply.status == "success":
            self.history.deleted.add(row)
            return "ok"
        code = reply.fault.code if reply.fault else None
        return "missing" if code == ObjectDoesNotExist.code else "other-fault"

    def hostile_record(
        self,
    ) -> tuple[str, bytes | None, bytes, list[tuple[str, bytes]], str | None, int | None]:
        """(kind, value, key, headers, readable request_id, expected fault code)."""
        rid = f"hostile-{uuid.uuid4().hex}"
        row = self._row()
        kind = self.rng.choice(
            (
                "garbage",
                "tombstone",
                "wrong-type",
                "bad-id",
                "oversize",
                "unknown-entity",
                "unknown-attribute",
            )
        )
        key = f"counter:{row}".encode()
        if kind == "garbage":
            return kind, bytes(self.rng.randrange(256) for _ in range(64)), key, [], None, None
        if kind == "tombstone":
            return kind, None, key, [], None, None
        if kind == "oversize":
            value = b"x" * (MAX_MESSAGE_BYTES + 1000)
            return kind, value, key, [("request_id", rid.encode())], rid, RequestTooLarge.code
        body: dict[str, Any] = {
            "type": "update",
            "request_id": rid,
            "entity": "counter",
            "id": row,
            "attributes": {"n": 1},
        }
        code = InvalidArgument.code
        if kind == "wrong-type":
            body["attributes"] = {"n": "lots"}
        elif kind == "bad-id":
            body["id"] = 1.5
        elif kind == "unknown-entity":
            body["entity"] = "no_such_entity"
            key = f"no_such_entity:{row}".encode()
            code = EntityNotFound.code
        else:
            body["attributes"] = {"no_such_column": 1}
            code = -2147217149  # QueryBuilderNoAttribute
        return kind, msgspec.json.encode(body), key, [], rid, code

    async def hostile(self) -> str:
        kind, value, key, headers, rid, code = self.hostile_record()
        try:
            meta = await asyncio.wait_for(
                self.producer.send_and_wait(self.request_topic, value, key=key, headers=headers),
                self.cfg.reply_timeout,
            )
        except (KafkaError, TimeoutError):
            self.hostile_unknown += 1  # maybe written, maybe not: the audit still covers it
            return "unknown"
        self.history.hostile.append(Hostile(kind, meta.partition, meta.offset, rid, code))
        return kind

    async def virtual_client(self) -> None:
        cfg = self.cfg
        while self.running:
            draw = self.rng.random()
            if draw < cfg.hostile_share:
                kind, work = "hostile", self.hostile()
            elif draw < cfg.hostile_share + cfg.delete_share:
                kind, work = "delete", self.delete()
            elif draw < cfg.hostile_share + cfg.delete_share + cfg.stale_share:
                kind, work = "stale", self.stale_update(self._row())
            else:
                kind, work = "increment", self.increment(self._row())
            try:
                outcome = await work
            except ProcessorError as exc:  # the client itself broke: count it, go on
                outcome = f"error-{type(exc).__name__}"
                await asyncio.sleep(1.0)
            self.ops[f"{kind}.{outcome}"] += 1


# --- faults ----------------------------------------------------------------------------------


@dataclass(slots=True)
class FaultRecord:
    kind: str
    started: float  # seconds since the load started
    healed: float
    recovered: float | None = None  # None: not within the recovery limit
    detail: str = ""

    @property
    def recovery(self) -> float | None:
        return None if self.recovered is None else max(0.0, self.recovered - self.healed)

    @property
    def disruption(self) -> float | None:
        return None if self.recovered is None else max(0.0, self.recovered - self.started)


class Chaos:
    """Injects the faults and waits for the recovery of each."""

    def __init__(
        self,
        cfg: Config,
        stack: PrivateStack,
        workers: Workers,
        proxy: Proxy,
        load: Load,
    ) -> None:
        self.cfg = cfg
        self.stack = stack
        self.workers = workers
        self.proxy = proxy
        self.load = load
        self.rng = random.Random(cfg.seed + 1)
        self.records: list[FaultRecord] = []
        self.current = "warm-up"
        self.remove_codes: list[int] = []
        self._zombie: tuple[int, float, float] | None = None  # (worker, fenced, assignments)
        self.overlaps = 0

    def now(self) -> float:
        return time.monotonic() - self.load.t0

    async def _blocking(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.to_thread(fn)

    def _pick(self) -> int:
        live = self.workers.live()
        if not live:
            raise SetupError("no live worker left to inject a fault into")
        return self.rng.choice(live)

    async def _joined(self, number: int, limit: float = 90.0) -> str:
        """Wait until a new worker got its partitions (the rebalance it caused is done)."""
        started = time.monotonic()
        for _ in range(int(limit / 0.2)):
            if self.workers.assigned(number):
                return f", assigned after {time.monotonic() - started:.1f}s"
            await asyncio.sleep(0.2)
        return f", NOT assigned within {limit:.0f}s"

    def _hold(self, short: float, low: float, high: float) -> float:
        return short if self.cfg.short else self.rng.uniform(low, high)

    async def _act(self, kind: str) -> str:
        """Inject one fault and heal it; what was done, in words."""
        detail = ""
        if kind == "worker-kill9":
            n = self._pick()
            self.workers.kill9(n)
            m = self.workers.start(self.workers.ids[n])
            detail = (
                f"worker {n} killed -9, restarted as worker {m} (same id)" + await self._joined(m)
            )
        elif kind == "worker-zombie":
            n = self._pick()
            pause = self._hold(SESSION_TIMEOUT + 3, SESSION_TIMEOUT + 2, SESSION_TIMEOUT + 10)
            self._zombie = (
                n,
                self.workers.metric(n, "processor_fenced_total") or 0.0,
                self.workers.metric(n, "processor_assignments_total") or 0.0,
            )
            self.workers.pause(n)
            await asyncio.sleep(pause)
            self.workers.resume(n)
            detail = f"worker {n} SIGSTOP for {pause:.1f}s, then SIGCONT"
        elif kind == "worker-add":
            m = self.workers.start()
            detail = f"worker {m} started ({len(self.workers.live())} live)" + await self._joined(m)
        elif kind == "worker-remove":
            if len(self.workers.live()) <= 1:
                m = self.workers.start()
                detail = f"only one worker: worker {m} started first; "
                await asyncio.sleep(5)
            n = self._pick()
            code = await self._blocking(lambda: self.workers.terminate(n))
            self.remove_codes.append(code)
            detail += f"worker {n} SIGTERM, exited {code}"
        elif kind == "kafka-kill9":
            down = self._hold(2.0, 1.0, 8.0)
            await self._blocking(lambda: self.stack.stop("kafka", immediate=True))
            await asyncio.sleep(down)
            await self._blocking(self.stack.up)
            detail = f"broker SIGKILL, restarted after {down:.1f}s"
        elif kind in ("postgres-immediate", "postgres-fast"):
            immediate = kind == "postgres-immediate"
            down = self._hold(2.0, 1.0, 8.0)
            await self._blocking(lambda: self.stack.stop("postgres", immediate=immediate))
            await asyncio.sleep(down)
            await self._blocking(self.stack.up)
            detail = (
                f"pg_ctl stop -m {'immediate' if immediate else 'fast'}, started after {down:.1f}s"
            )
        elif kind == "net-latency":
            delay = self._hold(0.1, 0.02, 0.3)
            hold = self._hold(6.0, 4.0, 15.0)
            self.proxy.set_latency(delay)
            await asyncio.sleep(hold)
            self.proxy.set_latency(0.0)
            detail = f"{delay * 1000:.0f} ms per chunk for {hold:.1f}s"
        elif kind == "net-reset":
            share = self._hold(0.3, 0.1, 0.5)
            hold = self._hold(6.0, 4.0, 15.0)
            before = self.proxy.resets
            self.proxy.set_reset(share)
            await asyncio.sleep(hold)
            self.proxy.set_reset(0.0)
            detail = f"{share:.0%} per second for {hold:.1f}s: {self.proxy.resets - before} resets"
        elif kind == "net-partition":
            hold = self._hold(6.0, 3.0, 20.0)
            self.proxy.set_partition(True)
            await asyncio.sleep(hold)
            self.proxy.set_partition(False)
            detail = f"workers <-/-> database for {hold:.1f}s"
        elif kind == "broker-leader-kill9":
            node, led = await self._busiest_leader()
            down = self._hold(2.0, 1.0, 8.0)
            await self._blocking(lambda: self.stack.stop(f"kafka-{node}", immediate=True))
            await asyncio.sleep(down)
            await self._blocking(self.stack.up)
            detail = f"kafka-{node} (leader of {led}) SIGKILL, restarted after {down:.1f}s"
        elif kind == "broker-pause":
            node, led = await self._busiest_leader()
            hold = self._hold(6.0, 4.0, 15.0)
            pid = int(self.stack.status()["nodes"][f"kafka-{node}"]["pid"])
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(hold)
            finally:
                os.kill(pid, signal.SIGCONT)
            detail = f"kafka-{node} (leader of {led}) SIGSTOP for {hold:.1f}s, then SIGCONT"
        elif kind == "kafka-net-latency":
            delay = self._hold(0.1, 0.02, 0.3)
            hold = self._hold(6.0, 4.0, 15.0)
            self.proxy.set_latency(delay)
            await asyncio.sleep(hold)
            self.proxy.set_latency(0.0)
            detail = (
                f"workers <-> kafka-{ROUTED_NODE}: {delay * 1000:.0f} ms per chunk for {hold:.1f}s"
            )
        elif kind == "kafka-net-reset":
            share = self._hold(0.3, 0.1, 0.5)
            hold = self._hold(6.0, 4.0, 15.0)
            before = self.proxy.resets
            self.proxy.set_reset(share)
            await asyncio.sleep(hold)
            self.proxy.set_reset(0.0)
            detail = (
                f"workers <-> kafka-{ROUTED_NODE}: {share:.0%} per second for {hold:.1f}s: "
                f"{self.proxy.resets - before} resets"
            )
        elif kind == "kafka-net-partition":
            hold = self._hold(6.0, 3.0, 20.0)
            self.proxy.set_partition(True)
            await asyncio.sleep(hold)
            self.proxy.set_partition(False)
            detail = f"workers <-/-> kafka-{ROUTED_NODE} for {hold:.1f}s"
        elif kind == "postgres-failover":
            before = self.stack.status()["primary"]
            took = time.monotonic()
            await self._blocking(lambda: self.stack.run("failover"))
            took = time.monotonic() - took
            after = self.stack.status()["primary"]
            detail = (
                f"{before} (primary) SIGKILL, {after} promoted, {before} rebuilt as the "
                f"standby (pg_basebackup), {took:.1f}s"
            )
        elif kind == "overlap":
            first, second = (
                OVERLAPS[self.overlaps % len(OVERLAPS)]
                if self.cfg.short
                else self.rng.choice(OVERLAPS)
            )
            self.overlaps += 1
            lag = self._hold(1.0, 0.5, 4.0)

            async def later() -> str:
                await asyncio.sleep(lag)
                return await self._act(second)

            one, two = await asyncio.gather(self._act(first), later())
            detail = f"{first} [{one}] and, {lag:.1f}s later, {second} [{two}]"
        else:
            raise AssertionError(kind)
        return detail

    def _take_zombie(self) -> tuple[int, float, float] | None:
        """The zombie the last fault made (worker, fenced and assignments before), once."""
        zombie, self._zombie = self._zombie, None
        return zombie

    async def _busiest_leader(self) -> tuple[int, str]:
        """The broker leading the most partitions of the request topic (ties: drawn), and
        what it leads; a drawn broker if the metadata cannot be read."""
        admin = kafka.admin_client(kafka.KafkaAccess(self.stack.bootstrap))
        try:
            await asyncio.wait_for(admin.start(), kafka.CALL_TIMEOUT)
            try:
                topics = await asyncio.wait_for(
                    admin.describe_topics([self.load.request_topic]), kafka.CALL_TIMEOUT
                )
            finally:
                await admin.close()
            leaders = Counter(p["leader"] for p in topics[0]["partitions"] if p["leader"] > 0)
        except (KafkaError, OSError, TimeoutError, LookupError):
            leaders = Counter()
        if not leaders:
            return self.rng.randint(1, 3), "unknown partitions"
        most = max(leaders.values())
        node = self.rng.choice(sorted(n for n, c in leaders.items() if c == most))
        return int(node), f"{most} request partition{'s' if most > 1 else ''}"

    async def inject(self, kind: str) -> FaultRecord:
        self.current = kind
        started = self.now()
        detail = await self._act(kind)
        zombie_seen = self._take_zombie()
        healed = self.now()
        record = FaultRecord(kind, started, healed, detail=detail)
        self.records.append(record)
        self.load.watch(self.load.t0 + healed)
        at = await self.load.wait_recovered(self.cfg.recovery_limit)
        record.recovered = None if at is None else at - self.load.t0
        if zombie_seen is not None:  # what the woken zombie met: fencing, a rebalance
            zombie, fenced, assignments = zombie_seen
            fenced_after = self.workers.metric(zombie, "processor_fenced_total")
            assignments_after = self.workers.metric(zombie, "processor_assignments_total")
            if fenced_after is not None and assignments_after is not None:
                record.detail += (
                    f"; the zombie then counted {fenced_after - fenced:.0f} fenced batch(es) "
                    f"and {assignments_after - assignments:.0f} new assignment(s)"
                )
        rec = (
            f"recovered in {record.recovery:.1f}s"
            if record.recovery is not None
            else (f"NOT recovered within {self.cfg.recovery_limit:.0f}s")
        )
        say(f"fault {len(self.records)} {kind}: {record.detail}; {rec}")
        self.current = "-"
        return record

    async def run(self, until: float) -> None:
        if self.cfg.short:
            for kind in CLUSTER_SHORT_ORDER if self.cfg.cluster else SHORT_ORDER:
                await self.inject(kind)
                await asyncio.sleep(2.0)
            return
        while True:
            order = list(self.cfg.kinds)
            self.rng.shuffle(order)
            for kind in order:
                if time.monotonic() >= until:
                    return
                await self.inject(kind)
                await asyncio.sleep(self.rng.uniform(3.0, 10.0))


# --- the quiet period and the check ---------------------------------------------------------


async def _ends(bootstrap: str, topic: str, partitions: int, isolation: str) -> dict[int, int]:
    consumer = kafka.make_consumer(kafka.KafkaAccess(bootstrap), None, isolation_level=isolation)
    await asyncio.wait_for(consumer.start(), kafka.CALL_TIMEOUT)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        found = await asyncio.wait_for(consumer.end_offsets(tps), kafka.CALL_TIMEOUT)
        return {tp.partition: int(offset) for tp, offset in found.items()}
    finally:
        await asyncio.wait_for(consumer.stop(), kafka.CALL_TIMEOUT)


async def quiet(settings: Settings, partitions: int, limit: float) -> tuple[bool, str]:
    """Wait until the group consumed every request and no transaction is open."""
    assert settings.kafka_bootstrap_servers is not None
    bootstrap = settings.kafka_bootstrap_servers
    deadline = time.monotonic() + limit
    why = ""
    while time.monotonic() < deadline:
        try:
            admin = kafka.admin_client(kafka.KafkaAccess(bootstrap))
            await asyncio.wait_for(admin.start(), kafka.CALL_TIMEOUT)
            try:
                tps = [TopicPartition(settings.request_topic, p) for p in range(partitions)]
                found = await asyncio.wait_for(
                    admin.list_consumer_group_offsets(settings.group_id, partitions=tps),
                    kafka.CALL_TIMEOUT,
                )
            finally:
                await admin.close()
            committed = {tp.partition: meta.offset for tp, meta in found.items()}
            request_end = await _ends(
                bootstrap, settings.request_topic, partitions, "read_uncommitted"
            )
            lag = {p: request_end[p] - committed.get(p, 0) for p in request_end}
            open_txn = {}
            for topic in (settings.reply_topic, settings.dlq_topic):
                stable = await _ends(bootstrap, topic, partitions, "read_committed")
                high = await _ends(bootstrap, topic, partitions, "read_uncommitted")
                open_txn.update(
                    {f"{topic}[{p}]": high[p] - stable[p] for p in high if high[p] != stable[p]}
                )
            if not any(lag.values()) and not open_txn:
                return True, "group at the end of the request topic, no open transaction"
            why = f"lag {sum(lag.values())}, open transactions on {sorted(open_txn) or 'none'}"
        except (KafkaError, TimeoutError, OSError) as exc:
            why = f"cannot read offsets: {exc!r}"
        await asyncio.sleep(1.0)
    return False, why


async def read_topic(
    bootstrap: str, topic: str, partitions: int, handle: Callable[[bytes | None], None]
) -> int:
    """Every committed record of the topic, from offset 0 to its last stable offset."""
    ends = await _ends(bootstrap, topic, partitions, "read_committed")
    consumer = kafka.make_consumer(kafka.KafkaAccess(bootstrap), None)
    await asyncio.wait_for(consumer.start(), kafka.CALL_TIMEOUT)
    count = 0
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions) if ends.get(p, 0) > 0]
        if not tps:
            return 0
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, 0)
        todo = set(tps)
        deadline = time.monotonic() + 300
        while todo and time.monotonic() < deadline:
            batch = await consumer.getmany(*todo, timeout_ms=500, max_records=5000)
            for tp, records in batch.items():
                for record in records:
                    if record.offset < ends[tp.partition]:
                        handle(record.value)
                        count += 1
            for tp in list(todo):
                if await consumer.position(tp) >= ends[tp.partition]:
                    todo.discard(tp)
        if todo:
            raise ProcessorError(f"could not read {topic} to its end: {sorted(todo)}")
    finally:
        await asyncio.wait_for(consumer.stop(), kafka.CALL_TIMEOUT)
    return count


async def observe(settings: Settings, partitions: int, history: ClientHistory) -> Observed:
    assert settings.database_url is not None
    assert settings.kafka_bootstrap_servers is not None
    seen = Observed()
    conn = await asyncpg.connect(settings.database_url, timeout=30)
    try:
        rows = await conn.fetch(
            "SELECT id, n FROM demo.counter WHERE id = ANY($1::int[])",
            [*history.initial, *history.delete_ids],
        )
    finally:
        await conn.close()
    present = {int(r["id"]): int(r["n"]) for r in rows}
    seen.counters = {i: present.get(i) for i in history.initial}
    seen.delete_left = {i for i in history.delete_ids if i in present}
    await read_topic(
        settings.kafka_bootstrap_servers, settings.reply_topic, partitions, seen.add_reply
    )
    await read_topic(
        settings.kafka_bootstrap_servers,
        settings.dlq_topic,
        partitions,
        lambda v: seen.add_dead_letter(v, settings.request_topic),
    )
    return seen


# --- the run ---------------------------------------------------------------------------------


async def prepare_rows(database_url: str, cfg: Config, history: ClientHistory) -> None:
    counters = list(range(1, cfg.rows + 1))
    deletes = list(range(cfg.rows + 1, cfg.rows + 1 + cfg.delete_rows))
    conn = await asyncpg.connect(database_url, timeout=30)
    try:
        await conn.execute(
            "INSERT INTO demo.counter (id, n) SELECT g, 0 FROM unnest($1::int[]) AS g "
            "ON CONFLICT (id) DO UPDATE SET n = 0",
            counters + deletes,
        )
    finally:
        await conn.close()
    history.initial = dict.fromkeys(counters, 0)
    history.delete_ids = deletes


async def stale_versions(database_url: str, rows: Sequence[int]) -> dict[int, str]:
    """Each row's version now, then a plain SQL write to each: those versions are stale.

    Done before any request, so the write outside the processor starts each record's
    version chain instead of breaking it.
    """
    conn = await asyncpg.connect(database_url, timeout=30)
    try:
        found = await conn.fetch(
            "SELECT id, xmin::text AS v FROM demo.counter WHERE id = ANY($1::int[])", list(rows)
        )
        await conn.execute("UPDATE demo.counter SET n = n WHERE id = ANY($1::int[])", list(rows))
    finally:
        await conn.close()
    return {int(r["id"]): str(r["v"]) for r in found}


async def wait_ready(client: Client, limit: float) -> None:
    deadline = time.monotonic() + limit
    while True:
        try:
            await client.retrieve("counter", 1, timeout=5)
            return
        except ReplyTimeout:
            if time.monotonic() > deadline:
                raise SetupError(f"no worker answered within {limit:.0f}s") from None


async def progress(
    cfg: Config, load: Load, chaos: Chaos, workers: Workers, stop: asyncio.Event
) -> None:
    last_replies, last_at = 0, time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 5.0)
        now = time.monotonic()
        rate = (load.replies - last_replies) / max(now - last_at, 1e-9)
        last_replies, last_at = load.replies, now
        kinds = Counter(r.kind for r in chaos.records)
        say(
            f"t={now - load.t0:5.0f}s replies {load.replies} ({rate:.0f}/s) sends {load.sends} "
            f"resends {load.resends} conflicts {load.conflicts} hostile "
            f"{len(load.history.hostile)} in-flight {load.client.pending} workers "
            f"{len(workers.live())} faults {sum(kinds.values())} now: {chaos.current}"
        )


async def run(
    cfg: Config, stack: PrivateStack, netem: str | None, broker_proxy: Proxy | None = None
) -> dict[str, Any]:
    logdir = cfg.workdir / "logs"
    settings = Settings(
        kafka_bootstrap_servers=stack.bootstrap,
        database_url=stack.database_url(),
        entities=DEFAULT_REGISTRY,
        partitions=cfg.partitions,
        max_message_bytes=MAX_MESSAGE_BYTES,
    )
    say("creating the demo schema, the ledger and the topics")
    await install_demo(settings)
    await topics_visible(
        settings.kafka_access(),
        [settings.request_topic, settings.reply_topic, settings.dlq_topic],
    )
    history = ClientHistory()
    await prepare_rows(stack.database_url(), cfg, history)
    stale = await stale_versions(stack.database_url(), list(history.initial))

    if broker_proxy is not None:  # the cluster: the proxy is in front of one broker
        proxy = broker_proxy
        worker_bootstrap = str(stack.status()["routed_bootstrap"])
        worker_database = stack.database_url()
        where = f"kafka-{ROUTED_NODE} through the proxy on port {proxy.port}"
    else:
        proxy = Proxy(stack.pg_port, cfg.seed + 2)
        worker_bootstrap = stack.bootstrap
        worker_database = stack.database_url(proxy.start())
        where = f"database through the proxy on port {proxy.port}"
    worker_env = {k: v for k, v in os.environ.items() if not k.startswith("PROCESSOR_")}
    worker_env.update(
        KAFKA_BOOTSTRAP_SERVERS=worker_bootstrap,
        DATABASE_URL=worker_database,
        PROCESSOR_ENTITIES=str(DEFAULT_REGISTRY),
        PROCESSOR_METRICS_PORT="0",
        PROCESSOR_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES),
        PROCESSOR_LOG_LEVEL="info",
    )
    workers = Workers(worker_env, logdir)
    for _ in range(cfg.workers):
        workers.start()
    say(f"{cfg.workers} workers started ({where})")

    client = Client(
        stack.bootstrap,
        request_topic=settings.request_topic,
        reply_topic=settings.reply_topic,
        timeout=cfg.reply_timeout,
    )
    hostile_producer = kafka.make_producer(
        kafka.KafkaAccess(stack.bootstrap), max_request_size=4 * 1_048_576
    )
    await asyncio.wait_for(hostile_producer.start(), kafka.CALL_TIMEOUT)
    result: dict[str, Any] = {}
    try:
        async with client:
            await wait_ready(client, 120)
            load = Load(cfg, client, hostile_producer, settings.request_topic, stale, history)
            chaos = Chaos(cfg, stack, workers, proxy, load)
            stop = asyncio.Event()
            ticker = asyncio.create_task(progress(cfg, load, chaos, workers, stop))
            say(
                f"load: {cfg.clients} clients on {cfg.rows} rows (skew {cfg.skew:g}); warm-up "
                f"{cfg.warmup:.0f}s, then faults"
            )
            clients = [asyncio.create_task(load.virtual_client()) for _ in range(cfg.clients)]
            await asyncio.sleep(cfg.warmup)
            baseline = load.rate(load.t0 + 1, time.monotonic())
            faults_started = time.monotonic()
            try:
                await chaos.run(faults_started + cfg.duration)
            finally:
                faults_ended = time.monotonic()
                proxy.heal()
                for n in list(workers.paused):
                    workers.resume(n)
                load.running = False
                load.give_up_at = time.monotonic() + cfg.settle_limit
                say(
                    f"faults done ({len(chaos.records)}); the load stops, in-flight requests settle"
                )
                await asyncio.gather(*clients)
                stop.set()
                await ticker
            load_ended = time.monotonic()
            crashed = workers.unexpected_exits()
            say("quiet period: waiting for the group to drain and transactions to end")
            quiet_ok, quiet_why = await quiet(settings, cfg.partitions, cfg.quiet_limit)
            say(f"quiet: {quiet_why}")
            result = {
                "load": load,
                "chaos": chaos,
                "baseline": baseline,
                "fault_phase_s": faults_ended - faults_started,
                "load_s": load_ended - load.t0,
                "quiet_ok": quiet_ok,
                "quiet_why": quiet_why,
                "crashed": crashed,
            }
    finally:
        await asyncio.wait_for(hostile_producer.stop(), kafka.CALL_TIMEOUT)
        codes = await asyncio.to_thread(workers.stop_all)
        say(f"workers stopped: {codes}")

    say("checking: the audit over everything, then the model")
    audit: AuditReport | None = None
    audit_error = None
    try:
        audit = await run_audit(settings, AuditOptions(max_examples=10))
    except ProcessorError as exc:
        audit_error = str(exc)
    observed = await observe(settings, cfg.partitions, history)
    model = model_anomalies(history, observed)
    verdict = judge(audit, model, audit_error=audit_error)
    if not result["quiet_ok"]:
        verdict.examples.setdefault("note", []).append(
            f"the quiet period did not settle: {result['quiet_why']}"
        )
    return summarize(cfg, stack, netem, proxy, result, history, observed, audit, verdict)


def summarize(
    cfg: Config,
    stack: PrivateStack,
    netem: str | None,
    proxy: Proxy,
    result: dict[str, Any],
    history: ClientHistory,
    observed: Observed,
    audit: AuditReport | None,
    verdict: Verdict,
) -> dict[str, Any]:
    load: Load = result["load"]
    chaos: Chaos = result["chaos"]
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in cfg.kinds:
        records = [r for r in chaos.records if r.kind == kind]
        recoveries = [r.recovery for r in records if r.recovery is not None]
        disruptions = [r.disruption for r in records if r.disruption is not None]
        by_kind[kind] = {
            "injected": len(records),
            "not_recovered": sum(1 for r in records if r.recovery is None),
            "max_recovery_s": round(max(recoveries), 1) if recoveries else None,
            "max_disruption_s": round(max(disruptions), 1) if disruptions else None,
        }
    acked = sum(history.acked.values())
    seconds = max(result["load_s"], 1e-9)
    return {
        "ok": verdict.ok,
        "command": "ops/chaos " + " ".join(sys.argv[1:]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seed": cfg.seed,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "machine": {"cpus": os.cpu_count(), "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "stack": {"dir": str(stack.dir), "kafka": stack.bootstrap, "postgres_port": stack.pg_port},
        "network_faults": "tc netem" if netem is None else "userspace TCP proxy",
        "netem": "available" if netem is None else f"unavailable ({netem})",
        "figures": {
            "requests_sent": load.sends,
            "request_ids": len(load.request_ids),
            "resends": load.resends,
            "replies_to_clients": load.replies,
            "operations": sum(load.ops.values()),
            "increments_acked": acked,
            "increments_unknown": sum(history.unknown.values()),
            "version_conflicts_retried": load.conflicts,
            "stale_updates_accepted": len(history.stale_accepted),
            "deletes_ok": len(history.deleted),
            "hostile_records": len(history.hostile),
            "hostile_unknown": load.hostile_unknown,
            "unsettled": len(history.unsettled),
            "client_errors": dict(load.client_errors),
            "audit_counts": audit.counts if audit else None,
            "audit_outcomes": audit.outcomes if audit else None,
            "proxy_connections": proxy.connections,
            "proxy_resets": proxy.resets,
        },
        "ops": dict(sorted(load.ops.items())),
        "throughput": {
            "load_seconds": round(result["load_s"], 1),
            "fault_phase_seconds": round(result["fault_phase_s"], 1),
            "replies_per_s": round(load.replies / seconds, 1),
            "operations_per_s": round(sum(load.ops.values()) / seconds, 1),
            "increments_per_s": round(acked / seconds, 1),
            "baseline_replies_per_s": round(result["baseline"], 1),
        },
        "faults": {
            "injected": len(chaos.records),
            "by_kind": by_kind,
            "log": [
                {
                    "kind": r.kind,
                    "at_s": round(r.started, 1),
                    "healed_s": round(r.healed, 1),
                    "recovery_s": None if r.recovery is None else round(r.recovery, 2),
                    "detail": r.detail,
                }
                for r in chaos.records
            ],
        },
        "incidents": {
            "workers_exited_unexpectedly": {str(k): v for k, v in result["crashed"].items()},
            "worker_remove_exit_codes": chaos.remove_codes,
            "quiet": result["quiet_why"],
            "quiet_settled": result["quiet_ok"],
        },
        "anomalies": verdict.anomalies,
        "examples": verdict.examples,
    }


def _audit_line(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "did not run"
    return (
        f"{counts['request_records']} request records ({counts['rejected']} rejected at "
        f"intake), {counts['replies']} replies, {counts['dead_letters']} dead letters, "
        f"{counts['ledger_rows']} ledger rows, {counts['chain_writes']} writes on "
        f"{counts['chain_records']} version chains"
    )


def render(summary: dict[str, Any]) -> str:
    f, t = summary["figures"], summary["throughput"]
    lines = [
        "",
        f"chaos run, seed {summary['seed']}: "
        + (
            "OK, no anomalies"
            if summary["ok"]
            else f"FAILED, {sum(summary['anomalies'].values())} anomalies"
        ),
        f"  network faults by {summary['network_faults']} (netem {summary['netem']})",
        f"  requests   {f['requests_sent']} sent ({f['request_ids']} request ids, "
        f"{f['resends']} resends), {f['replies_to_clients']} replies to the clients, "
        f"{f['hostile_records']} hostile records",
        f"  operations {f['operations']}: {f['increments_acked']} increments acknowledged "
        f"({f['increments_unknown']} unknown), {f['version_conflicts_retried']} conflicts "
        f"retried, {f['deletes_ok']} deletes, {f['stale_updates_accepted']} stale accepted, "
        f"{f['unsettled']} unsettled",
        f"  audit      {_audit_line(f['audit_counts'])}",
        f"  throughput {t['replies_per_s']} replies/s, {t['operations_per_s']} operations/s, "
        f"{t['increments_per_s']} increments/s over {t['load_seconds']}s "
        f"(baseline before faults {t['baseline_replies_per_s']} replies/s)",
        "",
        f"  {'fault':20} {'injected':>8} {'max recovery':>13} {'max disruption':>15}",
    ]
    for kind, v in summary["faults"]["by_kind"].items():
        rec = "-" if v["max_recovery_s"] is None else f"{v['max_recovery_s']:.1f}s"
        dis = "-" if v["max_disruption_s"] is None else f"{v['max_disruption_s']:.1f}s"
        if v["not_recovered"]:
            rec += f" ({v['not_recovered']} not)"
        lines.append(f"  {kind:20} {v['injected']:>8} {rec:>13} {dis:>15}")
    lines += ["", f"  {'anomaly':28} {'count':>6}"]
    for kind in ALL_ANOMALIES:
        n = summary["anomalies"].get(kind, 0)
        lines.append(f"  {kind:28} {n:>6}" + ("   <-- " if n else ""))
    for kind, examples in summary["examples"].items():
        if kind in ANOMALIES and not summary["anomalies"].get(kind):
            continue
        lines.append(f"  {kind}:")
        lines += [f"    - {e}" for e in examples]
    inc = summary["incidents"]
    if inc["workers_exited_unexpectedly"]:
        lines.append(f"  workers that exited on their own: {inc['workers_exited_unexpectedly']}")
    if any(inc["worker_remove_exit_codes"]):
        lines.append(f"  SIGTERM exit codes: {inc['worker_remove_exit_codes']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    (cfg.workdir / "logs").mkdir(exist_ok=True)
    try:
        stack = PrivateStack(cfg.workdir / "stack", cfg.workdir / "logs" / "stack.log", cfg.cluster)
    except SetupError as exc:
        say(f"error: {exc}")
        return EXIT_SETUP
    broker_proxy: Proxy | None = None
    if cfg.cluster:  # listening before the brokers start: one of them advertises its port
        broker_proxy = Proxy(0, cfg.seed + 2)
        stack.route = broker_proxy.start()
    say(
        f"seed {cfg.seed}; workdir {cfg.workdir}; private {'cluster ' if cfg.cluster else ''}"
        f"stack: kafka {stack.bootstrap}, postgres {redact_url(stack.database_url())}"
    )
    netem = netem_probe()
    say(
        "network faults: "
        + (
            "tc netem is available, but the proxy is used (see docs/chaos.md)"
            if netem is None
            else f"userspace TCP proxy ({netem})"
        )
    )
    t0 = time.monotonic()
    try:
        say("starting the private stack (ops/stack up)")
        stack.up()
        if broker_proxy is not None:
            routed = stack.status()["nodes"][f"kafka-{ROUTED_NODE}"]["routed_port"]
            broker_proxy.upstream_port = int(routed)
        summary = asyncio.run(run(cfg, stack, netem, broker_proxy))
    except SetupError as exc:
        say(f"error: {exc}")
        return EXIT_SETUP
    except (OSError, asyncpg.PostgresError, KafkaError, TimeoutError) as exc:
        say(f"error: the stack failed outside a fault: {exc!r}")
        return EXIT_SETUP
    finally:
        if not cfg.keep_stack:
            with contextlib.suppress(SetupError):
                stack.down()
    summary["wall_seconds"] = round(time.monotonic() - t0, 1)
    print(render(summary))
    if cfg.json_path is not None:
        cfg.json_path.write_text(json.dumps(summary, indent=1) + "\n")
        say(f"result written to {cfg.json_path} ({summary['wall_seconds']:.0f}s in all)")
    return 0 if summary["ok"] else EXIT_ANOMALIES


if __name__ == "__main__":
    raise SystemExit(main())
