"""``processor loadtest``: read-modify-write load through the workers, then the invariants.

Virtual clients share one :class:`~processor.client.Client` and run a mix of operations
on the rows of a counter entity (``counter`` = ``demo.counter(id int, n bigint)``):

- **increment**: ``read_modify_write(n = n + 1)`` on a row drawn with a Zipf-like skew
  (``--skew``: weight of the i-th hottest row ~ 1/(i+1)^s; 0 = uniform, ``max`` = one row);
  version mismatches are retried with jittered backoff and counted as conflicts;
- **stale**: an update IfRowVersionMatches with a version known to be stale (read at setup,
  then every row was bumped), writing a poison value: must fault ConcurrencyVersionMismatch;
- **delete**: of a row of a separate range seeded for deletes (counters stay checkable),
  each row deleted once; if the range runs out, deletes of gone rows (ObjectDoesNotExist).

Closed loop (``--clients`` virtual clients, each starts its next operation when the last
ended) or open loop (``--rate`` operations per second on a fixed schedule, latency measured
from the scheduled start so a slow system is not hidden; at most ``--max-in-flight``).

The test writes the database directly only to reset its rows at the start, to read them at
the end and, after the checks, to delete them (unless ``keep_rows``). Then it checks, and
exits 1 loudly if any breaks:

- every counter equals the number of increments that got a success reply;
- no stale update was accepted; the delete range lost exactly the rows deleted with success;
- replies == requests: every request_id sent got its reply (a timeout is settled by
  resending the same request, which the ledger answers);
- the reply topic, read ``read_committed`` over the run, holds a reply for every request_id
  and no more copies of it than times it was sent (a resend gets the stored reply again),
  all copies byte-identical;
- the audit (``processor.audit``), when that module exists: see :func:`run_audit_hook`.

It needs a running worker group, or ``--with-worker N`` to start N ``processor run``
processes for the run (their logs: ``--worker-logs DIR``, else a temporary directory that
is named at the start and removed after a clean run). Results: a summary on stdout, and
only when asked, ``--json`` and a ``--plot`` PNG (needs matplotlib: the ``plot`` extra;
without it the plot is skipped with a message). The summary and the audit line count
requests alike: every request record the run sent (resends included), setup excluded.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import asyncpg
from aiokafka import TopicPartition

from processor import kafka
from processor.client import Client
from processor.config import Settings
from processor.contract import Reply, Request, UpdateRequest, decode_reply
from processor.errors import (
    ConcurrencyVersionMismatch,
    ConfigError,
    Fault,
    ObjectDoesNotExist,
    ProcessorError,
    ReplyTimeout,
    UnexpectedError,
)
from processor.registry import Entity, load_registry, quote
from processor.tools.stats import percentile, zipf_weights
from processor.tools.text import counted as _n
from processor.tools.workers import settings_env, wait_ready

__all__ = [
    "Invariant",
    "LoadOptions",
    "Observations",
    "add_arguments",
    "check_invariants",
    "dump",
    "figure",
    "percentile",
    "run_audit_hook",
    "run_from_args",
    "run_loadtest",
    "summary",
    "write_plot",
    "zipf_weights",
]

#: What a stale update writes: any acceptance shows in the counter check too.
POISON: Final = -(10**12)
#: At most this many (time, latency) samples go to the result (and the plot's scatter).
MAX_SAMPLES: Final = 5000


@dataclass(frozen=True, slots=True)
class LoadOptions:
    duration: float = 30.0
    mode: str = "closed"  # closed | open
    clients: int = 32
    rate: float = 200.0
    max_in_flight: int = 2000
    rows: int = 100
    skew: float = 0.0  # math.inf: one row
    delete_share: float = 0.05
    stale_share: float = 0.05
    delete_rows: int = 5000
    first_id: int = 1
    entity: str = "counter"
    attempts: int = 20
    backoff: float = 0.01
    timeout: float = 30.0
    ready_timeout: float = 120.0
    with_worker: int = 0
    seed: int | None = None
    #: Where the result JSON and the plot go: nowhere unless asked.
    json_path: Path | None = None
    plot_path: Path | None = None
    progress: bool = True
    #: ``--with-worker``'s logs: this directory (kept), else a temporary one, removed after
    #: a clean run and kept (and named) when a worker or an invariant failed.
    worker_logs: Path | None = None
    #: Leave the seeded rows in the table after the run (else they are deleted at the end).
    keep_rows: bool = False

    def validate(self) -> None:
        problems = [
            (self.duration <= 0, "--duration must be > 0"),
            (self.mode not in ("closed", "open"), "--mode must be closed or open"),
            (self.clients < 1, "--clients must be >= 1"),
            (self.rate <= 0, "--rate must be > 0"),
            (self.max_in_flight < 1, "--max-in-flight must be >= 1"),
            (self.rows < 1, "--rows must be >= 1"),
            (not self.skew >= 0, "--skew must be >= 0 or max"),
            (not 0 <= self.delete_share <= 1, "--delete-share must be in [0, 1]"),
            (not 0 <= self.stale_share <= 1, "--stale-share must be in [0, 1]"),
            (self.delete_share + self.stale_share > 1, "delete + stale shares exceed 1"),
            (self.delete_rows < 0, "--delete-rows must be >= 0"),
            (self.delete_share > 0 and self.delete_rows == 0, "deletes need --delete-rows > 0"),
            (self.attempts < 1, "--attempts must be >= 1"),
            (self.timeout <= 0, "--timeout must be > 0"),
            (self.with_worker < 0, "--with-worker must be >= 0"),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigError(message)


def _latency_ms(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "p50": round(percentile(ordered, 50) * 1000, 2),
        "p90": round(percentile(ordered, 90) * 1000, 2),
        "p99": round(percentile(ordered, 99) * 1000, 2),
        "max": round(ordered[-1] * 1000, 2),
        "mean": round(sum(ordered) / len(ordered) * 1000, 2),
    }


@dataclass
class Observations:
    """Everything the run saw, from the client side and the reply topic."""

    increments: Counter[int] = field(default_factory=Counter)  # success replies per row
    deleted: set[int] = field(default_factory=set)  # delete rows deleted with success
    stale_accepted: int = 0
    unsettled: int = 0  # timeouts whose resends got no reply either
    sent: Counter[str] = field(default_factory=Counter)  # sends per request_id
    replied: set[str] = field(default_factory=set)  # request_ids with a reply at the client
    topic: dict[str, list[bytes]] = field(default_factory=dict)  # replies on the topic
    topic_read: bool = False


@dataclass(frozen=True, slots=True)
class Invariant:
    name: str
    ok: bool
    detail: str


def check_invariants(
    seen: Observations,
    counters: dict[int, int],
    delete_ids: Sequence[int],
    delete_left: set[int],
) -> list[Invariant]:
    """The run's invariants, from what the client saw and the rows as they are now."""
    out: list[Invariant] = []
    wrong = {i: (n, seen.increments.get(i, 0)) for i, n in counters.items()}
    wrong = {i: v for i, v in wrong.items() if v[0] != v[1]}
    out.append(
        Invariant(
            "counters == successful increments",
            not wrong,
            f"{_n(len(counters), 'row')}, {_n(sum(seen.increments.values()), 'increment')}"
            if not wrong
            else f"{_n(len(wrong), 'row')} {'differs' if len(wrong) == 1 else 'differ'} "
            "(id: db, increments): "
            f"{sorted(wrong.items())[:10]}",
        )
    )
    out.append(
        Invariant(
            "no stale update accepted",
            seen.stale_accepted == 0,
            f"{seen.stale_accepted:,} accepted",
        )
    )
    expected_left = set(delete_ids) - seen.deleted
    out.append(
        Invariant(
            "deleted rows == successful deletes",
            delete_left == expected_left,
            f"{len(seen.deleted):,} deleted, {len(delete_left):,} left"
            if delete_left == expected_left
            else f"still there but deleted: {sorted(delete_left - expected_left)[:10]}, "
            f"gone but never deleted: {sorted(expected_left - delete_left)[:10]}",
        )
    )
    missing = [r for r in seen.sent if r not in seen.replied]
    out.append(
        Invariant(
            "replies == requests",
            not missing and seen.unsettled == 0,
            f"{_n(len(seen.sent), 'request_id')}, {len(seen.replied):,} answered"
            + (f"; without reply: {missing[:5]}" if missing else "")
            + (f"; {_n(seen.unsettled, 'unsettled timeout')}" if seen.unsettled else ""),
        )
    )
    if seen.topic_read:
        absent = [r for r in seen.sent if r not in seen.topic]
        dupes = {r: len(v) for r, v in seen.topic.items() if len(v) > seen.sent.get(r, 0)}
        differ = [
            r
            for r, v in seen.topic.items()
            if len(set(v)) > 1 and not _unexpected(v)  # UnExpected is not ledgered
        ]
        copies = sum(len(v) for v in seen.topic.values())
        out.append(
            Invariant(
                "reply topic: one reply per send, none missing, copies identical",
                not absent and not dupes and not differ,
                f"{copies:,} replies for {_n(len(seen.topic), 'request_id')}"
                + (f"; missing: {absent[:5]}" if absent else "")
                + (f"; more replies than sends: {list(dupes.items())[:5]}" if dupes else "")
                + (f"; copies differ: {differ[:5]}" if differ else ""),
            )
        )
    return out


def _unexpected(values: list[bytes]) -> bool:
    for value in values:
        fault = decode_reply(value).fault
        if fault is not None and fault.code == UnexpectedError.code:
            return True
    return False


class _Run:
    """One load run: the operation mix, its bookkeeping and the progress line."""

    def __init__(self, client: Client, entity: Entity, opts: LoadOptions, stale: dict[int, str]):
        self.client = client
        self.entity = entity
        self.opts = opts
        self.stale = stale
        self.rng = random.Random(opts.seed)
        self.counter_ids = list(range(opts.first_id, opts.first_id + opts.rows))
        start = opts.first_id + opts.rows
        self.delete_ids = list(range(start, start + opts.delete_rows))
        self.cum_weights = list(_accumulate(zipf_weights(opts.rows, opts.skew)))
        self.next_delete = 0
        self.seen = Observations()
        self.outcomes: Counter[str] = Counter()
        self.conflicts = 0
        self.conflict_times: list[float] = []
        self.started_at = datetime.now(UTC)
        self.loadavg = [round(x, 2) for x in os.getloadavg()]
        self.ops: list[tuple[float, float, str, str]] = []  # (end s, latency s, kind, outcome)
        self.requests: list[tuple[float, float]] = []  # (end s, latency s)
        self.recording = False
        self.t0 = time.monotonic()
        self.errors_logged = 0

    def observe(self, request: Request, reply: Reply | None, elapsed: float) -> None:
        if not self.recording:
            return
        rid = request.request_id
        self.seen.sent[rid] += 1
        if reply is not None:
            self.seen.replied.add(rid)
            self.requests.append((time.monotonic() - self.t0, elapsed))

    def _row(self) -> int:
        total = self.cum_weights[-1]
        index = bisect.bisect_right(self.cum_weights, self.rng.random() * total)
        return self.counter_ids[min(index, len(self.counter_ids) - 1)]

    async def op(self, scheduled: float) -> None:
        draw = self.rng.random()
        if draw < self.opts.delete_share:
            kind, work = "delete", self._delete()
        elif draw < self.opts.delete_share + self.opts.stale_share:
            kind, work = "stale", self._stale(self._row())
        else:
            kind, work = "increment", self._increment(self._row())
        try:
            outcome = await work
        except Fault as exc:
            outcome = f"fault.{exc.name}"
        except ProcessorError as exc:
            outcome = f"error.{type(exc).__name__}"
            self._log_error(exc)
        end = time.monotonic()
        self.ops.append((end - self.t0, end - scheduled, kind, outcome))
        self.outcomes[f"{kind}.{outcome}"] += 1

    def _log_error(self, exc: BaseException) -> None:
        self.errors_logged += 1
        if self.errors_logged <= 5:
            print(f"\nloadtest: {exc!r}", file=sys.stderr)

    def _conflict(self, _exc: ConcurrencyVersionMismatch) -> None:
        self.conflicts += 1
        self.conflict_times.append(time.monotonic() - self.t0)

    async def _settle(self, request: Request) -> Reply | None:
        """Resend a timed-out request as is (same request_id): the ledger answers it."""
        for _ in range(3):
            with contextlib.suppress(ReplyTimeout):
                return await self.client.send(request, timeout=max(30.0, self.opts.timeout))
        self.seen.unsettled += 1
        return None

    async def _increment(self, row: int) -> str:
        try:
            await self.client.read_modify_write(
                self.entity.name,
                row,
                _plus_one,
                attempts=self.opts.attempts,
                backoff=self.opts.backoff,
                on_conflict=self._conflict,
            )
        except ConcurrencyVersionMismatch:
            return "gave_up"
        except ReplyTimeout as exc:
            reply = await self._settle(exc.request)  # a retrieve too: every request answered
            if reply is None:
                return "unsettled"
            if not isinstance(exc.request, UpdateRequest) or reply.status != "success":
                return "timeout"  # nothing written (a retrieve, or the update faulted)
            self.seen.increments[row] += 1
            return "ok_after_timeout"
        self.seen.increments[row] += 1
        return "ok"

    async def _stale(self, row: int) -> str:
        try:
            await self.client.update(
                self.entity.name,
                row,
                {"n": POISON},
                row_version=self.stale[row],
                behavior="IfRowVersionMatches",
            )
        except ConcurrencyVersionMismatch:
            return "rejected"
        except ReplyTimeout as exc:
            reply = await self._settle(exc.request)
            if reply is None:
                return "unsettled"
            if reply.fault is not None and reply.fault.code == ConcurrencyVersionMismatch.code:
                return "rejected"
        self.seen.stale_accepted += 1
        return "ACCEPTED"

    async def _delete(self) -> str:
        if self.next_delete < len(self.delete_ids):
            row = self.delete_ids[self.next_delete]
            self.next_delete += 1
        else:  # the range ran out: a row deleted before, expected to be gone
            row = self.rng.choice(self.delete_ids)
        try:
            await self.client.delete(self.entity.name, row, behavior="AlwaysOverwrite")
        except ObjectDoesNotExist:
            return "missing"
        except ReplyTimeout as exc:
            reply = await self._settle(exc.request)
            if reply is None:
                return "unsettled"
            if reply.status != "success":
                return "missing"
        self.seen.deleted.add(row)
        return "ok"

    async def closed_loop(self, deadline: float) -> None:
        async def virtual_client() -> None:
            while time.monotonic() < deadline:
                await self.op(time.monotonic())

        await asyncio.gather(*(virtual_client() for _ in range(self.opts.clients)))

    async def open_loop(self, deadline: float) -> None:
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        i = 0
        while (at := start + i / self.opts.rate) < deadline:
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(tasks) >= self.opts.max_in_flight:
                self.outcomes["dropped"] += 1  # never started: the system is saturated
            else:
                task = asyncio.create_task(self.op(at))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.gather(*tasks)

    async def progress(self, started: float, stop: asyncio.Event) -> None:
        tty = sys.stderr.isatty()
        width = 30
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5 if tty else 5.0)
            elapsed = time.monotonic() - started
            done = min(1.0, elapsed / self.opts.duration)
            recent = [lat for end, lat, _, _ in self.ops[-2000:] if end > elapsed - 5]
            p50 = percentile(recent, 50) * 1000 if recent else math.nan
            bar = "#" * int(done * width) + "." * (width - int(done * width))
            line = (
                f"[{bar}] {elapsed:5.1f}/{self.opts.duration:g}s ops {len(self.ops)} "
                f"({len(self.ops) / max(elapsed, 1e-9):.0f}/s) p50 {p50:.1f}ms "
                f"conflicts {self.conflicts} in-flight {self.client.pending}"
            )
            print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr)
        if tty:
            print(file=sys.stderr)


def _accumulate(weights: Sequence[float]) -> list[float]:
    out, total = [], 0.0
    for w in weights:
        total += w
        out.append(total)
    return out


def _plus_one(attributes: dict[str, Any]) -> dict[str, Any]:
    return {"n": int(attributes["n"]) + 1}


# --- setup --------------------------------------------------------------------------------


async def _prepare(settings: Settings, opts: LoadOptions) -> tuple[Settings, Entity]:
    """Tables, ledger and topics (idempotent); the validated counter entity."""
    from processor.demo import DEFAULT_REGISTRY, install_demo
    from processor.ledger import Ledger

    settings.require("database_url", "kafka_bootstrap_servers")
    assert settings.database_url is not None
    assert settings.kafka_bootstrap_servers is not None
    registry_path = settings.entities or DEFAULT_REGISTRY
    if (registry_path.parent / "schema.sql").is_file():  # the demo's: its tables, ledger, topics
        await install_demo(settings)
        settings = _replace(settings, entities=registry_path)
    else:
        assert settings.kafka_bootstrap_servers is not None
        await kafka.ensure_topics(
            settings.kafka_access(),
            [settings.request_topic, settings.reply_topic, settings.dlq_topic],
            partitions=settings.partitions,
        )
    conn = await asyncpg.connect(settings.database_url, timeout=30)
    try:
        await Ledger(settings.ledger_schema).migrate(conn)
        registry = await load_registry(conn, registry_path)
    finally:
        await conn.close()
    entity = registry.get(opts.entity)
    if entity is None:
        raise ConfigError(f"entity {opts.entity!r} is not in {registry_path}")
    column = entity.attributes.get("n")
    if entity.key_kind != "int" or column is None or column.category != "N":
        raise ConfigError(
            f"entity {opts.entity!r} must have an integer key and a numeric attribute `n`"
        )
    if not entity.optimistic_concurrency:
        raise ConfigError(f"entity {opts.entity!r} needs optimistic_concurrency = true")
    return settings, entity


def _replace(settings: Settings, **changes: Any) -> Settings:
    values = {name: getattr(settings, name) for name in settings.__dataclass_fields__}
    return Settings(**{**values, **changes})


async def _reset_rows(conn: asyncpg.Connection, entity: Entity, opts: LoadOptions) -> None:
    table, key = entity.qualified, quote(entity.key.name)
    last = opts.first_id + opts.rows + opts.delete_rows - 1
    async with conn.transaction():
        await conn.execute(
            f"DELETE FROM {table} WHERE {key} BETWEEN $1 AND $2",  # noqa: S608
            opts.first_id,
            last,
        )
        await conn.execute(
            f"INSERT INTO {table} ({key}, n) SELECT g, 0 FROM generate_series($1::int, $2) g",  # noqa: S608
            opts.first_id,
            last,
        )


class _Workers:
    """``--with-worker N``: N ``processor run`` subprocesses for the run's duration."""

    def __init__(self, settings: Settings, count: int, logdir: Path | None = None) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        #: A temporary directory is ours to remove; one the user named is not.
        self.temporary = logdir is None
        if logdir is None:
            self.logdir = Path(tempfile.mkdtemp(prefix="processor-loadtest-"))
        else:
            logdir.mkdir(parents=True, exist_ok=True)
            self.logdir = logdir
        print(f"loadtest: {_n(count, 'worker')}, logs in {self.logdir}", file=sys.stderr)
        env = settings_env(settings)
        for i in range(count):
            with open(self.logdir / f"worker-{i}.log", "wb") as log:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "processor", "run"],
                        # N workers on one host: each its own transactional id
                        env={**env, "PROCESSOR_WORKER_ID": f"loadtest-{i}"},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )

    def check(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                raise ProcessorError(
                    f"worker {i} exited with {proc.returncode}; log: {self.logdir}/worker-{i}.log"
                )

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs:
            try:
                await asyncio.to_thread(proc.wait, max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)

    def clean_exit(self) -> bool:
        return all(proc.returncode == 0 for proc in self.procs)

    def settle_logs(self, ok: bool) -> dict[str, Any]:
        """Remove a temporary log directory after a clean run; say where the logs are."""
        if self.temporary and ok and self.clean_exit():
            shutil.rmtree(self.logdir, ignore_errors=True)
            print(f"loadtest: worker logs removed ({self.logdir}): a clean run", file=sys.stderr)
            return {"dir": str(self.logdir), "kept": False}
        why = "" if ok and self.clean_exit() else " (a worker or an invariant failed)"
        print(f"loadtest: worker logs kept in {self.logdir}{why}", file=sys.stderr)
        return {"dir": str(self.logdir), "kept": True}


async def _stale_versions(client: Client, entity: Entity, rows: Sequence[int]) -> dict[int, str]:
    gate = asyncio.Semaphore(64)

    async def one(row: int) -> tuple[int, str]:
        async with gate:
            reply = await client.retrieve(entity.name, row, timeout=max(30.0, client.timeout))
            assert reply.row_version is not None
            return row, reply.row_version

    return dict(await asyncio.gather(*(one(r) for r in rows)))


# --- the reply topic ----------------------------------------------------------------------


async def _read_replies(
    settings: Settings, start: dict[TopicPartition, int], wanted: set[str]
) -> dict[str, list[bytes]]:
    """The run's replies on the reply topic (read_committed), by request_id."""
    assert settings.kafka_bootstrap_servers is not None
    found: dict[str, list[bytes]] = {}

    def keep(record: Any) -> None:
        rid = _header(record.headers)
        if rid is None and record.value is not None:
            rid = decode_reply(record.value).request_id
        if rid in wanted and record.value is not None:
            found.setdefault(rid, []).append(record.value)

    firsts: dict[str, dict[int, int]] = {}
    for tp, offset in start.items():
        firsts.setdefault(tp.topic, {})[tp.partition] = offset
    consumer = kafka.make_consumer(settings.kafka_access(), None)
    await asyncio.wait_for(consumer.start(), kafka.CALL_TIMEOUT)
    try:
        for topic, first in firsts.items():
            end = await kafka.offsets(consumer, topic, first, end=True)
            spans = {p: (first[p], end[p]) for p in first}
            await kafka.read_spans(consumer, topic, spans, keep, stall_seconds=120)
    finally:
        await consumer.stop()
    return found


def _header(headers: Sequence[tuple[str, bytes]]) -> str | None:
    for key, value in headers:
        if key == "request_id":
            return value.decode(errors="replace")
    return None


# --- the audit hook -----------------------------------------------------------------------


async def run_audit_hook(
    settings: Settings, since: datetime | None = None, until: datetime | None = None
) -> Invariant | None:
    """Run ``processor.audit`` over the run's requests, if that module exists (else None).

    Calls ``run_audit(settings, AuditOptions(since=..., until=...))`` and reads the
    report's ``ok``, ``anomalies`` and ``counts``; an exception is a broken invariant.
    Scoped to the run's time window: the rows of an earlier run were reset by plain SQL,
    which an unscoped audit would rightly see as writes outside the processor.
    """
    if importlib.util.find_spec("processor.audit") is None:
        return None
    module = importlib.import_module("processor.audit")
    entry = getattr(module, "run_audit", None)
    if not callable(entry):
        return Invariant("audit", False, "processor.audit has no run_audit entry point")
    options = getattr(module, "AuditOptions", None)
    try:
        report = entry(settings, options(since=since, until=until) if options else None)
        if inspect.isawaitable(report):
            report = await report
    except Exception as exc:
        return Invariant("audit", False, f"run_audit raised {exc!r}")
    ok = bool(getattr(report, "ok", False))
    counts = getattr(report, "counts", {}) or {}
    found = {k: v for k, v in (getattr(report, "anomalies", {}) or {}).items() if v}
    requests, replies = counts.get("request_records"), counts.get("replies")
    return Invariant(
        "audit (processor.audit over the run's window)",
        ok,
        f"{_count(requests)} requests, {_count(replies)} replies on the reply topic, "
        + ("no anomalies" if ok else f"anomalies: {found or report!r}"),
    )


def _ms(value: Any) -> str:
    return f"{value:,.1f}" if isinstance(value, int | float) else "-"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


# --- the run ------------------------------------------------------------------------------


BeforeCheck = Callable[[asyncpg.Connection, Entity], Awaitable[None]]


async def run_loadtest(
    settings: Settings, opts: LoadOptions, *, before_check: BeforeCheck | None = None
) -> dict[str, Any]:
    """Set up, run, check; returns the result (``result["invariants"]["ok"]``).

    ``before_check`` runs on a database connection just before the final read (tests use
    it to break an invariant on purpose).
    """
    opts.validate()
    settings, entity = await _prepare(settings, opts)
    assert settings.database_url is not None
    assert settings.kafka_bootstrap_servers is not None
    conn = await asyncpg.connect(settings.database_url, timeout=30)
    try:
        await _reset_rows(conn, entity, opts)
    finally:
        await conn.close()
    workers = _Workers(settings, opts.with_worker, opts.worker_logs) if opts.with_worker else None
    result: dict[str, Any] | None = None
    try:
        result = await _run(settings, opts, entity, workers, before_check)
        return result
    finally:
        if workers is not None:
            await workers.stop()
            logs = workers.settle_logs(result is not None and result["invariants"]["ok"])
            if result is not None:
                result["worker_logs"] = logs


async def _run(
    settings: Settings,
    opts: LoadOptions,
    entity: Entity,
    workers: _Workers | None,
    before_check: BeforeCheck | None,
) -> dict[str, Any]:
    assert settings.database_url is not None
    assert settings.kafka_bootstrap_servers is not None
    client = Client(
        settings.kafka_access(),
        request_topic=settings.request_topic,
        reply_topic=settings.reply_topic,
        timeout=opts.timeout,
    )
    run: _Run | None = None
    async with client:
        await wait_ready(
            client, entity.name, opts.first_id, opts.ready_timeout, hint=" (or use --with-worker N)"
        )
        counter_ids = range(opts.first_id, opts.first_id + opts.rows)
        stale = await _stale_versions(client, entity, counter_ids)
        conn = await asyncpg.connect(settings.database_url, timeout=30)
        try:  # now every version read above is stale
            await conn.execute(
                f"UPDATE {entity.qualified} SET n = 0 "  # noqa: S608
                f"WHERE {quote(entity.key.name)} = ANY($1::int[])",
                list(counter_ids),
            )
        finally:
            await conn.close()
        run = _Run(client, entity, opts, stale)
        client.observer = run.observe
        if workers is not None:
            workers.check()
        print(
            f"loadtest: {opts.mode} loop, {opts.duration:g} s, "
            + (f"{opts.clients} clients" if opts.mode == "closed" else f"{opts.rate:g} ops/s")
            + f", {opts.rows} rows (skew {opts.skew:g}), deletes {opts.delete_share:.0%}, "
            f"stale {opts.stale_share:.0%}, entity {entity.name} ({entity.qualified})",
            file=sys.stderr,
        )
        # The audit's window starts here, after the setup's requests (readiness and stale
        # reads), so it counts the requests the summary counts. Kafka timestamps are ms.
        now = datetime.now(UTC)
        since = now.replace(microsecond=now.microsecond // 1000 * 1000)
        run.recording = True
        run.started_at = datetime.now(UTC)
        run.t0 = started = time.monotonic()
        stop = asyncio.Event()
        bar = asyncio.create_task(run.progress(started, stop)) if opts.progress else None
        deadline = started + opts.duration
        try:
            if opts.mode == "closed":
                await run.closed_loop(deadline)
            else:
                await run.open_loop(deadline)
        finally:
            stop.set()
            if bar is not None:
                await bar
        elapsed = time.monotonic() - started
        run.recording = False
        start = dict(client.start_positions)
    assert run is not None
    conn = await asyncpg.connect(settings.database_url, timeout=30)
    try:
        if before_check is not None:
            await before_check(conn, entity)
        key = quote(entity.key.name)
        rows = await conn.fetch(
            f"SELECT {key} AS k, n FROM {entity.qualified} WHERE {key} = ANY($1::int[])",  # noqa: S608
            run.counter_ids + run.delete_ids,
        )
    finally:
        await conn.close()
    present = {int(r["k"]): int(r["n"]) for r in rows}
    counters = {i: present.get(i, -1) for i in run.counter_ids}
    delete_left = {i for i in run.delete_ids if i in present}
    try:
        run.seen.topic = await _read_replies(settings, start, set(run.seen.sent))
        run.seen.topic_read = True
    except ProcessorError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
    invariants = check_invariants(run.seen, counters, run.delete_ids, delete_left)
    if not run.seen.topic_read:
        invariants.append(Invariant("reply topic read", False, "could not read it"))
    audit = await run_audit_hook(settings, since, datetime.now(UTC))
    invariants.append(
        audit or Invariant("audit", True, "skipped: processor.audit is not there (hook ready)")
    )
    result = _result(run, opts, entity, elapsed, invariants)
    first, last = opts.first_id, opts.first_id + opts.rows + opts.delete_rows - 1
    result["rows"] = {"table": entity.qualified, "first": first, "last": last, "kept": True}
    if not opts.keep_rows:
        conn = await asyncpg.connect(settings.database_url, timeout=30)
        try:
            await conn.execute(
                f"DELETE FROM {entity.qualified} "  # noqa: S608
                f"WHERE {quote(entity.key.name)} BETWEEN $1 AND $2",
                first,
                last,
            )
        finally:
            await conn.close()
        result["rows"]["kept"] = False
    return result


def _result(
    run: _Run, opts: LoadOptions, entity: Entity, elapsed: float, invariants: list[Invariant]
) -> dict[str, Any]:
    by_kind: dict[str, list[float]] = {}
    seconds = max(1, math.ceil(elapsed))
    per_second: list[list[float]] = [[] for _ in range(seconds)]
    requests_per_second = [0] * seconds
    conflicts_per_second = [0] * seconds
    for end, lat, kind, outcome in run.ops:
        if outcome in ("ok", "rejected"):
            by_kind.setdefault(kind, []).append(lat)
        per_second[min(int(end), seconds - 1)].append(lat)
    for end, _ in run.requests:
        requests_per_second[min(int(end), seconds - 1)] += 1
    for end in run.conflict_times:
        conflicts_per_second[min(int(end), seconds - 1)] += 1
    timeline = []
    for s, lats in enumerate(per_second):
        # The last bucket is as long as what is left of the run; buckets from the load's
        # end on are the drain (operations in flight finishing, no new ones started).
        span = max(1e-3, min(1.0, elapsed - s))
        timeline.append(
            {
                "t": s,
                "span_s": round(span, 3),
                "drain": s >= opts.duration,
                "ops": len(lats),
                "requests": requests_per_second[s],
                "conflicts": conflicts_per_second[s],
                "ops_per_s": round(len(lats) / span, 1),
                "requests_per_s": round(requests_per_second[s] / span, 1),
                "conflicts_per_s": round(conflicts_per_second[s] / span, 1),
                "p50_ms": round(percentile(lats, 50) * 1000, 2) if lats else None,
                "p99_ms": round(percentile(lats, 99) * 1000, 2) if lats else None,
            }
        )
    increments = sum(run.seen.increments.values())
    requests = sum(run.seen.sent.values())
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    if math.isinf(opts.skew):
        options["skew"] = "max"
    stride = max(1, math.ceil(len(run.ops) / MAX_SAMPLES))
    return {
        "started_at": run.started_at.isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "loadavg_at_start": run.loadavg},
        "options": options,
        "entity": {"name": entity.name, "table": entity.qualified},
        "elapsed_s": round(elapsed, 3),
        "ops": len(run.ops),
        "requests": requests,
        "request_ids": len(run.seen.sent),
        "replies": len(run.requests),  # replies the client received, one per answered send
        "request_ids_answered": len(run.seen.replied),
        "increments": increments,
        "conflicts": run.conflicts,
        "throughput": {
            "ops_per_s": round(len(run.ops) / elapsed, 1),
            "requests_per_s": round(requests / elapsed, 1),
            "increments_per_s": round(increments / elapsed, 1),
        },
        "latency_ms": {
            "op": _latency_ms([lat for _, lat, _, _ in run.ops]),
            "request": _latency_ms([lat for _, lat in run.requests]),
            **{kind: _latency_ms(v) for kind, v in sorted(by_kind.items())},
        },
        "outcomes": dict(sorted(run.outcomes.items())),
        "invariants": {
            "ok": all(i.ok for i in invariants),
            "checks": [asdict(i) for i in invariants],
        },
        "timeline": timeline,
        # (end s, latency ms) of operations, every `stride`-th: the plot's scatter
        "samples": [[round(e, 3), round(lat * 1000, 2)] for e, lat, _, _ in run.ops[::stride]],
    }


# --- output -------------------------------------------------------------------------------


def summary(result: dict[str, Any]) -> str:
    """The human summary. Counts with thousands separators, rates and milliseconds with one
    decimal, everywhere."""
    t, lat = result["throughput"], result["latency_ms"]
    resent = result["requests"] - result["request_ids"]
    lines = [
        f"elapsed {result['elapsed_s']:,.1f} s: {_n(result['ops'], 'operation')}, "
        f"{_n(result['requests'], 'request')} ({result['request_ids']:,} request_ids, "
        f"{resent:,} resent), {result['replies']:,} replies received",
        f"throughput: {t['ops_per_s']:,.1f} operations/s, {t['requests_per_s']:,.1f} "
        f"requests/s, {t['increments_per_s']:,.1f} increments/s",
        f"latency (ms)  {'p50':>9} {'p90':>9} {'p99':>9} {'max':>9}  (nearest-rank percentiles)",
    ]
    for name in ("op", "request", "increment", "delete", "stale"):
        if lat.get(name):
            v = lat[name]
            label = "operation" if name == "op" else name
            lines.append(
                f"  {label:11} " + " ".join(f"{v[q]:>9,.1f}" for q in ("p50", "p90", "p99", "max"))
            )
    lines.append(f"conflicts (version mismatches retried): {result['conflicts']:,}")
    lines.append("outcomes: " + ", ".join(f"{k} {v:,}" for k, v in result["outcomes"].items()))
    rows = result.get("rows")
    if rows is not None:
        span = f"rows {rows['first']:,}-{rows['last']:,} of {rows['table']}"
        lines.append(
            f"{span}: kept (--keep-rows)"
            if rows["kept"]
            else f"{span}: deleted after the checks (--keep-rows keeps them)"
        )
    lines.append("invariants:")
    for check in result["invariants"]["checks"]:
        mark = "ok    " if check["ok"] else "BROKEN"
        lines.append(f"  {mark} {check['name']}: {check['detail']}")
    return "\n".join(lines)


def dump(result: dict[str, Any]) -> str:
    """The result as JSON: indented, but the samples and the timeline one entry a line."""
    head = {k: v for k, v in result.items() if k not in ("timeline", "samples")}
    text = json.dumps(head, indent=1)[:-2]
    for name in ("timeline", "samples"):
        rows = ",\n  ".join(json.dumps(row, separators=(",", ":")) for row in result[name])
        text += f',\n "{name}": [\n  {rows}\n ]'
    return text + "\n}\n"


def write_plot(result: dict[str, Any], path: Path) -> str:
    """Latency and throughput over time as a PNG; says what it did (or why not)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (
            "plot skipped: matplotlib is not installed "
            "(pip install 'processor[plot]', or the dev group)"
        )
    fig = figure(result)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot written to {path}"


def figure(result: dict[str, Any]) -> Any:
    """The plot's matplotlib figure (needs matplotlib): latency above, throughput below."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    samples = result["samples"]
    timeline = result["timeline"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    if samples:
        top.scatter(
            [s[0] for s in samples], [s[1] for s in samples], s=2, alpha=0.15, label="operation"
        )
    xs = [p["t"] + 0.5 for p in timeline]
    top.plot(xs, [p["p50_ms"] for p in timeline], color="black", label="p50 per second")
    top.plot(xs, [p["p99_ms"] for p in timeline], color="red", label="p99 per second")
    top.set_yscale("log")
    # Plain numbers of milliseconds (1, 10, 100, 1000), not powers of ten.
    top.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    top.set_ylabel("latency (ms)")
    top.legend(loc="upper right")
    top.grid(True, which="both", alpha=0.3)
    o = result["options"]
    op = result["latency_ms"].get("op", {})
    load = f"{o['clients']} clients" if o["mode"] == "closed" else f"{o['rate']} ops/s"
    top.set_title(
        f"processor loadtest: {o['mode']} loop, {load}, {o['rows']} rows, skew {o['skew']}"
        f" - operation p50 {_ms(op.get('p50'))} ms, p99 {_ms(op.get('p99'))} ms",
        fontsize=10,
    )
    # Throughput as rates over each bucket's length, during the load only: the drain after
    # it starts nothing new, and a short last bucket is not a fall in throughput.
    # (A result written before these fields existed: derived from the run's length.)
    end = result["elapsed_s"]
    loaded = [p for p in timeline if not p.get("drain", p["t"] >= o["duration"])]
    spans = [p.get("span_s", max(1e-3, min(1.0, end - p["t"]))) for p in loaded]
    lx = [p["t"] + span / 2 for p, span in zip(loaded, spans, strict=True)]
    for key, count, label in (
        ("ops_per_s", "ops", "operations/s"),
        ("requests_per_s", "requests", "requests/s"),
        ("conflicts_per_s", "conflicts", "version conflicts/s"),
    ):
        rates = [p.get(key, p[count] / span) for p, span in zip(loaded, spans, strict=True)]
        bottom.plot(lx, rates, label=label)
    for axis in (top, bottom):
        axis.axvline(o["duration"], color="grey", linestyle=":", linewidth=1)
        if end > o["duration"]:
            axis.axvspan(o["duration"], end, color="grey", alpha=0.12, linewidth=0)
    bottom.text(
        o["duration"],
        0.98,
        " drain",
        transform=bottom.get_xaxis_transform(),
        va="top",
        fontsize=8,
        color="grey",
    )
    bottom.set_xlabel("time (s)")
    bottom.set_ylabel("per second")
    bottom.legend(loc="lower left")
    bottom.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


# --- the command --------------------------------------------------------------------------


def _skew(value: str) -> float:
    if value.lower() in ("max", "inf"):
        return math.inf
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError("must be >= 0 or max")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = LoadOptions()
    a = parser.add_argument
    a("--duration", type=float, default=d.duration, help="seconds of load [%(default)s]")
    a("--mode", choices=("closed", "open"), default=d.mode, help="loop kind [%(default)s]")
    a("--clients", type=int, default=d.clients, help="virtual clients (closed) [%(default)s]")
    a("--rate", type=float, default=d.rate, help="operations/s (open loop) [%(default)s]")
    a("--max-in-flight", type=int, default=d.max_in_flight, help="open loop cap [%(default)s]")
    a("--rows", type=int, default=d.rows, help="counter rows [%(default)s]")
    a("--skew", type=_skew, default=d.skew, help="Zipf exponent; 0 uniform, max one row [0]")
    a("--delete-share", type=float, default=d.delete_share, help="deletes [%(default)s]")
    a("--stale-share", type=float, default=d.stale_share, help="stale updates [%(default)s]")
    a(
        "--delete-rows",
        type=int,
        default=d.delete_rows,
        help="rows seeded for deletes [%(default)s]",
    )
    a("--first-id", type=int, default=d.first_id, help="first row id used [%(default)s]")
    a("--entity", default=d.entity, help="counter entity of the registry [%(default)s]")
    a("--attempts", type=int, default=d.attempts, help="read-modify-write tries [%(default)s]")
    a("--backoff", type=float, default=d.backoff, help="base backoff, s [%(default)s]")
    a("--timeout", type=float, default=d.timeout, help="per-request reply timeout [%(default)s]")
    a("--ready-timeout", type=float, default=d.ready_timeout, help="wait for workers [%(default)s]")
    a("--with-worker", type=int, default=0, metavar="N", help="start N `processor run` for the run")
    a("--seed", type=int, default=None, help="random seed")
    a(
        "--json",
        type=Path,
        metavar="PATH",
        help="write the result as JSON to this file (a directory: loadtest.json in it) [none]",
    )
    a(
        "--plot",
        type=Path,
        metavar="PATH",
        help="draw latency and throughput to this PNG (a directory: loadtest.png in it) [none]",
    )
    a("--no-plot", action="store_true", help="do not draw the plot, even with --plot")
    a("--no-progress", action="store_true", help="no progress line on stderr")
    a(
        "--worker-logs",
        type=Path,
        metavar="DIR",
        help="--with-worker: write the workers' logs here and keep them [a temporary "
        "directory, removed after a clean run]",
    )
    a(
        "--keep-rows",
        action="store_true",
        help="leave the seeded rows in the table (default: deleted after the checks)",
    )


def _output(path: Path | None, flag: str, name: str) -> Path | None:
    """Where an output goes, checked now (not after the run): a directory gets ``name``."""
    if path is None:
        return None
    target = (path / name if path.is_dir() else path).resolve()
    if not target.parent.is_dir():
        raise ConfigError(f"{flag} {path}: the directory {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise ConfigError(f"{flag} {path}: the directory {target.parent} is not writable")
    return target


async def run_from_args(settings: Settings, args: argparse.Namespace) -> int:
    opts = LoadOptions(
        duration=args.duration,
        mode=args.mode,
        clients=args.clients,
        rate=args.rate,
        max_in_flight=args.max_in_flight,
        rows=args.rows,
        skew=args.skew,
        delete_share=args.delete_share,
        stale_share=args.stale_share,
        delete_rows=args.delete_rows,
        first_id=args.first_id,
        entity=args.entity,
        attempts=args.attempts,
        backoff=args.backoff,
        timeout=args.timeout,
        ready_timeout=args.ready_timeout,
        with_worker=args.with_worker,
        seed=args.seed,
        json_path=_output(args.json, "--json", "loadtest.json"),
        plot_path=None if args.no_plot else _output(args.plot, "--plot", "loadtest.png"),
        progress=not args.no_progress,
        worker_logs=args.worker_logs,
        keep_rows=args.keep_rows,
    )
    result = await run_loadtest(settings, opts)
    print(summary(result))
    if opts.json_path is not None:
        opts.json_path.write_text(dump(result))
        print(f"result written to {opts.json_path}")
    if opts.plot_path is not None:
        print(write_plot(result, opts.plot_path))
    if not result["invariants"]["ok"]:
        broken = [c["name"] for c in result["invariants"]["checks"] if not c["ok"]]
        print(f"\nLOADTEST FAILED: invariant(s) broken: {'; '.join(broken)}", file=sys.stderr)
        return 1
    return 0
