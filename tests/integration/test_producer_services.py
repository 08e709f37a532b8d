"""Entity metadata, ExecuteTransaction / ExecuteMultiple and the client context, against
real `processor run` workers on the real broker and database."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import asyncpg
import msgspec
import pytest

from processor.client import Client, fault_of
from processor.contract import DeleteRequest, RetrieveRequest, UpdateRequest
from processor.errors import (
    ConcurrencyVersionMismatch,
    EntityNotFound,
    InvalidArgument,
    ObjectDoesNotExist,
)
from tests.integration.harness import DEAD, Scenario
from tests.integration.test_client import until_answered

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
async def served(scenario: Scenario, client: Client, pg: asyncpg.Connection) -> Client:
    await pg.execute(f"INSERT INTO {scenario.schema}.acct (id) SELECT generate_series(1, 10)")
    await pg.execute(f"INSERT INTO {scenario.schema}.item (sku) VALUES ('a'), ('b')")
    scenario.start_worker()
    await until_answered(client, scenario)
    return client


def _upd(id: int, attributes: dict[str, Any], **fields: Any) -> UpdateRequest:
    return UpdateRequest(
        request_id=f"u-{id}-{json.dumps(attributes)}-{fields}"[:120],
        entity="acct",
        id=id,
        attributes=attributes,
        **fields,
    )


async def test_entity_metadata_from_the_workers_and_the_cli(
    scenario: Scenario, served: Client
) -> None:
    meta = await served.entity_metadata("item")
    assert meta.logical_name == "item"
    assert meta.is_optimistic_concurrency_enabled
    assert meta.default_behavior == "AlwaysOverwrite"
    assert (meta.row_version, meta.row_version_column) == ("column", "version")
    assert (meta.key.logical_name, meta.key.type) == ("sku", "text")
    assert [a.logical_name for a in meta.attributes] == ["qty"]
    counter = await served.entity_metadata("counter")
    assert counter.default_behavior == "IfRowVersionMatches"
    assert counter.row_version == "xmin"
    note = await served.entity_metadata("note")
    assert not note.is_optimistic_concurrency_enabled
    with pytest.raises(EntityNotFound) as info:
        await served.entity_metadata("invoice")
    assert info.value.reply is not None
    assert info.value.reply.fault is not None
    assert info.value.reply.fault.name == "QueryBuilderNoEntity"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "processor", "entities", *args],
            env=scenario.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )

    table = await asyncio.to_thread(cli)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:2] == ["entity", "optimistic"]
    item_line = next(line for line in lines if line.startswith("item "))
    assert "column version" in item_line
    assert "sku text" in item_line
    as_json = await asyncio.to_thread(cli, "--json")
    assert as_json.returncode == 0, as_json.stderr
    by_name = {m["logical_name"]: m for m in json.loads(as_json.stdout)}
    assert by_name["item"] == msgspec.to_builtins(meta)
    assert set(by_name) == {"acct", "item", "note", "counter"}


async def test_a_transaction_rolls_back_with_its_index_and_applies_when_all_pass(
    scenario: Scenario, served: Client, pg: asyncpg.Connection
) -> None:
    schema = scenario.schema
    with pytest.raises(ObjectDoesNotExist) as info:
        await served.execute_transaction(
            [
                _upd(1, {"balance": 5}),
                DeleteRequest(request_id="d-2", entity="acct", id=2),
                _upd(99, {"balance": 1}),
            ]
        )
    assert info.value.request_index == 2
    assert await pg.fetchval(f"SELECT balance FROM {schema}.acct WHERE id = 1") == 0
    assert await pg.fetchval(f"SELECT count(*) FROM {schema}.acct WHERE id = 2") == 1

    done = await served.execute_transaction(
        [
            _upd(1, {"balance": 7}),
            DeleteRequest(request_id="d-2b", entity="acct", id=2),
            RetrieveRequest(request_id="r-1", entity="acct", id=1),
        ]
    )
    assert done.responses is not None
    assert [(r.request_index, r.type) for r in done.responses] == [
        (0, "update"),
        (1, "delete"),
        (2, "retrieve"),
    ]
    assert done.responses[2].attributes is not None
    assert done.responses[2].attributes["balance"] == 7
    assert await pg.fetchval(f"SELECT count(*) FROM {schema}.acct WHERE id = 2") == 0

    multi = await served.execute_multiple(
        [_upd(3, {"balance": 1}), _upd(98, {"balance": 1}), _upd(4, {"balance": -1})],
        continue_on_error=True,
        return_responses=False,
    )
    assert multi.is_faulted
    assert multi.responses is not None
    assert [r.request_index for r in multi.responses] == [1, 2]
    assert isinstance(fault_of(multi.responses[1]), InvalidArgument)
    assert fault_of(multi.responses[1]).request_index == 2
    assert await pg.fetchval(f"SELECT balance FROM {schema}.acct WHERE id = 3") == 1


async def test_bad_batches_get_a_fault_reply_and_a_dead_letter(
    scenario: Scenario, served: Client
) -> None:
    def inner(n: int, **extra: Any) -> dict[str, Any]:
        return {"type": "retrieve", "request_id": f"i-{n}", "entity": "acct", "id": 1, **extra}

    bad: dict[str, tuple[dict[str, Any], str]] = {
        "empty": ({"type": "execute_transaction", "requests": []}, "requests"),
        "oversized": (
            {"type": "execute_multiple", "requests": [inner(n) for n in range(1001)]},
            "requests",
        ),
        "nested": (
            {
                "type": "execute_transaction",
                "requests": [{"type": "execute_multiple", "requests": [inner(0)]}],
            },
            "requests[0].type",
        ),
        "unknown-inner": (
            {"type": "execute_multiple", "requests": [{**inner(0), "type": "upsert"}]},
            "requests[0].type",
        ),
        "inner-reply-to": (
            {"type": "execute_transaction", "requests": [inner(0, reply_to="x")]},
            "requests[0].reply_to",
        ),
        "inner-ids-twice": (
            {"type": "execute_transaction", "requests": [inner(0), inner(0)]},
            "requests[1].request_id",
        ),
        "metadata-wrong-type": ({"type": "retrieve_entity", "entity": 5}, "entity"),
    }
    messages = [
        {**doc, "request_id": f"bad-{name}", "entity": doc.get("entity", "acct"), "id": 1}
        if doc["type"] != "retrieve_entity"
        else {**doc, "request_id": f"bad-{name}"}
        for name, (doc, _) in bad.items()
    ]
    # The test's own extra fields "entity"/"id" on execute requests are unknown fields: drop.
    for m in messages:
        if m["type"] != "retrieve_entity":
            m.pop("entity")
            m.pop("id")
    await scenario.send(messages)
    replies = {
        r.request_id: r
        for r in await scenario.replies(expect=len(bad) + 10, timeout=90)
        if r.request_id.startswith("bad-")
    }
    letters = {
        DEAD.decode(r.value).request_id: DEAD.decode(r.value)
        for r in await scenario.read_all(scenario.dlq_topic, expect=len(bad), timeout=90)
    }
    for name, (_, path) in bad.items():
        reply = replies[f"bad-{name}"]
        assert reply.status == "fault", name
        assert reply.fault is not None
        assert reply.fault.code == InvalidArgument.code, (name, reply.fault)
        assert reply.fault.path == path, (name, reply.fault)
        assert f"bad-{name}" in letters, name
    assert "cannot be inside an execute request" in replies["bad-nested"].fault.message  # type: ignore[union-attr]


async def test_save_changes_applies_refreshes_and_raises_a_named_conflict(
    scenario: Scenario, served: Client, pg: asyncpg.Connection
) -> None:
    schema = scenario.schema
    async with served.context(concurrency_behavior="IfRowVersionMatches") as ctx:
        a = await ctx.retrieve("item", "a")
        b = await ctx.retrieve("item", "b")
        assert (a.row_version, b.row_version) == ("1", "1")
        ctx.update("item", "a", {"qty": 5})
        ctx.update("item", "b", {"qty": 6})
        results = await ctx.save_changes()
        assert [r.reply.row_version for r in results if r.reply] == ["2", "2"]
        assert [t.row_version for t in ctx.tracked] == ["2", "2"]
        assert all(t.state == "unchanged" for t in ctx.tracked)
        assert ctx.pending == []

        # Someone else writes b: the next save conflicts on b, and applies nothing.
        await pg.execute(f"UPDATE {schema}.item SET qty = 0, version = 3 WHERE sku = 'b'")
        ctx.update("item", "a", {"qty": 7})
        ctx.update("item", "b", {"qty": 8})
        with pytest.raises(ConcurrencyVersionMismatch) as info:
            await ctx.save_changes()
        conflict = info.value
        assert conflict.request_index == 1
        assert conflict.change is not None
        assert (conflict.change.entity, conflict.change.id) == ("item", "b")
        assert conflict.expected_version == "2"
        assert conflict.current_version == "3"
        assert "update of item 'b'" in str(conflict)
        assert await pg.fetchval(f"SELECT qty FROM {schema}.item WHERE sku = 'a'") == 5
        assert [t.state for t in ctx.pending] == ["modified", "modified"]

        # Re-read b (its change stays recorded) and save again: both apply.
        await ctx.retrieve("item", "b")
        results = await ctx.save_changes()
        assert [r.change.id for r in results] == ["a", "b"]
        assert await pg.fetchval(f"SELECT qty FROM {schema}.item WHERE sku = 'b'") == 8
        assert {t.id: t.row_version for t in ctx.tracked} == {"a": "3", "b": "4"}

        # continue_on_error: each change on its own; the conflict is raised with results.
        ctx.continue_on_error = True
        ctx.delete("item", "a")
        ctx.update("item", "b", {"qty": 9})
        await pg.execute(f"UPDATE {schema}.item SET version = 10 WHERE sku = 'a'")
        with pytest.raises(ConcurrencyVersionMismatch) as info:
            await ctx.save_changes()
        assert info.value.change is not None
        assert info.value.change.kind == "delete"
        assert info.value.results is not None
        assert [r.error is None for r in info.value.results] == [False, True]
        assert await pg.fetchval(f"SELECT qty FROM {schema}.item WHERE sku = 'b'") == 9
        assert [t.id for t in ctx.pending] == ["a"]
