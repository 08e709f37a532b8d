"""The `processor` commands as a user meets them when something is wrong: real subprocesses.

- a second worker on a taken metrics port: one line naming PROCESSOR_METRICS_PORT, exit 2;
  PROCESSOR_METRICS_HOST is the address the server listens on;
- Kafka or PostgreSQL that cannot be reached (nothing listening, or a port that accepts and
  closes the connection): one line, ``processor: service unreachable: ...``, exit 4, in
  every command that uses the service; no traceback, no "Unclosed" client;
- ``send`` of a bad request: named as one, with its field, not sent, exit 2;
  ``--no-validate`` sends it, and the workers' fault reply comes back (exit 1);
- more lanes than the database lets the worker connect: refused at start, one line;
- ``demo --setup-only`` creates the demo tables, ledger and topics, and runs nothing else.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from processor.config import Settings
from processor.errors import ConfigError
from tests.conftest import Endpoints
from tests.integration.harness import Scenario
from tests.support import free_port, readme_table

pytestmark = pytest.mark.timeout(300)

RETRIEVE = '{"type": "retrieve", "entity": "acct", "id": 1}'


def processor(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "processor", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _is_json(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def the_one_line(out: subprocess.CompletedProcess[str]) -> str:
    """The command's own line on stderr: the only one that is not a JSON log line."""
    assert "Traceback" not in out.stderr, out.stderr
    assert "Unclosed" not in out.stderr, out.stderr
    plain = [line for line in out.stderr.splitlines() if line.strip() and not _is_json(line)]
    assert len(plain) == 1, out.stderr
    return plain[0]


# --- 2. the metrics port ----------------------------------------------------------------


async def _serves(port: int, host: str = "127.0.0.1") -> bool:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data.startswith(b"HTTP/1.0 200")


async def _wait_serving(scenario: Scenario, port: int, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + 60
    while not await _serves(port, host):
        assert time.monotonic() < deadline, scenario.logs()
        assert all(w.poll() is None for w in scenario.workers), scenario.logs()
        await asyncio.sleep(0.2)


async def test_a_second_worker_on_a_taken_metrics_port_exits_2_with_one_line(
    scenario: Scenario,
) -> None:
    port = free_port()
    first = scenario.start_worker(PROCESSOR_METRICS_PORT=str(port))
    await _wait_serving(scenario, port)

    started = time.monotonic()
    second = await asyncio.to_thread(
        processor, scenario.env(PROCESSOR_METRICS_PORT=str(port)), "run"
    )
    assert second.returncode == 2, second.stderr
    line = the_one_line(second)
    assert line == (
        f"processor: configuration error: PROCESSOR_METRICS_PORT={port}: cannot listen on "
        f"0.0.0.0:{port}: the port is taken (another worker on this host? give each worker "
        "its own PROCESSOR_METRICS_PORT, or 0 for no metrics server)"
    )
    assert time.monotonic() - started < 30  # it failed first, before connecting anything
    assert first.poll() is None  # the first worker is untouched
    assert await _serves(port)


async def test_the_metrics_server_listens_on_the_metrics_host(scenario: Scenario) -> None:
    """Bound to 127.0.0.1 only: 127.0.0.2 (loopback too) keeps the port free for others,
    which a worker on 0.0.0.0 (the default) would not."""
    port = free_port()
    scenario.start_worker(PROCESSOR_METRICS_PORT=str(port), PROCESSOR_METRICS_HOST="127.0.0.1")
    await _wait_serving(scenario, port)
    with socket.socket() as other:
        other.bind(("127.0.0.2", port))  # would raise EADDRINUSE against a 0.0.0.0 listener
    assert not await _serves(port, "127.0.0.2")


# --- 4. a service that cannot be reached -----------------------------------------------------


class ClosingPort:
    """A TCP port that accepts every connection and closes it at once: not a service."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def closing_port() -> Iterator[ClosingPort]:
    port = ClosingPort()
    yield port
    port.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # the kernel completes the handshakes: nobody ever reads
    yield sock.getsockname()[1]
    sock.close()


def _registry_dir(scenario: Scenario) -> Path:
    """A demo registry of the scenario's tables, with a schema.sql next to it (for demo)."""
    demo = scenario.tmp / "demo"
    demo.mkdir(exist_ok=True)
    (demo / "entities.toml").write_text((scenario.tmp / "entities.toml").read_text())
    (demo / "schema.sql").write_text(
        f"CREATE TABLE IF NOT EXISTS {scenario.schema}.demo_extra (id integer PRIMARY KEY);"
    )
    return demo


#: The commands that use Kafka and those that use PostgreSQL, with their arguments.
LOADTEST = ("--duration", "1", "--no-progress")
KAFKA_COMMANDS = {
    "run": (),
    "send": (RETRIEVE,),
    "topics": (),
    "audit": ("--quiet",),
    "audit --entity": ("--quiet", "--entity", "acct", "--id", "1"),
    "demo": ("--setup-only",),
    "loadtest": LOADTEST,
}
PG_COMMANDS = {
    "run": (),
    "migrate": (),
    "audit": ("--quiet",),
    "audit --entity": ("--quiet", "--entity", "acct", "--id", "1"),
    "prune-ledger": (),
    "prune-ledger --dry-run": ("--dry-run",),
    "grants": ("--role", "postgres"),
    "entities": (),
    "demo": ("--setup-only",),
    "loadtest": LOADTEST,
}


@pytest.mark.parametrize("how", ["down", "closes"])
@pytest.mark.parametrize("command", sorted(KAFKA_COMMANDS))
def test_kafka_that_cannot_be_reached_is_one_line_and_exit_4(
    scenario: Scenario, closing_port: ClosingPort, command: str, how: str
) -> None:
    port = free_port() if how == "down" else closing_port.port
    env = scenario.env(
        KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}",
        PROCESSOR_ENTITIES=str(_registry_dir(scenario) / "entities.toml"),
    )
    out = processor(env, command.split()[0], *KAFKA_COMMANDS[command])
    assert out.returncode == 4, (out.returncode, out.stderr)
    line = the_one_line(out)
    assert line.startswith("processor: service unreachable: "), line
    assert f"Kafka at 127.0.0.1:{port}" in line
    if how == "down":
        assert line.endswith(f"Connect call failed ('127.0.0.1', {port})"), line
    else:
        assert closing_port.accepted > 0
        assert "closed the connection before answering" in line, line
        assert "not a Kafka listener, or the broker is shutting down" in line, line
    assert out.stdout == ""


@pytest.mark.parametrize("how", ["down", "closes"])
@pytest.mark.parametrize("command", sorted(PG_COMMANDS))
def test_postgresql_that_cannot_be_reached_is_one_line_and_exit_4(
    scenario: Scenario, closing_port: ClosingPort, command: str, how: str
) -> None:
    port = free_port() if how == "down" else closing_port.port
    url = f"postgresql://postgres:s3cret@127.0.0.1:{port}/processor"
    env = scenario.env(
        DATABASE_URL=url,
        PROCESSOR_METRICS_PORT="0",
        PROCESSOR_ENTITIES=str(_registry_dir(scenario) / "entities.toml"),
    )
    out = processor(env, command.split()[0], *PG_COMMANDS[command])
    assert out.returncode == 4, (out.returncode, out.stderr)
    line = the_one_line(out)
    assert line.startswith(
        f"processor: service unreachable: cannot connect to PostgreSQL at 127.0.0.1:{port} "
        f"(DATABASE_URL=postgresql://postgres:***@127.0.0.1:{port}/processor): "
    ), line
    assert "s3cret" not in out.stderr
    if how == "closes":
        assert closing_port.accepted > 0
    assert out.stdout == ""


def test_kafka_that_never_answers_is_one_line_and_exit_4(
    scenario: Scenario, silent_port: int
) -> None:
    """The client call's bound (kafka.CALL_TIMEOUT) fires first: one line, not a traceback."""
    out = processor(scenario.env(KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{silent_port}"), "topics")
    assert out.returncode == 4, (out.returncode, out.stderr)
    assert the_one_line(out) == (
        f"processor: service unreachable: Kafka at 127.0.0.1:{silent_port} did not answer in "
        "time (KAFKA_SECURITY_PROTOCOL=PLAINTEXT)"
    )


def test_postgresql_that_never_answers_is_one_line_and_exit_4(
    scenario: Scenario, silent_port: int
) -> None:
    url = f"postgresql://postgres@127.0.0.1:{silent_port}/processor"
    out = processor(scenario.env(DATABASE_URL=url), "migrate")
    assert out.returncode == 4, (out.returncode, out.stderr)
    assert the_one_line(out) == (
        f"processor: service unreachable: cannot connect to PostgreSQL at 127.0.0.1:"
        f"{silent_port} (DATABASE_URL={url}): no answer within 30 s"
    )


# --- 5. send and bad input -----------------------------------------------------------------


async def _end_offsets(scenario: Scenario) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=scenario.kafka)
    await consumer.start()
    try:
        tps = [TopicPartition(scenario.request_topic, p) for p in range(scenario.partitions)]
        ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
        return ends
    finally:
        await consumer.stop()


async def test_send_names_a_bad_request_sends_nothing_and_no_validate_gets_the_fault_reply(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    await pg.execute(f"INSERT INTO {scenario.schema}.acct (id) VALUES (1)")
    bad = '{"type": "retrieve", "entity": "acct", "id": 1, "colour": "red"}'
    before = await _end_offsets(scenario)
    refused = await asyncio.to_thread(processor, scenario.env(), "send", bad)
    assert refused.returncode == 2, refused.stderr
    assert the_one_line(refused) == (
        "processor: bad request: unknown field `colour` (not sent; --no-validate sends it as "
        "given, to see the workers' fault reply)"
    )
    empty = await asyncio.to_thread(processor, scenario.env(), "send")  # stdin: /dev/null
    assert empty.returncode == 2, empty.stderr
    assert the_one_line(empty).startswith("processor: bad request: the request is empty")
    assert await _end_offsets(scenario) == before  # nothing was sent

    scenario.start_worker()
    sent = await asyncio.to_thread(
        processor, scenario.env(), "send", "--no-validate", "--timeout", "60", bad
    )
    assert sent.returncode == 1, (sent.stdout, sent.stderr)
    reply = msgspec.json.decode(sent.stdout)
    assert reply["status"] == "fault"
    assert reply["fault"]["name"] == "InvalidArgument"
    assert "colour" in reply["fault"]["message"]
    assert len(reply["request_id"]) == 32  # filled in, so the reply could be matched

    good = await asyncio.to_thread(
        processor, scenario.env(), "send", "--no-validate", "--timeout", "60", RETRIEVE
    )
    assert good.returncode == 0, good.stderr
    assert msgspec.json.decode(good.stdout)["attributes"]["id"] == 1


# --- 7. settings that cannot work, demo --setup-only -----------------------------------------


async def test_more_lanes_than_the_server_allows_are_refused_at_start(
    stack_endpoints: Endpoints, pg: asyncpg.Connection
) -> None:
    from processor.service import check_connection_capacity

    max_connections = int(await pg.fetchval("SHOW max_connections"))
    await check_connection_capacity(pg, Settings(lanes=2))  # fine
    too_many = Settings(lanes=max_connections)  # needs max_connections + 1
    with pytest.raises(ConfigError) as caught:
        await check_connection_capacity(pg, too_many)
    message = str(caught.value)
    assert message.startswith(
        f"PROCESSOR_LANES={max_connections} needs {max_connections + 1} database connections"
    )
    assert "but the server allows at most" in message
    assert f"(max_connections={max_connections} less " in message


async def test_a_role_connection_limit_below_the_pool_stops_run_with_one_line(
    scenario: Scenario,
) -> None:
    role = f"cl_{uuid.uuid4().hex[:12]}"
    owner = await asyncpg.connect(scenario.database_url)
    await owner.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 2")
    try:
        parts = urlsplit(scenario.database_url)
        url = urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port or 5432}"))
        env = scenario.env(DATABASE_URL=url, PROCESSOR_LANES="2")
        out = await asyncio.to_thread(processor, env, "run")
        assert out.returncode == 2, out.stderr
        assert the_one_line(out) == (
            "processor: configuration error: PROCESSOR_LANES=2 needs 3 database connections "
            "(one per lane and one more), but the role's CONNECTION LIMIT allows at most 2: "
            "lower PROCESSOR_LANES to 1 or less"
        )
    finally:
        await owner.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        await owner.execute(f"DROP ROLE {role}")
        await owner.close()


async def test_demo_setup_only_creates_the_tables_ledger_and_topics_and_stops(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    demo = _registry_dir(scenario)
    topic = f"demo-{scenario.run}"
    env = scenario.env(
        PROCESSOR_ENTITIES=str(demo / "entities.toml"),
        PROCESSOR_REQUEST_TOPIC=topic,
    )
    out = await asyncio.to_thread(processor, env, "demo", "--setup-only")
    assert out.returncode == 0, out.stderr
    assert out.stdout == (
        f"demo tables, ledger and topics ready; registry: {demo / 'entities.toml'}\n"
    )
    assert await pg.fetchval(f"SELECT to_regclass('{scenario.schema}.demo_extra')") is not None
    topics = await asyncio.to_thread(processor, env, "topics")
    assert f"{topic}: exists" in topics.stdout.splitlines(), topics.stdout
    assert "worker started" not in out.stderr  # no worker ran


def _printed(command: str) -> list[re.Pattern[str]]:
    """The README command table's stdout cell for ``command``, as line patterns: each
    backquoted text, with ``<placeholder>`` matching anything."""
    rows = {row[0].strip("`"): row[2] for row in readme_table("| command | what it does |")}
    return [
        re.compile(".+".join(re.escape(part) for part in re.split(r"<[^>]+>", text)))
        for text in re.findall(r"`([^`]+)`", rows[command])
    ]


async def test_each_command_prints_what_the_readme_command_table_says(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    env = scenario.env(PROCESSOR_ENTITIES=str(_registry_dir(scenario) / "entities.toml"))
    for command in (
        "processor migrate",
        "processor topics",
        "processor prune-ledger",
        "processor prune-ledger --dry-run",
        "processor demo --setup-only",
    ):
        out = await asyncio.to_thread(processor, env, *command.split()[1:])
        assert out.returncode == 0, (command, out.stderr)
        lines = out.stdout.splitlines()
        assert lines, command
        patterns = _printed(command)
        for line in lines:
            assert any(p.fullmatch(line) for p in patterns), (command, line, patterns)
