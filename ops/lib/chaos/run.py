"""One chaos run: the stack, the workers, the load and the faults together, then the check."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from typing import Any

from ops.lib.chaos.check import observe, prepare_rows, quiet, stale_versions
from ops.lib.chaos.config import MAX_MESSAGE_BYTES, ROUTED_NODE, Config, SetupError, say
from ops.lib.chaos.faults import Chaos, Faults
from ops.lib.chaos.load import Load
from ops.lib.chaos.private_stack import PrivateStack, topics_visible
from ops.lib.chaos.proxy import Proxy
from ops.lib.chaos.report import summarize
from ops.lib.chaos.workers import Workers
from processor.audit import AuditOptions, AuditReport, run_audit
from processor.client import Client
from processor.config import Settings
from processor.errors import (
    ProcessorError,
)
from processor.kafka import clients as kafka
from processor.tools.chaos_check import (
    ClientHistory,
    judge,
    model_anomalies,
)
from processor.tools.demo import DEFAULT_REGISTRY, install_demo
from processor.tools.workers import wait_ready as workers_ready


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
    """The run on a started stack: its data, the workers, the load under faults, then the
    check; the summary."""
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
    proxy, workers = start_workers(cfg, stack, broker_proxy)
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
    try:
        async with client:
            try:
                await workers_ready(client, "counter", 1, 120)
            except ProcessorError as exc:
                raise SetupError(str(exc)) from None
            load = Load(cfg, client, hostile_producer, settings.request_topic, stale, history)
            chaos = Chaos(Faults(cfg, stack, workers, proxy, settings.request_topic), load)
            result = await under_faults(cfg, load, chaos)
            say("quiet period: waiting for the group to drain and transactions to end")
            result["quiet_ok"], result["quiet_why"] = await quiet(
                settings, cfg.partitions, cfg.quiet_limit
            )
            say(f"quiet: {result['quiet_why']}")
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


def start_workers(
    cfg: Config, stack: PrivateStack, broker_proxy: Proxy | None
) -> tuple[Proxy, Workers]:
    """The proxy the network faults go through (in front of PostgreSQL, or of one broker
    in the cluster form) and the workers behind it, started."""
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
    workers = Workers(worker_env, cfg.workdir / "logs")
    for _ in range(cfg.workers):
        workers.start()
    say(f"{cfg.workers} workers started ({where})")
    return proxy, workers


async def under_faults(cfg: Config, load: Load, chaos: Chaos) -> dict[str, Any]:
    """The load through its warm-up and the faults, then stopped and its requests settled;
    what the summary needs of it."""
    workers, proxy = chaos.workers, chaos.faults.proxy
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
        say(f"faults done ({len(chaos.records)}); the load stops, in-flight requests settle")
        await asyncio.gather(*clients)
        stop.set()
        await ticker
    load_ended = time.monotonic()
    return {
        "load": load,
        "chaos": chaos,
        "baseline": baseline,
        "fault_phase_s": faults_ended - faults_started,
        "load_s": load_ended - load.t0,
        "crashed": workers.unexpected_exits(),
    }
