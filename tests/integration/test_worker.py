"""The worker end to end: real `processor run` processes, the real broker and database."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from tests.integration.harness import DEAD, Raw, Scenario, check_exactly_once, updates
from tests.support import http_get, until

pytestmark = pytest.mark.timeout(600)


async def test_every_outcome_kind_arrives_on_the_reply_topic(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    """Each success and each fault code comes back once, with the contract's fields."""
    schema = scenario.schema
    await pg.execute(f"INSERT INTO {schema}.acct (id) VALUES (1), (2), (3)")
    await pg.execute(f"INSERT INTO {schema}.item (sku) VALUES ('w')")
    await pg.execute(f"INSERT INTO {schema}.note (id, body) VALUES (1, 'x')")
    xmin = await pg.fetchval(f"SELECT xmin::text FROM {schema}.acct WHERE id = 1")
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    r = scenario.run

    def req(name: str, **fields: Any) -> dict[str, Any]:
        return {"request_id": f"{r}-{name}", **fields}

    requests: list[dict[str, Any] | Raw] = [
        req("retrieve", type="retrieve", entity="acct", id=1),
        req(
            "match",
            type="update",
            entity="acct",
            id=1,
            concurrency_behavior=1,
            row_version=xmin,
            attributes={"balance": 5},
        ),
        req(
            "mismatch",
            type="update",
            entity="acct",
            id=1,
            concurrency_behavior=1,
            row_version=xmin,
            attributes={"balance": 6},
        ),
        req(
            "noversion",
            type="delete",
            entity="acct",
            id=2,
            concurrency_behavior="IfRowVersionMatches",
        ),
        req(
            "notenabled",
            type="update",
            entity="note",
            id=1,
            concurrency_behavior="IfRowVersionMatches",
            row_version="1",
            attributes={"body": "y"},
        ),
        req("missing", type="update", entity="acct", id=404, attributes={"balance": 1}),
        req("delete", type="delete", entity="acct", id=3),
        req("badtype", type="update", entity="acct", id=2, attributes={"balance": "lots"}),
        req("noentity", type="delete", entity="nope", id=1),
        req("noattr", type="update", entity="acct", id=2, attributes={"owner": 1}),
        req("expired", type="delete", entity="acct", id=2, expires_at=past),
        req("dup", type="update", entity="acct", id=2, attributes={"balance": 7}),
        req("dup", type="update", entity="acct", id=2, attributes={"balance": 8}),
        Raw(
            b'{"type":"update","request_id":"'
            + f"{r}-malformed".encode()
            + b'","entity":"acct","id":1.5,"attributes":{}}'
        ),
        Raw(b"x" * 200_000, headers=[("request_id", f"{r}-huge".encode())]),
    ]
    scenario.start_worker(PROCESSOR_MAX_MESSAGE_BYTES="100000")
    await scenario.send(requests)
    replies = await scenario.replies(expect=len(requests))
    by_id: dict[str, list[Any]] = {}
    for reply in replies:
        by_id.setdefault(reply.request_id, []).append(reply)
    assert all(len(v) == 1 for k, v in by_id.items() if k != f"{r}-dup"), scenario.logs()

    def one(name: str) -> Any:
        return by_id[f"{r}-{name}"][0]

    assert one("retrieve").status == "success"
    assert one("retrieve").row_version == xmin
    assert one("retrieve").attributes == {"id": 1, "seq": -1, "last_request": None, "balance": 0}
    match = one("match")
    assert match.status == "success"
    assert match.row_version != xmin
    assert match.behavior_applied == "IfRowVersionMatches"
    mismatch = one("mismatch").fault
    assert mismatch.code == -2147088254
    assert (mismatch.expected_version, mismatch.current_version) == (xmin, match.row_version)
    assert one("noversion").fault.code == -2147088253
    assert one("notenabled").fault.code == -2147088243
    assert one("missing").fault.code == -2147220969
    assert one("delete").status == "success"
    assert one("delete").row_version is None
    assert one("badtype").fault.code == -2147220989
    assert one("badtype").fault.path == "attributes.balance"
    assert one("noentity").fault.code == -2147217150
    assert one("noattr").fault.code == -2147217149
    assert one("expired").fault.code == -2130771967
    dup = sorted(by_id[f"{r}-dup"], key=lambda x: x.status != "success")
    assert [d.status for d in dup] == ["success", "fault"]
    assert dup[1].fault.code == -2147220937
    assert one("malformed").fault.code == -2147220989
    assert one("malformed").fault.path == "id"
    assert one("huge").fault.code == -2130771966
    assert await pg.fetchval(f"SELECT balance FROM {schema}.acct WHERE id = 2") == 7
    assert await pg.fetchval(f"SELECT count(*) FROM {schema}.acct WHERE id = 3") == 0

    dead = [DEAD.decode(rec.value) for rec in await scenario.read_all(scenario.dlq_topic, expect=7)]
    dead_codes = sorted(d.fault_code or 0 for d in dead)
    assert dead_codes == sorted(
        [-2147220989, -2147217150, -2147217149, -2130771967, -2147220937, -2147220989, -2130771966]
    )
    huge = next(d for d in dead if d.fault_code == -2130771966)
    assert huge.value_length == 200_000
    assert huge.value_prefix is not None
    assert len(huge.value_prefix) <= 4096 * 4 // 3 + 4
    assert huge.source_topic == scenario.request_topic


async def test_per_key_order_holds_under_load_with_many_keys(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    """2,000 interleaved updates over 100 keys: each applied once, in offset order per key."""
    await pg.execute(f"INSERT INTO {scenario.schema}.acct (id) SELECT generate_series(1, 100)")
    requests = updates(range(1, 101), 20, scenario.run)
    scenario.start_worker(PROCESSOR_LANES="3")
    await scenario.send(requests)
    replies = await scenario.replies(expect=len(requests))
    await check_exactly_once(pg, scenario.schema, replies, requests)


async def test_poison_messages_are_dead_lettered_and_the_stream_continues(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    """Every kind of poison lands in the DLQ; the good requests around them all apply."""
    await pg.execute(f"INSERT INTO {scenario.schema}.acct (id) SELECT generate_series(1, 10)")
    good = updates(range(1, 11), 5, scenario.run)
    poison = [
        Raw(b"not json"),
        Raw(b"[1, 2, 3]"),
        Raw(None),  # a tombstone
        Raw(b'{"type":"update"}'),
        Raw(b'{"type":"merge","request_id":"p1","entity":"acct","id":1}'),
        Raw(b"\xff\xfe\x00garbage"),
        Raw(b'{"type":"delete","request_id":"p2","entity":"acct\\";drop table x;--","id":1}'),
        Raw(b'{"type":"delete","request_id":"p3","entity":"acct","id":1,"reply_to":"no-such"}'),
        Raw(b"{" * 100_000),
        Raw(b'{"type":"delete","request_id":"\x80","entity":"acct","id":1}'),  # bad UTF-8
    ]
    stream: list[dict[str, Any] | Raw] = []
    for i, g in enumerate(good):
        stream.append(g)
        if i % 5 == 0 and poison:
            stream.append(poison.pop())
    stream.extend(poison)
    scenario.start_worker()
    await scenario.send(stream)
    replies = await scenario.replies(expect=len(good) + 3)
    good_replies = [r for r in replies if r.request_id.startswith(scenario.run)]
    await check_exactly_once(pg, scenario.schema, good_replies, good)
    dead = await scenario.read_all(scenario.dlq_topic, expect=10)
    assert len(dead) == 10
    letters = [DEAD.decode(d.value) for d in dead]
    assert all(letter.source_topic == scenario.request_topic for letter in letters)
    assert any("reply_to" in letter.error for letter in letters)
    assert scenario.workers[0].poll() is None, "the worker must survive poison"


async def test_kill_minus_9_at_random_points_then_restart_loses_and_duplicates_nothing(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    """A worker killed -9 three times mid-stream: one reply each, applied at most once."""
    await pg.execute(f"INSERT INTO {scenario.schema}.acct (id) SELECT generate_series(1, 40)")
    requests = updates(range(1, 41), 50, scenario.run)
    scenario.start_worker()
    sender = asyncio.create_task(scenario.send(requests, rate=800))
    rng = random.Random(7)
    for _ in range(3):
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        scenario.workers[-1].send_signal(signal.SIGKILL)
        scenario.workers[-1].wait()
        scenario.start_worker("w0")  # restarted under its id: it aborts its own open transaction
    await sender
    replies = await scenario.replies(expect=len(requests), timeout=180)
    await check_exactly_once(pg, scenario.schema, replies, requests)


@pytest.mark.parametrize("workers", [2, 3])
async def test_workers_in_one_group_one_killed_mid_stream_lose_and_duplicate_nothing(
    scenario: Scenario, pg: asyncpg.Connection, workers: int
) -> None:
    """Scale-out: workers share the partitions; one is killed -9; the rest take over."""
    await pg.execute(f"INSERT INTO {scenario.schema}.acct (id) SELECT generate_series(1, 40)")
    requests = updates(range(1, 41), 40, scenario.run)
    for _ in range(workers):
        scenario.start_worker()
    sender = asyncio.create_task(scenario.send(requests, rate=600))
    await asyncio.sleep(1.5)
    scenario.workers[1].send_signal(signal.SIGKILL)
    await sender
    replies = await scenario.replies(expect=len(requests), timeout=180)
    await check_exactly_once(pg, scenario.schema, replies, requests)


async def test_sigterm_mid_stream_exits_cleanly_and_loses_nothing(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    """SIGTERM: the worker finishes its batch, commits, leaves the group, exits 0."""
    await pg.execute(f"INSERT INTO {scenario.schema}.acct (id) SELECT generate_series(1, 20)")
    requests = updates(range(1, 21), 50, scenario.run)
    first = scenario.start_worker()
    sender = asyncio.create_task(scenario.send(requests, rate=600))
    # Mid-stream: once it has its partitions (a loaded machine takes seconds to start one).
    await until(lambda: "partitions assigned" in scenario.logs(), "the worker's assignment", 60)
    await asyncio.sleep(0.5)
    first.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(first.wait, 60)
    assert code == 0, scenario.logs()
    scenario.start_worker()
    await sender
    replies = await scenario.replies(expect=len(requests))
    await check_exactly_once(pg, scenario.schema, replies, requests)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_metrics_health_and_traceparent_are_exposed(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    """/healthz, /readyz and /metrics answer; counts match; traceparent reaches the reply."""
    await pg.execute(f"INSERT INTO {scenario.schema}.acct (id) VALUES (1)")
    port = _free_port()
    scenario.start_worker(PROCESSOR_METRICS_PORT=str(port))
    trace = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    requests: list[dict[str, Any] | Raw] = [
        Raw(
            msgspec.json.encode(u),
            key=b"acct:1",
            headers=[("traceparent", trace)],
        )
        for u in updates([1], 3, scenario.run)
    ]
    requests.append(
        {"type": "delete", "request_id": f"{scenario.run}-x", "entity": "acct", "id": 99}
    )
    await scenario.send(requests)
    records = await scenario.read_all(scenario.reply_topic, expect=4)
    traced = [r for r in records if dict(r.headers).get("traceparent") == trace]
    assert len(traced) == 3
    assert all(dict(r.headers)["request_id"].startswith(scenario.run.encode()) for r in records)

    deadline = asyncio.get_running_loop().time() + 30
    while True:
        try:
            status, _ = await http_get(port, "/readyz")
            if status == 200:
                break
        except OSError:
            pass
        assert asyncio.get_running_loop().time() < deadline, scenario.logs()
        await asyncio.sleep(0.2)
    assert (await http_get(port, "/healthz"))[0] == 200
    assert (await http_get(port, "/nope"))[0] == 404
    status, text = await http_get(port, "/metrics")
    assert status == 200
    assert 'processor_requests_total{code="",status="success",type="update"} 3.0' in text
    assert 'processor_requests_total{code="-2147220969",status="fault",type="delete"} 1.0' in text
    assert "processor_request_latency_seconds_bucket" in text
    assert "processor_batch_size_count" in text
    assert "processor_assigned_partitions 4.0" in text


async def test_a_zombie_worker_paused_past_its_session_is_fenced(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    """SIGSTOP a worker mid-stream past its session timeout, let the other take over, then
    SIGCONT it. What it held when paused (a batch applied, its commit to come) commits
    with the generation it was fetched under, and the group coordinator refuses it
    (KIP-447): the test waits until the zombie has logged that refusal, pausing it again
    (up to 4 times) if it happened to be idle. Then: one reply each, applied once."""
    await pg.execute(f"INSERT INTO {scenario.schema}.acct (id) SELECT generate_series(1, 30)")
    requests = updates(range(1, 31), 400, scenario.run)
    zombie = scenario.start_worker()
    zombie_log = scenario.tmp / "worker-0.log"
    await until(lambda: "partitions assigned" in zombie_log.read_text(), "an assignment", 60)
    scenario.start_worker()
    other_log = scenario.tmp / "worker-1.log"
    await until(lambda: "partitions assigned" in other_log.read_text(), "the other's", 60)
    sender = asyncio.create_task(scenario.send(requests, rate=300))
    await asyncio.sleep(1.0)  # both busy: the zombie holds a batch most of the time
    refusals: list[dict[str, Any]] = []
    for _ in range(4):
        joins = zombie_log.read_text().count("partitions assigned")
        zombie.send_signal(signal.SIGSTOP)
        await asyncio.sleep(14.0)  # session_timeout_ms is 10 s: the group moves on without it
        zombie.send_signal(signal.SIGCONT)
        # Awake: it commits what it held (refused), or finds itself out of the group.
        await until(
            lambda: zombie_log.read_text().count("partitions assigned") > joins,  # noqa: B023
            "the zombie to rejoin the group",
            60,
        )
        refusals = [
            line
            for line in json_lines(zombie_log)
            if line.get("event", "").startswith(("fenced by the group", "transaction aborted"))
        ]
        if refusals or sender.done():
            break
    await sender
    replies = await scenario.replies(expect=len(requests), timeout=180)
    await check_exactly_once(pg, scenario.schema, replies, requests)
    assert zombie.poll() is None, "the woken zombie must rejoin, not crash:\n" + scenario.logs()
    assert refusals, "the zombie never had a batch in flight to be refused:\n" + scenario.logs()
    # Refused by the group coordinator (KIP-447: it holds an old generation), or, when
    # paused inside its transaction, by the transaction coordinator (open too long).
    assert all(
        "ILLEGAL_GENERATION" in r["error"]
        or "UNKNOWN_MEMBER_ID" in r["error"]
        or "transaction.timeout.ms" in r["error"]
        for r in refusals
    ), refusals


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a worker's log (other lines, if any, skipped)."""
    lines = []
    for text in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            value = json.loads(text)
            if isinstance(value, dict):
                lines.append(value)
    return lines


async def test_two_live_workers_with_one_worker_id_stop_loudly(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    """A misconfiguration: two live workers share PROCESSOR_WORKER_ID, so each start of a
    producer fences the other. They must not carry on silently: at least one stops with
    exit status 2 and one line naming PROCESSOR_WORKER_ID; nothing is lost or doubled."""
    await pg.execute(f"INSERT INTO {scenario.schema}.acct (id) SELECT generate_series(1, 20)")
    requests = updates(range(1, 21), 60, scenario.run)
    first = scenario.start_worker("twin")
    second = scenario.start_worker("twin")
    sender = asyncio.create_task(scenario.send(requests, rate=300))
    await until(lambda: first.poll() is not None or second.poll() is not None, "an exit", 180)
    stopped = first if first.poll() is not None else second
    assert stopped.returncode == 2, scenario.logs()
    said = (scenario.tmp / f"worker-{scenario.workers.index(stopped)}.log").read_text()
    assert "another live worker uses it. Give every worker its own PROCESSOR_WORKER_ID" in said
    await sender
    scenario.start_worker("fixed")  # the operator gives the next one its own id
    replies = await scenario.replies(expect=len(requests), timeout=180)
    await check_exactly_once(pg, scenario.schema, replies, requests)
