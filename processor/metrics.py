"""Prometheus metrics and the HTTP endpoints /metrics, /healthz and /readyz."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from processor import kip447

__all__ = ["Metrics", "serve_http"]


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
            "it no longer owns the partitions) or by another producer of its transactional id",
            ["reason"],
            registry=r,
        )
        for reason in ("generation", "producer"):
            self.fenced.labels(reason)
        r.register(_Kip447Collector())

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
