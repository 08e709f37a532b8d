"""The contenders: the processor (this tree's or a baseline's) and
ops/bench_contenders.py, started and stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from ops.lib.bench.costs import CpuMark, Result, box_busy, proc_cpu, tree_cpu
from ops.lib.bench.environment import Env
from ops.lib.bench.workload import CONTENDERS, LEDGER_SCHEMA, Plan


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
