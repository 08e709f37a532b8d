"""Prometheus metrics and the HTTP endpoints /metrics, /healthz and /readyz."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from processor.kafka import kip447
from processor.log import client_events

__all__ = ["Metrics", "serve_http"]

# A `<name>_created` series beside every counter and histogram (the time it was created)
# doubles the exposition and tells nothing a process_start_time_seconds does not.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: Label values known up front: their series are exported at 0 before anything happened.
REQUEST_TYPES = ("update", "delete", "retrieve")
RETRY_CAUSES = ("database", "kafka")
BATCH_PHASES = ("database", "wait", "kafka")


class _ClientEvents(Collector):
    """processor_client_events_total{source,event}: the log's count of client events."""

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "processor_client_events",
            "Events the client libraries reported (retries, rebalances, other warnings and "
            "errors), by library and event",
            labels=["source", "event"],
        )
        for (source, event), count in sorted(client_events().items()):
            family.add_metric([source, event], count)
        yield family


class _Kip447Collector(Collector):
    """processor.kip447's counters, read when scraped (aiokafka's loops count them)."""

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "processor_unstable_offset_fetches",
            "Committed-offset fetches answered UNSTABLE_OFFSET_COMMIT (a transaction holding "
            "the offset was open) and retried",
            value=kip447.counters["unstable_offset_fetch"],
        )


class Metrics:
    """The worker's metrics, in a registry of their own (tests can build several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The process's memory (RSS), CPU seconds, open file descriptors (from /proc), the
        # Python version and the garbage collector's work.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        r.register(_ClientEvents())
        self.requests = Counter(
            "processor_requests",
            "Requests answered, by type, outcome and fault code",
            ["type", "status", "code"],
            registry=r,
        )
        self.replayed = Counter(
            "processor_replayed_requests", "Requests answered from the ledger", registry=r
        )
        self.dead_letters = Counter(
            "processor_dead_letters", "Records written to the dead-letter topic", registry=r
        )
        self.batch_size = Histogram(
            "processor_batch_size",
            "Records per batch",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
            registry=r,
        )
        self.latency = Histogram(
            "processor_request_latency_seconds",
            "From the request's Kafka timestamp to its reply's commit",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.in_flight = Gauge(
            "processor_in_flight", "Records fetched and not yet committed", registry=r
        )
        self.lag = Gauge(
            "processor_consumer_lag", "High watermark minus position", ["partition"], registry=r
        )
        self.retries = Counter(
            "processor_retries", "Batches retried, by cause", ["cause"], registry=r
        )
        self.phase = Histogram(
            "processor_batch_phase_seconds",
            "Time per batch in each phase: database (every lane's transaction), wait (for "
            "the previous batch's Kafka commit), kafka (this batch's commits)",
            ["phase"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.assigned = Gauge(
            "processor_assigned_partitions", "Partitions this worker owns", registry=r
        )
        self.rebalances = Counter(
            "processor_assignments", "Partition assignments this worker received", registry=r
        )
        self.transactions = Counter(
            "processor_kafka_transactions", "Kafka transactions committed", registry=r
        )
        self.fenced = Counter(
            "processor_fenced",
            "Batches not committed because this worker was fenced: by the group (generation: "
            "it no longer owns the partitions), by another producer of its transactional id "
            "(producer), by the broker aborting a transaction open too long (timeout), or "
            "left before applying because the worker had dropped out of the group (stalled: "
            "paused, starved, or its heartbeat refused)",
            ["reason"],
            registry=r,
        )
        for reason in ("generation", "producer", "timeout", "stalled"):
            self.fenced.labels(reason)
        r.register(_Kip447Collector())
        # Every series of a known label value from the start: a rate() over a series that
        # appears at its first increment misses that increment, and "absent" reads as "0".
        for cause in RETRY_CAUSES:
            self.retries.labels(cause)
        for phase in BATCH_PHASES:
            self.phase.labels(phase)
        for kind in REQUEST_TYPES:
            self.requests.labels(kind, "success", "")

    def partitions_assigned(self, partitions: Iterable[int]) -> None:
        """Export a lag for partitions just assigned: 0 until their first batch commits
        (an idle partition's lag is 0; a backlog shows at the first commit)."""
        for partition in partitions:
            self.lag.labels(str(partition))  # a new series starts at 0; a known one stays

    def partitions_revoked(self, partitions: Iterable[int]) -> None:
        """Drop the lag of partitions another worker owns now (it exports theirs)."""
        for partition in partitions:
            with contextlib.suppress(KeyError):
                self.lag.remove(str(partition))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


async def serve_http(
    host: str, port: int, metrics: Metrics, ready: Callable[[], bool]
) -> asyncio.Server:
    """A minimal HTTP/1.0 server for scrapers and probes (no framework needed for three URLs)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            parts = line.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else ""
            if path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, metrics.exposition()
            elif path == "/healthz":
                status, ctype, body = "200 OK", "text/plain", b"ok\n"
            elif path == "/readyz":
                ok = ready()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "text/plain", b"ready\n" if ok else b"not ready\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            head = (
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
