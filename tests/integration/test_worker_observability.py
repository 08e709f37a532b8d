"""What an operator reads from a worker: its log lines and its /metrics.

The broker restart runs on a private broker (its own `ops/stack` state dir and ports; the
session's stack is not touched), so it runs wherever the session's services come from. The
database is the session's PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import Endpoints
from tests.integration.harness import Scenario, check_exactly_once, json_log_lines, updates
from tests.support import ROOT, free_port, http_get

pytestmark = pytest.mark.timeout(600)

STACK = ROOT / "ops" / "stack"


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in a Prometheus exposition, None when it is absent."""
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        metric, _, rest = series.partition("{")
        if metric != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if found == labels:
            return float(value)
    return None


async def scrape_until(
    port: int, ready: Any, what: str, scenario: Scenario, timeout: float = 60
) -> str:
    """/metrics, once ``ready(text)`` holds (polled until a deadline)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            status, text = await http_get(port, "/metrics")
            if status == 200 and ready(text):
                return text
        except OSError:
            pass  # not listening yet
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what} within {timeout} s:\n{text[-3000:]}\n{scenario.logs()}")


async def test_a_fresh_worker_exports_process_metrics_and_every_series_from_the_start(
    scenario: Scenario,
) -> None:
    """Before any request: the process's memory, CPU and fds; retries at 0 for each cause;
    a lag for each assigned partition; client events at 0; no ``_created`` series."""
    port = free_port()
    scenario.start_worker(PROCESSOR_METRICS_PORT=str(port))
    text = await scrape_until(
        port,
        lambda t: sample(t, "processor_assigned_partitions") == scenario.partitions,
        "the worker owns every partition",
        scenario,
    )
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total"):
        assert (sample(text, name) or 0) > 0, name
    assert (sample(text, "process_open_fds") or 0) > 3  # stdio, sockets, the pool
    assert sample(text, "processor_retries_total", cause="database") == 0
    assert sample(text, "processor_retries_total", cause="kafka") == 0
    for partition in range(scenario.partitions):
        assert sample(text, "processor_consumer_lag", partition=str(partition)) == 0
    assert sample(text, "processor_requests_total", type="update", status="success", code="") == 0
    assert sample(text, "processor_batch_phase_seconds_count", phase="database") == 0
    assert (
        sample(text, "processor_client_events_total", source="aiokafka", event="produce_retry") == 0
    )
    assert "_created" not in text


@dataclass(frozen=True)
class PrivateKafka:
    bootstrap: str
    env: dict[str, str]

    def stack(self, *args: str) -> None:
        done = subprocess.run(
            [STACK, *args], env=self.env, capture_output=True, text=True, timeout=300, check=False
        )
        assert done.returncode == 0, f"ops/stack {' '.join(args)}:\n{done.stderr[-3000:]}"


@pytest.fixture
def private_kafka() -> Iterator[PrivateKafka]:
    """A broker of this test's own (ops/stack with its own state dir and ports)."""
    tmp = Path(tempfile.mkdtemp(prefix="processor-observability-"))
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    kafka, controller, pg = sorted(ports)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KAFKA_", "PROCESSOR_STACK_")) and k != "DATABASE_URL"
    }
    env.update(
        PROCESSOR_STACK_DIR=str(tmp / "stack"),
        PROCESSOR_STACK_KAFKA_PORT=str(kafka),
        PROCESSOR_STACK_CONTROLLER_PORT=str(controller),
        PROCESSOR_STACK_PG_PORT=str(pg),
    )
    private = PrivateKafka(f"127.0.0.1:{kafka}", env)
    try:
        private.stack("up")
        yield private
    finally:
        subprocess.run([STACK, "down", "--immediate"], env=env, capture_output=True, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.faults
async def test_every_line_a_worker_writes_through_a_broker_restart_is_json(
    private_kafka: PrivateKafka,
    stack_endpoints: Endpoints,
    db_schema: str,
    pg: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    """kill -9 of the broker under a working worker, then start it again: the worker's
    output (stdout and stderr) is JSON objects only, aiokafka's retries among them at info
    (not warnings), counted in processor_client_events_total; every request once."""
    s = Scenario(private_kafka.bootstrap, stack_endpoints.database_url, db_schema, tmp_path)
    await s.setup(pg)
    await pg.execute(f"INSERT INTO {db_schema}.acct (id) SELECT generate_series(1, 10)")
    requests = updates(range(1, 11), 10, s.run)
    half = len(requests) // 2
    port = free_port()
    worker = s.start_worker(PROCESSOR_METRICS_PORT=str(port))
    try:
        await s.send(requests[:half])
        await s.replies(expect=half)

        private_kafka.stack("stop", "kafka", "--immediate")
        gone = {"source": "aiokafka", "event": "connection_failed"}
        await scrape_until(
            port,
            lambda t: (sample(t, "processor_client_events_total", **gone) or 0) > 0,
            "aiokafka reports the broker gone",
            s,
        )
        private_kafka.stack("up")
        await s.send(requests[half:])
        await check_exactly_once(pg, db_schema, await s.replies(expect=len(requests)), requests)
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=60)
    assert code == 0, s.logs()

    parsed = json_log_lines(tmp_path / "worker-0.log")
    client = [p for p in parsed if p.get("client_event")]
    assert any(p["client_event"] == "connection_failed" for p in client), s.logs()
    assert all(p["level"] == "info" and p["logger"].startswith("aiokafka") for p in client)
