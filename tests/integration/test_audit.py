"""`processor audit` on histories made by real workers, clean and with injected anomalies."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from aiokafka import AIOKafkaProducer

from processor.audit import (
    BROKEN_VERSION_CHAIN,
    DOUBLE_APPLICATION,
    DUPLICATE_REPLY,
    EXIT_ANOMALIES,
    LEDGER_MISMATCH,
    MISSING_REPLY,
    REPLY_WITHOUT_REQUEST,
    UNANSWERED_BAD_INPUT,
    AuditOptions,
    AuditReport,
    run_audit,
)
from processor.config import Settings
from processor.contract import Reply, encode_reply
from tests.conftest import NewTopic
from tests.integration.harness import Raw, Scenario, updates
from tests.support import consume_all

pytestmark = pytest.mark.timeout(600)

MAX_BYTES = "100000"


@dataclass
class History:
    requests: list[dict[str, Any] | Raw]
    with_id: int  # records that get a reply
    on_default: int  # ... on the default reply topic
    reply_to: str  # the extra reply topic one request names


def settings(s: Scenario, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": s.kafka,
        "database_url": s.database_url,
        "request_topic": s.request_topic,
        "reply_topic": s.reply_topic,
        "dlq_topic": s.dlq_topic,
        "group_id": s.group,
        "ledger_schema": s.schema,
        "max_message_bytes": int(MAX_BYTES),
    }
    return Settings(**{**values, **changes})


async def audit(s: Scenario, options: AuditOptions | None = None, **changes: Any) -> AuditReport:
    return await run_audit(settings(s, **changes), options)


async def make_history(s: Scenario, pg: asyncpg.Connection, new_topic: NewTopic) -> History:
    """Every kind of outcome, processed by one worker, which is then stopped cleanly."""
    schema, r = s.schema, s.run
    await pg.execute(f"INSERT INTO {schema}.acct (id) SELECT g FROM generate_series(1, 4) g")
    await pg.execute(f"INSERT INTO {schema}.item (sku) VALUES ('a'), ('b')")
    await pg.execute(f"INSERT INTO {schema}.note (id, body) VALUES (1, 'x')")
    reply_to = await new_topic(partitions=s.partitions)

    def req(name: str, **fields: Any) -> dict[str, Any]:
        return {"request_id": f"{r}-{name}", **fields}

    requests: list[dict[str, Any] | Raw] = [
        *updates([1, 2, 3, 4], 5, r),
        req("item-a", type="update", entity="item", id="a", attributes={"qty": 1}),
        req("item-a2", type="update", entity="item", id="a", attributes={"qty": 2}),
        # Writes acct 1 from another key (partition): its chain must link across them.
        req(
            "related",
            type="update",
            entity="item",
            id="b",
            attributes={"qty": 5},
            related=[{"entity": "acct", "id": 1, "attributes": {"balance": 3}}],
        ),
        req("retrieve", type="retrieve", entity="acct", id=2),
        req(
            "mismatch",
            type="update",
            entity="item",
            id="a",
            concurrency_behavior="IfRowVersionMatches",
            row_version="999",
            attributes={"qty": 9},
        ),
        req("del-note", type="delete", entity="note", id=1),
        req("upd-gone", type="update", entity="note", id=1, attributes={"body": "z"}),
        req("noentity", type="delete", entity="nope", id=1),
        req("dup", type="update", entity="acct", id=3, attributes={"balance": 7}),
        req("dup", type="update", entity="acct", id=3, attributes={"balance": 8}),
        req("resend", type="update", entity="acct", id=3, attributes={"balance": 9}),
        req("resend", type="update", entity="acct", id=3, attributes={"balance": 9}),
        req(
            "reply-to",
            type="update",
            entity="acct",
            id=2,
            attributes={"balance": 4},
            reply_to=reply_to,
        ),
        req(
            "bad-reply-to",
            type="update",
            entity="acct",
            id=2,
            attributes={"balance": 5},
            reply_to=f"no-such-topic-{r}",
        ),
        Raw(b"not json"),
        Raw(
            b'{"type":"update","request_id":"'
            + f"{r}-malformed".encode()
            + b'","entity":"acct","id":1.5,"attributes":{}}'
        ),
        Raw(b"x" * 200_000, headers=[("request_id", f"{r}-huge".encode())]),
    ]
    with_id = sum(1 for q in requests if isinstance(q, dict)) + 2
    history = History(requests, with_id, with_id - 1, reply_to)
    s.start_worker(PROCESSOR_MAX_MESSAGE_BYTES=MAX_BYTES)
    await s.send(requests)
    await s.read_all(s.reply_topic, expect=history.on_default)
    await s.read_all(reply_to, expect=1)
    s.stop_all(signal.SIGTERM)
    return history


async def rows(pg: asyncpg.Connection, schema: str) -> list[Any]:
    found = []
    for table in ("acct", "item", "note"):
        found.append(
            [
                dict(r)
                for r in await pg.fetch(
                    f"SELECT *, xmin::text AS x FROM {schema}.{table} ORDER BY 1"
                )
            ]
        )
    found.append(
        [
            dict(r)
            for r in await pg.fetch(
                f"SELECT request_id, reply, writes::text FROM {schema}.request_ledger ORDER BY 1"
            )
        ]
    )
    return found


async def copy_topic(
    s: Scenario,
    new_topic: NewTopic,
    source: str,
    *,
    drop: Callable[[Any], bool] = lambda _: False,
    extra: Callable[[Any], int] = lambda _: 0,
    add: list[tuple[int, bytes]] | None = None,
) -> str:
    """A copy of ``source`` (same partitions, keys, headers), written in one transaction:
    without the records ``drop`` picks, with ``extra(record)`` more copies of each, plus
    ``add`` (partition, value) records."""
    copy = await new_topic(partitions=s.partitions)
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka, transactional_id=f"copy-{copy}")
    await producer.start()
    try:
        await producer.begin_transaction()
        for record in await consume_all(s.kafka, source):
            if drop(record):
                continue
            for _ in range(1 + extra(record)):
                await producer.send(
                    copy,
                    record.value,
                    key=record.key,
                    partition=record.partition,
                    headers=list(record.headers),
                )
        for partition, value in add or []:
            await producer.send(copy, value, partition=partition)
        await producer.commit_transaction()
    finally:
        await producer.stop()
    return copy


def request_id_of(record: Any) -> str | None:
    try:
        found = msgspec.json.decode(record.value)["request_id"]
    except (msgspec.DecodeError, KeyError, TypeError):
        return None
    return found if isinstance(found, str) else None


def examples(report: AuditReport, kind: str) -> list[dict[str, Any]]:
    return report.examples.get(kind, [])


async def test_a_clean_history_passes_and_a_replay_changes_no_row(
    scenario: Scenario, pg: asyncpg.Connection, new_topic: NewTopic, tmp_path: Path
) -> None:
    s = scenario
    history = await make_history(s, pg, new_topic)
    out = tmp_path / "audit.json"
    done = subprocess.run(
        [sys.executable, "-m", "processor", "audit", "--out", str(out)],
        env=s.env(PROCESSOR_MAX_MESSAGE_BYTES=MAX_BYTES),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "processor audit: OK" in done.stdout
    report = json.loads(out.read_text())
    assert report["ok"] is True
    counts = report["counts"]
    assert counts["request_records"] == len(history.requests)
    assert counts["rejected"] == 3
    assert counts["rejected_without_id"] == 1
    assert counts["replies"] == history.with_id
    assert counts["republished"] == 0
    assert counts["dead_letters"] == 6
    # Ledgered: every admitted request_id except the one whose reply_to did not exist.
    admitted = {q["request_id"] for q in history.requests if isinstance(q, dict)}
    assert counts["ledger_rows"] == len(admitted) - 1
    assert counts["chain_records"] == 7  # acct 1-4, item a and b, note 1
    outcomes = report["outcomes"]
    assert sum(outcomes.values()) == len(history.requests)
    assert outcomes["success/update"] == 20 + 3 + 1 + 2 + 1
    assert outcomes["success/retrieve"] == 1
    assert outcomes["success/delete"] == 1
    assert outcomes["fault/ConcurrencyVersionMismatch"] == 1
    assert outcomes["fault/ObjectDoesNotExist"] == 1
    assert outcomes["fault/QueryBuilderNoEntity"] == 1
    assert outcomes["fault/DuplicateRecord"] == 1
    assert outcomes["rejected/InvalidArgument"] == 3
    assert outcomes["rejected/RequestTooLarge"] == 1
    assert report["scope"]["reply_topics"] == [s.reply_topic, history.reply_to]

    # A replay through a new group, from the earliest offset: the same outcomes, no row moved.
    before = await rows(pg, s.schema)
    replay = f"{s.group}-replay"
    s.start_worker(PROCESSOR_GROUP_ID=replay, PROCESSOR_MAX_MESSAGE_BYTES=MAX_BYTES)
    await s.read_all(s.reply_topic, expect=2 * history.on_default)
    await s.read_all(history.reply_to, expect=2)
    s.stop_all(signal.SIGTERM)
    assert await rows(pg, s.schema) == before

    replayed = await audit(s, AuditOptions(replayed_groups=(replay,)))
    assert replayed.ok, replayed.render()
    assert replayed.counts["replies"] == 2 * history.with_id
    assert replayed.counts["republished"] == history.with_id
    # How far the replay got, without Kafka's command-line tools.
    assert replayed.scope["replay_lag"] == {replay: 0}
    assert f"replay group {replay} has caught up" in replayed.render()

    strict = await audit(s)
    assert strict.found() == {DUPLICATE_REPLY}
    assert strict.count(DUPLICATE_REPLY) == len(admitted) + 2  # + malformed, huge
    assert any("replay" in note for note in strict.notes)

    lenient = await audit(s, AuditOptions(accept_republished=True))
    assert lenient.ok, lenient.render()


async def test_each_injected_anomaly_is_detected_by_name(
    scenario: Scenario, pg: asyncpg.Connection, new_topic: NewTopic
) -> None:
    s = scenario
    r = s.run
    await make_history(s, pg, new_topic)
    assert (await audit(s)).ok
    ledger = f"{s.schema}.request_ledger"

    # ledger-mismatch: the stored reply is no longer the published bytes.
    target = f"{r}-1-2"
    original = await pg.fetchval(f"SELECT reply FROM {ledger} WHERE request_id = $1", target)
    await pg.execute(
        f"UPDATE {ledger} SET reply = $2 WHERE request_id = $1", target, original + b" "
    )
    report = await audit(s)
    assert report.found() == {LEDGER_MISMATCH}, report.render()
    assert examples(report, LEDGER_MISMATCH)[0]["request_id"] == target
    await pg.execute(f"UPDATE {ledger} SET reply = $2 WHERE request_id = $1", target, original)
    assert (await audit(s)).ok

    # broken-version-chain: a write no longer starts from the version before it.
    target = f"{r}-2-2"
    original = await pg.fetchval(f"SELECT writes::text FROM {ledger} WHERE request_id = $1", target)
    await pg.execute(
        f"UPDATE {ledger} SET writes = jsonb_set(writes, '{{0,prior}}', '\"bogus\"') "
        "WHERE request_id = $1",
        target,
    )
    report = await audit(s)
    assert report.found() == {BROKEN_VERSION_CHAIN}, report.render()
    (broken,) = examples(report, BROKEN_VERSION_CHAIN)
    assert (broken["entity"], broken["id"], broken["request_id"]) == ("acct", "2", target)

    # double-application: the row says the request wrote the record twice (and its
    # writes no longer match its reply: that is a ledger-mismatch as well).
    await pg.execute(
        f"UPDATE {ledger} SET writes = $2::jsonb WHERE request_id = $1", target, original
    )
    target = f"{r}-4-1"
    original = await pg.fetchval(f"SELECT writes::text FROM {ledger} WHERE request_id = $1", target)
    await pg.execute(f"UPDATE {ledger} SET writes = writes || writes WHERE request_id = $1", target)
    report = await audit(s)
    assert report.found() == {DOUBLE_APPLICATION, LEDGER_MISMATCH}, report.render()
    assert examples(report, DOUBLE_APPLICATION)[0]["request_id"] == target
    await pg.execute(
        f"UPDATE {ledger} SET writes = $2::jsonb WHERE request_id = $1", target, original
    )
    assert (await audit(s)).ok

    # missing-reply: a copy of the reply topic without one reply.
    target = f"{r}-3-1"
    copy = await copy_topic(
        s, new_topic, s.reply_topic, drop=lambda rec: request_id_of(rec) == target
    )
    report = await audit(s, reply_topic=copy)
    assert report.found() == {MISSING_REPLY}, report.render()
    assert examples(report, MISSING_REPLY)[0]["request_id"] == target
    assert "lost" in examples(report, MISSING_REPLY)[0]["detail"]

    # duplicate-reply: one reply published twice (in a transaction, as a worker would).
    copy = await copy_topic(
        s, new_topic, s.reply_topic, extra=lambda rec: request_id_of(rec) == target
    )
    report = await audit(s, reply_topic=copy)
    assert report.found() == {DUPLICATE_REPLY}, report.render()
    assert examples(report, DUPLICATE_REPLY)[0]["request_id"] == target

    # reply-without-request: a reply to a request that never was.
    ghost = Reply(
        request_id=f"{r}-ghost",
        type="update",
        entity="acct",
        id=1,
        status="success",
        processed_at=datetime.now(UTC),
        row_version="1",
    )
    copy = await copy_topic(s, new_topic, s.reply_topic, add=[(0, encode_reply(ghost))])
    report = await audit(s, reply_topic=copy)
    assert report.found() == {REPLY_WITHOUT_REQUEST}, report.render()
    assert examples(report, REPLY_WITHOUT_REQUEST)[0]["request_id"] == f"{r}-ghost"

    # unanswered-bad-input: the dead letter of the poison without a request_id is gone.
    copy = await copy_topic(s, new_topic, s.dlq_topic, drop=lambda rec: request_id_of(rec) is None)
    report = await audit(s, dlq_topic=copy)
    assert report.found() == {UNANSWERED_BAD_INPUT}, report.render()
    assert "rejected at intake" in examples(report, UNANSWERED_BAD_INPUT)[0]["detail"]

    # missing-reply: a request produced after the worker stopped.
    late = {
        "type": "update",
        "request_id": f"{r}-late",
        "entity": "acct",
        "id": 1,
        "attributes": {"seq": 99},
    }
    await s.send([late])
    report = await audit(s)
    assert report.found() == {MISSING_REPLY}, report.render()
    (missing,) = examples(report, MISSING_REPLY)
    assert missing["request_id"] == f"{r}-late"
    assert "not consumed it yet" in missing["detail"]

    # The command says so too: exit status, and the JSON on stdout.
    done = subprocess.run(
        [sys.executable, "-m", "processor", "audit", "--json", "--quiet"],
        env=s.env(PROCESSOR_MAX_MESSAGE_BYTES=MAX_BYTES),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == EXIT_ANOMALIES, done.stderr
    assert json.loads(done.stdout)["anomalies"][MISSING_REPLY] == 1


async def test_a_replay_after_a_lost_ledger_row_is_a_double_application(
    scenario: Scenario, pg: asyncpg.Connection, new_topic: NewTopic
) -> None:
    """The documented limit: a request whose ledger row is gone is applied again."""
    s = scenario
    history = await make_history(s, pg, new_topic)
    target = f"{s.run}-4-4"  # the last write of acct 4
    await pg.execute(f"DELETE FROM {s.schema}.request_ledger WHERE request_id = $1", target)
    xmin = await pg.fetchval(f"SELECT xmin::text FROM {s.schema}.acct WHERE id = 4")
    replay = f"{s.group}-replay"
    s.start_worker(PROCESSOR_GROUP_ID=replay, PROCESSOR_MAX_MESSAGE_BYTES=MAX_BYTES)
    await s.read_all(s.reply_topic, expect=2 * history.on_default)
    s.stop_all(signal.SIGTERM)
    assert await pg.fetchval(f"SELECT xmin::text FROM {s.schema}.acct WHERE id = 4") != xmin

    report = await audit(s, AuditOptions(replayed_groups=(replay,)))
    # Two different applications on the reply topic; and the ledger lost the first one's
    # write, so the second write starts from a version no ledgered write produced.
    assert report.found() == {DOUBLE_APPLICATION, BROKEN_VERSION_CHAIN}, report.render()
    (double,) = examples(report, DOUBLE_APPLICATION)
    assert double["request_id"] == target
    assert len(double["where"]) == 2
    (gap,) = examples(report, BROKEN_VERSION_CHAIN)
    assert (gap["entity"], gap["id"], gap["request_id"]) == ("acct", "4", target)
    assert "gap" in gap["detail"]


async def test_ranges_and_a_record_history(
    scenario: Scenario, pg: asyncpg.Connection, new_topic: NewTopic
) -> None:
    s = scenario
    r = s.run
    history = await make_history(s, pg, new_topic)
    await asyncio.sleep(0.05)
    middle = datetime.now(UTC)
    await asyncio.sleep(0.05)
    late: list[dict[str, Any] | Raw] = [
        {
            "type": "update",
            "request_id": f"{r}-late-{i}",
            "entity": "acct",
            "id": 1,
            "attributes": {"seq": 10 + i},
        }
        for i in range(4)
    ]
    s.start_worker(PROCESSOR_MAX_MESSAGE_BYTES=MAX_BYTES)
    await s.send(late)
    await s.read_all(s.reply_topic, expect=history.on_default + len(late))
    s.stop_all(signal.SIGTERM)

    whole = await audit(s)
    assert whole.ok, whole.render()
    assert whole.counts["request_records"] == len(history.requests) + len(late)

    after = await audit(s, AuditOptions(since=middle))
    assert after.ok, after.render()
    assert after.counts["request_records"] == len(late)
    assert after.counts["replies"] == len(late)
    assert after.counts["replies_out_of_scope"] > 0

    before = await audit(s, AuditOptions(until=middle))
    assert before.ok, before.render()
    assert before.counts["request_records"] == len(history.requests)

    partition = (await consume_all(s.kafka, s.request_topic))[0].partition
    spans = await audit(s, AuditOptions(offsets={partition: (0, None)}))
    assert spans.ok, spans.render()
    assert set(spans.scope["spans"]) == {str(partition)}
    assert 0 < spans.counts["request_records"] < whole.counts["request_records"]

    with_history = await audit(s, AuditOptions(entity="acct", record_id="1"))
    assert with_history.ok
    assert with_history.history is not None
    (record,) = with_history.history
    assert (record["entity"], record["id"], record["chain"]) == ("acct", "1", "ok")
    names = sorted(e["request_id"] for e in record["entries"])
    expected = [*(f"{r}-1-{i}" for i in range(5)), f"{r}-related"]
    assert names == sorted([*expected, *(f"{r}-late-{i}" for i in range(4))])
    assert all(e["new"] is not None for e in record["entries"])
    assert "acct 1: version chain ok" in with_history.render()


async def test_batches_metadata_and_reply_partitions_audit_clean(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    """Execute requests (their inner requests are ledgered at the batch's offset), a
    retrieve_entity and a reply_partition the topic lacks (a fault reply on the default
    topic and a dead letter): a clean history for the audit, version chains included."""
    s, r = scenario, scenario.run
    await pg.execute(f"INSERT INTO {s.schema}.acct (id) SELECT g FROM generate_series(1, 3) g")

    def upd(name: str, id: int, balance: int) -> dict[str, Any]:
        return {
            "type": "update",
            "request_id": f"{r}-{name}",
            "entity": "acct",
            "id": id,
            "attributes": {"balance": balance},
        }

    requests: list[dict[str, Any] | Raw] = [
        upd("single", 1, 1),
        {
            "type": "execute_transaction",
            "request_id": f"{r}-tx",
            "requests": [upd("tx-0", 1, 2), upd("tx-1", 2, 2), upd("tx-2", 1, 3)],
        },
        {
            "type": "execute_transaction",
            "request_id": f"{r}-tx-fails",
            "requests": [upd("txf-0", 1, 4), upd("txf-1", 99, 4)],
        },
        {
            "type": "execute_multiple",
            "request_id": f"{r}-multi",
            "continue_on_error": True,
            "requests": [upd("m-0", 3, 1), upd("m-1", 3, -1), upd("m-2", 2, 5)],
        },
        {"type": "retrieve_entity", "request_id": f"{r}-meta", "entity": "acct"},
        {**upd("partition", 2, 6), "reply_partition": 2},
        {**upd("no-partition", 2, 7), "reply_partition": 99},
    ]
    s.start_worker(PROCESSOR_MAX_MESSAGE_BYTES=MAX_BYTES)
    await s.send(requests)
    replies = await s.replies(expect=len(requests))
    s.stop_all(signal.SIGTERM)
    by_id = {x.request_id: x for x in replies}
    assert by_id[f"{r}-tx"].status == "success"
    assert by_id[f"{r}-tx-fails"].faulted_request_index == 1
    assert by_id[f"{r}-multi"].is_faulted
    assert by_id[f"{r}-no-partition"].fault is not None
    report = await audit(s)
    assert report.ok, report.render()
    assert report.counts["chain_records"] == 3


def run_cli(s: Scenario, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "processor", "audit", "--quiet", *args],
        env=s.env(PROCESSOR_MAX_MESSAGE_BYTES=MAX_BYTES),
        capture_output=True,
        text=True,
        timeout=300,
    )


async def process(s: Scenario, requests: list[dict[str, Any] | Raw], replies: int) -> None:
    """``requests`` through one worker of ``s``, stopped once ``replies`` are on its topic."""
    s.start_worker(PROCESSOR_MAX_MESSAGE_BYTES=MAX_BYTES)
    await s.send(requests)
    await s.read_all(s.reply_topic, expect=replies)
    s.stop_all(signal.SIGTERM)


async def shared_ledger(
    s: Scenario, pg: asyncpg.Connection
) -> tuple[Scenario, list[dict[str, Any]]]:
    """Two deployments on one schema. The other one writes acct 1, 3 and 4, then a reset by
    plain SQL (as a load test does) breaks the chains of acct 1 and 3, then the other one
    writes acct 3 again (a gap in its own traffic). Then ``s`` writes acct 1 (starting from
    the reset's version) and 2, and deletes acct 2. Returns the other one and s's requests."""
    await pg.execute(f"INSERT INTO {s.schema}.acct (id) SELECT g FROM generate_series(1, 4) g")
    other = await s.sharing()
    await process(other, [*updates([1, 3, 4], 3, other.run)], 9)
    await pg.execute(f"UPDATE {s.schema}.acct SET balance = 100 WHERE id IN (1, 3)")
    await process(other, [*updates([3], 2, f"{other.run}-again")], 11)
    mine: list[dict[str, Any]] = [
        *updates([1, 2], 3, s.run),
        {"type": "delete", "request_id": f"{s.run}-del", "entity": "acct", "id": 2},
    ]
    await process(s, [*mine], len(mine))
    return other, mine


async def test_an_audit_judges_its_own_request_topic_on_a_shared_ledger(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    s = scenario
    other, mine = await shared_ledger(s, pg)

    report = await audit(s)
    assert report.ok, report.render()
    assert report.counts["request_records"] == len(mine)
    assert report.counts["chain_records"] == 2  # acct 1 and 2: what these requests wrote
    assert report.counts["chain_writes"] == len(mine)
    assert report.counts["ledger_rows_other_topics"] == 11
    assert report.counts["other_topics"] == 1
    judged, not_judged = report.coverage["judged"], report.coverage["not_judged"]
    assert judged[0].startswith(f"{len(mine)} request records of {s.request_topic}")
    assert any("version chains of the 2 records" in line for line in judged)
    assert any("11 ledger rows of 1 other request topic" in line for line in not_judged)

    # The other deployment's audit still finds the gap in its own traffic, and only that.
    theirs = await audit(other)
    assert theirs.found() == {BROKEN_VERSION_CHAIN}, theirs.render()
    (gap,) = examples(theirs, BROKEN_VERSION_CHAIN)
    assert (gap["entity"], gap["id"], gap["request_id"]) == ("acct", "3", f"{other.run}-again-3-0")
    assert "gap" in gap["detail"]

    # The command: exit 0, and it says what it covered and what it did not judge.
    done = run_cli(s)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.startswith("processor audit: OK, no anomalies"), out
    assert "\njudged:\n" in out
    assert "\nnot judged:\n" in out
    assert f'11 ledger rows of 1 other request topic sharing "{s.schema}"' in out
    assert f"1 reply per request record (its processing by consumer group {s.group})" in out


async def test_a_record_history_is_a_query_not_failed_by_anomalies_elsewhere(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    s = scenario
    _, mine = await shared_ledger(s, pg)
    ledger = f"{s.schema}.request_ledger"
    # A request about the entity itself names no record: the entity's history lists its
    # records only (it showed as a record "acct " with an empty id).
    meta = {"type": "retrieve_entity", "request_id": f"{s.run}-meta", "entity": "acct"}
    await process(s, [meta], len(mine) + 1)
    done = run_cli(s, "--entity", "acct")
    assert done.returncode == 0, done.stdout + done.stderr
    assert [line for line in done.stdout.splitlines() if line.startswith("  acct")] == [
        "  acct 1: version chain ok",
        "  acct 2: version chain ok",
        "  acct 3: version chain not judged",
        "  acct 4: version chain not judged",
    ], done.stdout
    assert f"{s.run}-meta" not in done.stdout

    # An anomaly outside acct 2's history: acct 1's last reply is no longer the ledger's.
    target = f"{s.run}-1-2"
    await pg.execute(
        f"UPDATE {ledger} SET reply = reply || ' '::bytea WHERE request_id = $1", target
    )
    assert (await audit(s)).found() == {LEDGER_MISMATCH}

    done = run_cli(s, "--entity", "acct", "--id", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.startswith("processor audit: history: no anomaly in it, 1 record, 4 entries"), out
    assert "acct 2: version chain ok" in out
    assert f"{s.run}-2-0 update success" in out
    assert ", 1 reply)" in out
    assert "1 replies" not in out
    assert f"{s.run}-del delete success" in out
    assert "-> deleted" in out
    assert "1 anomaly outside this history" in out

    # A record only the other topic wrote: its history shows, its chain is not judged here.
    done = run_cli(s, "--entity", "acct", "--id", "3")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "acct 3: version chain not judged" in done.stdout

    # An anomaly in the history fails it.
    target = f"{s.run}-2-1"
    await pg.execute(
        f"UPDATE {ledger} SET reply = reply || ' '::bytea WHERE request_id = $1", target
    )
    done = run_cli(s, "--entity", "acct", "--id", "2", "--json")
    assert done.returncode == EXIT_ANOMALIES, done.stdout + done.stderr
    found = json.loads(done.stdout)["history_anomalies"]
    assert [(a["kind"], a["request_id"]) for a in found] == [(LEDGER_MISMATCH, target)]
