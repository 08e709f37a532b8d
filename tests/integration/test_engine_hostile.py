"""Malformed and hostile requests get their documented fault and write nothing.

Each case runs in a batch between good requests (the way the worker sees them: decoded
first, then one engine batch): the good ones still apply, the bad one changes no row, and
names from the request never reach SQL text.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest

from processor.engine.engine import Outcome
from processor.errors import AttributeNotFound, EntityNotFound, Fault, InvalidArgument
from tests.integration.engine_kit import Kit, related, update

MB = 1024 * 1024


@pytest.fixture
async def kit(kit: Kit, pg: asyncpg.Connection) -> Kit:
    """The shared kit (tests/integration/conftest.py), with these tests' rows."""
    k = kit
    await k.seed("account", 1, 2, 3)
    await k.seed("item", "k1")
    await k.seed("typed", 1, 2)
    await pg.execute(f"UPDATE {k.table('typed')} SET email = 'taken@example.com' WHERE id = 2")
    return k


def _base(**fields: Any) -> dict[str, Any]:
    return {"type": "update", "request_id": "bad-1", "entity": "account", "id": 1} | fields


async def _run_between_good_ones(
    kit: Kit, bad: dict[str, Any] | bytes
) -> Outcome | InvalidArgument:
    """Run [good, bad, good]; check the good ones applied and the bad one wrote nothing."""
    before = await kit.snapshot()
    good_a = update("account", 2, {"label": "good-a"})
    good_b = update("item", "k1", {"label": "good-b"})
    first, result, last = await kit.submit(good_a, bad, good_b)
    for good in (first, last):
        assert isinstance(good, Outcome)
        assert good.reply.status == "success", good.reply.fault
        assert good.applied
    after = await kit.snapshot()
    row_a, row_b = await kit.row("account", 2), await kit.row("item", "k1")
    assert row_a is not None
    assert row_a["label"] == "good-a"
    assert row_b is not None
    assert row_b["label"] == "good-b"
    # Apart from the two good rows (and the ledger), nothing changed.
    for table in after:
        if table in ("account", "item", "ledger"):
            continue
        assert after[table] == before[table], table
    account_before = [r for r in before["account"] if r[0] != 2]
    account_after = [r for r in after["account"] if r[0] != 2]
    assert account_after == account_before
    return result


def _assert_fault(result: Outcome | InvalidArgument, fault: type[Fault], path: str | None) -> str:
    """The documented fault, at the documented path; returns its message."""
    if isinstance(result, InvalidArgument):  # rejected by decode_request, never in the engine
        assert fault is InvalidArgument
        assert result.path == path
        return result.message
    assert not result.applied
    reply = result.reply
    assert reply.status == "fault"
    assert reply.fault is not None
    assert (reply.fault.code, reply.fault.name) == (fault.code, fault.name)
    assert reply.fault.path == path
    assert result.dead_letter
    return reply.fault.message


# -- not a request at all ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "path"),
    [
        (b"", None),
        (b"{", None),
        (b"\x00\x01\x02", None),
        (b'{"type": "update", "request_id": "r",', None),
        (b"[]", None),
        (
            b'{"type":"update","request_id":"r","entity":"account","id":1,"attributes":{"a":'
            + b"[" * 5000
            + b"]" * 5000
            + b"}}",
            None,
        ),
        (json.dumps(_base(attributes={"label": "x"}, id=1.5)).encode(), "id"),
        (json.dumps(_base(attributes=["label", "x"])).encode(), "attributes"),
        (
            json.dumps(_base(attributes={"label": "x"}, related={"entity": "item"})).encode(),
            "related",
        ),
        (
            json.dumps(_base(attributes={"label": "x"}, concurrency_behavior="1")).encode(),
            "concurrency_behavior",
        ),
        (json.dumps(_base(attributes={"label": "x"}, row_version=123)).encode(), "row_version"),
        (json.dumps(_base(attributes={"label": "x"}, id=None)).encode(), "id"),
    ],
    ids=[
        "empty",
        "truncated",
        "binary",
        "cut",
        "array",
        "deep",
        "float-id",
        "list-attributes",
        "related-object",
        "behavior-string-number",
        "numeric-version",
        "null-id",
    ],
)
async def test_undecodable_messages_are_invalid_argument(
    kit: Kit, data: bytes, path: str | None
) -> None:
    """Bad JSON and wrong types never reach the engine: InvalidArgument with the path."""
    _assert_fault(await _run_between_good_ones(kit, data), InvalidArgument, path)


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"request_id": "r" * 10_000}, "request_id"),
        ({"request_id": "a\x00b"}, "request_id"),
        ({"entity": "e" * 10_000}, "entity"),
        ({"entity": "account\x00"}, "entity"),
        ({"id": "k\x00"}, "id"),
        ({"attributes": {"a" * 10_000: 1}}, "attributes"),
        ({"attributes": {f"c{i}": i for i in range(1001)}}, "attributes"),
        ({"related": [related("account", i, {"label": "x"}) for i in range(101)]}, "related"),
        ({"row_version": "9" * 1000}, "row_version"),
        ({"reply_to": "x" * 300}, "reply_to"),
        ({"reply_to": "topic; rm -rf /"}, "reply_to"),
    ],
    ids=[
        "long-request-id",
        "nul-request-id",
        "long-entity",
        "nul-entity",
        "nul-id",
        "long-attribute",
        "1001-attributes",
        "101-related",
        "long-version",
        "long-reply-to",
        "shell-reply-to",
    ],
)
async def test_decoder_limits_reject_huge_and_nul_fields(
    kit: Kit, fields: dict[str, Any], path: str
) -> None:
    """decode_request's bounds: oversized fields and NUL bytes (PostgreSQL text cannot hold
    them) are InvalidArgument at their path."""
    message = _base(attributes={"label": "x"}) | fields
    _assert_fault(
        await _run_between_good_ones(kit, json.dumps(message).encode()), InvalidArgument, path
    )


# -- names that are not in the registry -------------------------------------------------------


@pytest.mark.parametrize(
    "entity",
    [
        'account"; DROP TABLE account; --',
        "account'",
        "account;",
        "ACCOUNT",
        "Account",
        "public.account",
        "request_ledger",
        "pg_class",
        "e" * 63,
        "accöunt",
    ],
)
async def test_hostile_entity_names_fault_no_entity(kit: Kit, entity: str) -> None:
    """Entity names are looked up in the registry, never quoted into SQL: anything else is
    QueryBuilderNoEntity."""
    message = _base(entity=entity, attributes={"label": "x"})
    message = message | {"request_id": "r-entity"}
    _assert_fault(await _run_between_good_ones(kit, message), EntityNotFound, None)
    assert await kit.count("account") == 3


@pytest.mark.parametrize(
    "name",
    [
        "label\" = 'x'; DROP TABLE account; --",
        "label;",
        "Label",
        "LABEL",
        "label ",
        "id",  # the key is not writable
        "xmin",
        "ctid",
        "tableoid",
        "x" * 63,
        "",
        "label\x00",
    ],
)
async def test_hostile_attribute_names_fault_no_attribute(kit: Kit, name: str) -> None:
    """Attribute names outside the entity's writable columns: QueryBuilderNoAttribute at
    attributes.<name> (at most 63 characters of it)."""
    message = _base(request_id="r-attr", attributes={"label": "fine", name: "x"})
    _assert_fault(
        await _run_between_good_ones(kit, message), AttributeNotFound, f"attributes.{name[:63]}"
    )


async def test_version_column_is_not_writable(kit: Kit) -> None:
    """A version-column entity's version cannot be set by a request."""
    message = update("item", "k1", {"version": 1000}, request_id="r-version")
    _assert_fault(
        await _run_between_good_ones(kit, message), AttributeNotFound, "attributes.version"
    )


async def test_hostile_names_in_related_entities_name_the_related_path(kit: Kit) -> None:
    """The same rules for related entities, with related[i] in the path."""
    for rel, fault, path in [
        (related('item"; --', "k1", {"label": "x"}), EntityNotFound, "related[0]"),
        (
            related("item", "k1", {"label; --": "x"}),
            AttributeNotFound,
            "related[0].attributes.label; --",
        ),
        (related("item", 5, {"label": "x"}), InvalidArgument, "related[0].id"),
    ]:
        message = update("account", 1, {"label": "x"}, related=[rel])
        _assert_fault(await _run_between_good_ones(kit, message), fault, path)


# -- ids that do not fit the key ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entity", "id"),
    [
        ("account", "1"),
        ("account", "1; DROP TABLE account"),
        ("account", 2**31),
        ("account", -(2**31) - 1),
        ("account", 2**64),
        ("item", 1),
    ],
)
async def test_ids_that_do_not_fit_the_key_are_invalid(
    kit: Kit, entity: str, id: int | str
) -> None:
    """An integer key needs an integer in its range; a text key a string: InvalidArgument
    at id."""
    message = update(entity, id, {"label": "x"}, request_id="r-id")
    _assert_fault(await _run_between_good_ones(kit, message), InvalidArgument, "id")


async def test_hostile_text_key_is_just_a_missing_row(kit: Kit) -> None:
    """A text key full of SQL is a value like any other: the row does not exist."""
    message = update("item", "k1' OR '1'='1", {"label": "x"}, request_id="r-key")
    result = await _run_between_good_ones(kit, message)
    assert isinstance(result, Outcome)
    assert result.reply.fault is not None
    assert result.reply.fault.name == "ObjectDoesNotExist"


# -- values the column rejects ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "path"),
    [
        ({"name": None}, "attributes.name"),  # NOT NULL
        ({"small": 40_000}, "attributes.small"),  # smallint overflow
        ({"big": 2**63}, "attributes.big"),  # bigint overflow
        ({"big": 1.5}, "attributes.big"),
        ({"small": "1"}, "attributes.small"),  # wrong type
        ({"ratio": "NaN"}, "attributes.ratio"),
        ({"amount": True}, "attributes.amount"),
        ({"flag": "yes"}, "attributes.flag"),
        ({"flag": 1}, "attributes.flag"),
        ({"note": 5}, "attributes.note"),
        ({"note": "a\x00b"}, "attributes.note"),  # NUL in text
        ({"born": 20300101}, "attributes.born"),
        ({"tags": "x"}, "attributes.tags"),
        ({"uid": 5}, "attributes.uid"),
    ],
)
async def test_values_rejected_before_the_database(
    kit: Kit, attributes: dict[str, Any], path: str
) -> None:
    """Type, range, NOT NULL and NUL checks the engine does itself: InvalidArgument at
    attributes.<column>."""
    message = update("typed", 1, attributes, request_id="r-value")
    _assert_fault(await _run_between_good_ones(kit, message), InvalidArgument, path)


@pytest.mark.parametrize(
    ("attributes", "message_part"),
    [
        ({"amount": -1}, "check constraint"),
        ({"amount": 12345.67}, "numeric field overflow"),  # numeric(6,2)
        ({"amount": 10**30}, "numeric field overflow"),
        ({"code": "abcdef"}, "value too long"),  # varchar(5)
        ({"born": "not a date"}, "invalid input syntax for type date"),
        ({"uid": "not-a-uuid"}, "invalid input syntax for type uuid"),
        # "... is out of range for type double precision", but the message quotes the
        # 401-digit value first and is cut at 300 characters.
        ({"ratio": 10**400}, '"10000000000'),
        ({"email": "taken@example.com"}, "unique constraint"),
        ({"meta": {"k": "\x00"}}, "Unicode escape"),  # jsonb cannot hold NUL either
        ({"rank": 0}, "violates check constraint"),  # a domain's CHECK
        ({"rank": None}, "does not allow null values"),  # a NOT NULL domain
    ],
)
async def test_values_the_database_rejects_fault_only_their_request(
    kit: Kit, attributes: dict[str, Any], message_part: str
) -> None:
    """A CHECK, an overflow, a bad literal or a unique violation: the batch is redone one
    request per savepoint, only this request faults InvalidArgument (PostgreSQL does not
    say which column, so there is no path), and the others apply."""
    message = update("typed", 1, attributes, request_id="r-db")
    text = _assert_fault(await _run_between_good_ones(kit, message), InvalidArgument, None)
    assert "the database rejected a value" in text
    assert message_part in text


async def test_constraint_violation_in_related_row_rolls_back_the_request(kit: Kit) -> None:
    """A related row's bad value rolls back the main row too; the batch's others apply."""
    message = update(
        "account",
        1,
        {"label": "main"},
        request_id="r-rel-db",
        related=[related("item", "k1", {"counter": -5})],
    )
    _assert_fault(await _run_between_good_ones(kit, message), InvalidArgument, None)


async def test_huge_valid_value_is_written_intact(kit: Kit) -> None:
    """Size is the intake's concern (RequestTooLarge): a 2 MB text value is just a value."""
    big = "x" * (2 * MB)
    (outcome,) = await kit.run(update("typed", 1, {"note": big, "meta": {"k": ["y" * 1000] * 100}}))
    assert outcome.reply.status == "success"
    row = await kit.row("typed", 1)
    assert row is not None
    assert row["note"] == big


async def test_batch_with_several_bad_values_applies_every_good_request(kit: Kit) -> None:
    """Isolation mode: three constraint violations among six requests; exactly the three
    good ones apply, each with its own token, and each bad one faults alone."""
    await kit.seed("typed", 3, 4, 5, 6)
    messages = [
        update("typed", 1, {"name": "ok-1"}),
        update("typed", 3, {"amount": -1}),
        update("typed", 4, {"name": "ok-4"}),
        update("typed", 5, {"email": "taken@example.com"}),
        update("typed", 6, {"code": "toolong"}),
        update("typed", 6, {"name": "ok-6"}),
    ]
    before = {key: await kit.token("typed", key) for key in (3, 5)}
    outcomes = await kit.run(*messages)
    assert [o.reply.status for o in outcomes] == [
        "success",
        "fault",
        "success",
        "fault",
        "fault",
        "success",
    ]
    for o in outcomes:
        if o.reply.fault is not None:
            assert o.reply.fault.name == "InvalidArgument"
            assert not o.applied
    names = {k: (await kit.row("typed", k) or {}).get("name") for k in (1, 3, 4, 5, 6)}
    assert names == {1: "ok-1", 3: "", 4: "ok-4", 5: "", 6: "ok-6"}
    row6 = await kit.row("typed", 6)
    assert row6 is not None
    assert row6["code"] is None
    assert {key: await kit.token("typed", key) for key in (3, 5)} == before
    tokens = [o.reply.row_version for o in outcomes if o.reply.status == "success"]
    assert len(set(tokens)) == 3
    assert await kit.ledger_count() == 6
