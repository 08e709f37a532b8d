"""Replies routed to the instance that asked (reply_partition), on the real broker: fixed
reply partitions, a client group's assignment, and a real rebalance of that group."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from processor.client import Client
from processor.contract import UpdateRequest, decode_reply
from processor.errors import ConfigError, InvalidArgument, ReplyTimeout
from tests.integration.harness import DEAD, Scenario
from tests.integration.test_client import until_answered

pytestmark = pytest.mark.timeout(300)


def _client(scenario: Scenario, **routing: object) -> Client:
    return Client(
        scenario.kafka,
        request_topic=scenario.request_topic,
        reply_topic=scenario.reply_topic,
        timeout=90,
        **routing,  # type: ignore[arg-type]
    )


async def test_fixed_reply_partitions_get_only_their_replies(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    await pg.execute(f"INSERT INTO {scenario.schema}.acct (id) SELECT generate_series(1, 40)")
    scenario.start_worker()
    async with (
        _client(scenario, reply_partitions=[3]) as three,
        _client(scenario, reply_partitions=[0, 1]) as low,
    ):
        await until_answered(three, scenario)
        await until_answered(low, scenario)
        read_before = (three.replies_read, low.replies_read)
        got = await asyncio.gather(
            *(three.retrieve("acct", n) for n in range(1, 21)),
            *(low.retrieve("acct", n) for n in range(21, 41)),
        )
        assert all(r.status == "success" for r in got)
        # Each client read its own replies only (no reply of the other one).
        assert three.replies_read - read_before[0] == 20
        assert low.replies_read - read_before[1] == 20
    records = await scenario.read_all(scenario.reply_topic, expect=40, settle=1.0)
    partitions = {decode_reply(r.value).request_id: r.partition for r in records}
    mine = {r.request_id for r in got[:20]}
    assert {partitions[rid] for rid in mine} == {3}
    assert {partitions[r.request_id] for r in got[20:]} <= {0, 1}

    with pytest.raises(ConfigError, match="reply_partitions \\[7\\] do not exist"):
        async with _client(scenario, reply_partitions=[7]):
            pass


async def test_a_partition_the_topic_lacks_is_a_fault_on_the_default_topic_and_a_dead_letter(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    await pg.execute(f"INSERT INTO {scenario.schema}.acct (id) VALUES (1)")
    scenario.start_worker()
    request = {"type": "retrieve", "entity": "acct", "id": 1}
    await scenario.send(
        [
            {**request, "request_id": "p-9", "reply_partition": 9},
            {
                **request,
                "request_id": "p-9-to",
                "reply_to": scenario.reply_topic,
                "reply_partition": 4,
            },
            {**request, "request_id": "p-bad", "reply_partition": "two"},
            {**request, "request_id": "p-ok", "reply_partition": 2},
        ]
    )
    records = await scenario.read_all(scenario.reply_topic, expect=4, timeout=120)
    replies = {
        decode_reply(r.value).request_id: (decode_reply(r.value), r.partition) for r in records
    }
    for rid, path in (
        ("p-9", "reply_partition"),
        ("p-9-to", "reply_partition"),
        ("p-bad", "reply_partition"),
    ):
        reply, _ = replies[rid]
        assert reply.fault is not None, rid
        assert reply.fault.code == InvalidArgument.code
        assert reply.fault.path == path
    assert "has 4 partitions" in (replies["p-9"][0].fault.message or "")  # type: ignore[union-attr]
    ok, partition = replies["p-ok"]
    assert ok.status == "success"
    assert partition == 2
    letters = {
        DEAD.decode(r.value).request_id
        for r in await scenario.read_all(scenario.dlq_topic, expect=3, timeout=60)
    }
    assert letters == {"p-9", "p-9-to", "p-bad"}


async def test_a_rebalance_of_the_clients_group_resends_what_moved_and_loses_nothing(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    """Client A owns every reply partition and sends 40 updates while no worker runs, so
    their replies are still to come; client B joins A's group and takes half of the
    partitions (a real rebalance). A resends the requests whose partition moved, with the
    same request_ids; then a worker answers. A gets every reply, each update is applied
    once, and B never hands A's replies to anyone."""
    schema = scenario.schema
    await pg.execute(f"INSERT INTO {schema}.acct (id) SELECT generate_series(1, 40)")
    group = f"clients-{scenario.run}"
    async with _client(scenario, reply_group=group) as a:
        assert a.owned == frozenset({0, 1, 2, 3})  # start() returned only once assigned
        calls = [
            asyncio.create_task(
                a.send(
                    UpdateRequest(
                        request_id=f"rb-{n}", entity="acct", id=n, attributes={"balance": n}
                    )
                )
            )
            for n in range(1, 41)
        ]
        deadline = time.monotonic() + 30
        while len(a._sent) < 40:  # every request sent, stamped with one of A's partitions
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        stamped = {rid: r.reply_partition for rid, r in a._sent.items()}
        assert set(stamped.values()) == {0, 1, 2, 3}
        async with _client(scenario, reply_group=group) as b:
            deadline = time.monotonic() + 60
            while not (a.owned and b.owned and a.owned | b.owned == {0, 1, 2, 3}):
                assert time.monotonic() < deadline, (a.owned, b.owned)
                await asyncio.sleep(0.1)
            assert not a.owned & b.owned
            moved = [rid for rid, p in stamped.items() if p not in a.owned]
            assert moved
            deadline = time.monotonic() + 30
            while a.resent < len(moved):
                assert time.monotonic() < deadline, (a.resent, len(moved))
                await asyncio.sleep(0.05)
            scenario.start_worker()
            replies = await asyncio.gather(*calls)
            assert [r.status for r in replies] == ["success"] * 40
            assert {r.request_id for r in replies} == {f"rb-{n}" for n in range(1, 41)}
            # B reads the first answers to A's moved requests (published to partitions B
            # owns now) and drops them: nobody there waits for them.
            deadline = time.monotonic() + 60
            while b.replies_read < len(moved):
                assert time.monotonic() < deadline, (b.replies_read, len(moved))
                await asyncio.sleep(0.1)
            assert a.pending == 0
            assert await b.retrieve("acct", 1)  # B works on its own partitions
    # Applied once each: one ledger row per update, and the balances are the last values.
    applied = await pg.fetchval(
        f"SELECT count(*) FROM {schema}.request_ledger WHERE applied AND request_id LIKE 'rb-%'"
    )
    assert applied == 40
    log = await pg.fetchval(f"SELECT count(*) FROM {schema}.acct_log")
    assert log == 40
    balances = await pg.fetch(f"SELECT id, balance FROM {schema}.acct ORDER BY id")
    assert [(r["id"], r["balance"]) for r in balances] == [(n, n) for n in range(1, 41)]
    # The moved requests' replies were published twice: to the old partition (first
    # delivery) and, replayed from the ledger, to A's new one.
    records = await scenario.read_all(scenario.reply_topic, expect=40 + len(moved), settle=1.0)
    by_id: dict[str, set[int]] = {}
    for r in records:
        by_id.setdefault(decode_reply(r.value).request_id, set()).add(r.partition)
    for rid in moved:
        assert len(by_id[rid]) == 2, (rid, by_id[rid])


async def test_a_group_with_more_clients_than_partitions_leaves_one_waiting_clearly(
    scenario: Scenario,
) -> None:
    """Five clients in a group on a 4-partition reply topic: one owns nothing. Which one is
    the assignor's choice: the newcomer's start() fails naming the cause, or an older
    member is left without partitions and its requests wait for one (a ReplyTimeout),
    never sent to a partition nobody reads."""
    group = f"crowd-{scenario.run}"
    clients = [_client(scenario, reply_group=group) for _ in range(4)]
    for c in clients:
        await c.start()
    extra = Client(
        scenario.kafka,
        request_topic=scenario.request_topic,
        reply_topic=scenario.reply_topic,
        timeout=5,
        reply_group=group,
    )
    try:
        refused = ""
        try:
            await extra.start()
            clients.append(extra)
        except ConfigError as exc:
            refused = str(exc)
        if refused:
            assert "assigned no partition" in refused
            assert "more instances than partitions" in refused
        deadline = time.monotonic() + 60
        while True:
            owned = [c.owned for c in clients]
            stable = sorted(p for o in owned for p in o) == [0, 1, 2, 3]
            if stable and sum(1 for o in owned if o) == 4:
                break
            assert time.monotonic() < deadline, owned
            await asyncio.sleep(0.1)
        starved = [c for c in clients if not c.owned]
        assert len(starved) == len(clients) - 4
        for c in starved:
            with pytest.raises(ReplyTimeout):
                await c.send(
                    UpdateRequest(request_id="w-1", entity="acct", id=1, attributes={"seq": 1}),
                    timeout=2,
                )
            assert not c._sent  # it waited for a partition: nothing was sent
    finally:
        for c in clients:
            await c.close()
        await extra.close()
