"""The runs: a backlog drained, a load at an offered rate, an idle period; their
transactions and phases."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from aiokafka import AIOKafkaProducer

from ops.lib.bench.contenders import (
    Contender,
    Topics,
    check_database,
    costs,
    mark,
    start_contender,
    stop_procs,
)
from ops.lib.bench.costs import Result, peak_rss
from ops.lib.bench.environment import Env, commits, reset_database
from ops.lib.bench.text import fmt
from ops.lib.bench.topics import (
    Collector,
    create_topics,
    delete_topics,
    produce_backlog,
    wait_group,
)
from ops.lib.bench.workload import Plan, Workload, say
from ops.lib.common import free_ports
from processor.tools.stats import percentile


def describe(c: Contender) -> dict[str, Any]:
    return {
        "workers": c.workers,
        "lanes": c.lanes,
        "max_batch": c.max_batch,
        "baseline": c.baseline.rev if c.baseline else None,
    }


def _start_measured(
    env: Env, c: Contender, t: Topics, result: Result, log_level: str | None
) -> tuple[list[int], list[subprocess.Popen[bytes]]]:
    """Start the contender, a metrics port for each processor worker (its transactions and
    phases are read there); the log files it writes go into ``result``."""
    ports = free_ports(c.workers) if c.kind == "processor" else []
    first_log = len(env.logs)
    procs = start_contender(env, c, t, metrics_ports=ports, log_level=log_level)
    result.extra["logs"] = [str(p) for p in env.logs[first_log:]]
    return ports, procs


async def _live_run(
    env: Env, c: Contender, plan: Plan, warmup: int
) -> tuple[Topics, Collector, AIOKafkaProducer]:
    """What a run that sends while the contender answers needs (load, idle): the rows reset,
    fresh topics, a reply collector that skips the ``warmup`` first replies, and a started
    producer of one record at a time (no linger)."""
    await reset_database(env, plan.workload.keys)
    t = Topics.fresh(c.kind)
    await create_topics(env, [t.requests, t.replies, t.dlq])
    collector = Collector(
        env, t.replies, plan, check_outcomes=not c.kind.startswith("kafka"), warmup=warmup
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=env.bootstrap, enable_idempotence=True, linger_ms=0
    )
    await producer.start()
    return t, collector, producer


def _latencies(result: Result, collector: Collector) -> Sequence[float]:
    """The collector's reply latencies (s), their p50, p99 and max put in ``result`` (ms)."""
    lat = collector.latencies
    if lat:
        result.p50_ms = percentile(lat, 50) * 1000
        result.p99_ms = percentile(lat, 99) * 1000
        result.max_ms = max(lat) * 1000
    return lat


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
    ports, procs = _start_measured(env, c, t, result, log_level)
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
    t, collector, producer = await _live_run(env, c, plan, warmup)
    ports, procs = _start_measured(env, c, t, result, log_level)
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
    _latencies(result, collector)
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
    t, collector, producer = await _live_run(env, c, plan, warmup)
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
    lat = _latencies(result, collector)
    if lat:
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
