"""Redelivery and replay: the ledger returns the first reply, byte for byte, applying nothing.

A request_id is the idempotency key, forever (the ledger outlives the topic). The same
request again, in the same batch or any later one, gets the stored reply with
replayed=True; the same request_id with different content is DuplicateRecord and the first
outcome stands.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from processor.errors import DuplicateRequest
from tests.integration.engine_kit import (
    FLAVORS,
    Flavor,
    Kit,
    delete,
    related,
    retrieve,
    update,
)


def _messages(flavor: Flavor) -> dict[str, dict[str, Any]]:
    """One request of each outcome kind, all on seeded rows (key 1..3; key 9 is missing)."""
    return {
        "update": update(flavor.plain, flavor.key(1), {"label": "u", "counter": 1}),
        "update-related": update(
            flavor.plain,
            flavor.key(2),
            {"label": "m"},
            related=[related(flavor.plain, flavor.key(3), {"label": "r"})],
        ),
        "retrieve": retrieve(flavor.plain, flavor.key(1)),
        "delete": delete(flavor.strict, flavor.key(1), behavior="AlwaysOverwrite"),
        "mismatch": update(flavor.plain, flavor.key(1), {"label": "x"}, version="0", behavior=1),
        "missing": update(flavor.plain, flavor.key(9), {"label": "x"}),
        "no-entity": update("nosuch", 1, {"label": "x"}),
    }


async def _seed(kit: Kit, flavor: Flavor) -> None:
    await kit.seed(flavor.plain, flavor.key(1), flavor.key(2), flavor.key(3))
    await kit.seed(flavor.strict, flavor.key(1))


@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_redelivery_in_a_later_batch_replays_byte_identical(kit: Kit, flavor: Flavor) -> None:
    """Every kind of outcome, delivered again later: the same bytes, replayed=True, not
    applied, and neither the tables nor the ledger change."""
    await _seed(kit, flavor)
    messages = _messages(flavor)
    first = await kit.run(*messages.values())
    assert [o.replayed for o in first] == [False] * len(messages)
    assert [o.applied for o in first] == [True, True, False, True, False, False, False]
    before = await kit.snapshot()
    ledger_size = await kit.ledger_count()
    assert ledger_size == len(messages)
    for attempt in range(2):
        kit.clock.advance(timedelta(hours=1))
        again = await kit.run(*messages.values())
        for name, a, b in zip(messages, first, again, strict=True):
            assert b.data == a.data, (name, attempt)
            assert b.reply == a.reply
            assert b.replayed, name
            assert not b.applied, name
            assert b.dead_letter == a.dead_letter
        assert await kit.snapshot() == before
    assert await kit.ledger_count() == ledger_size


@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_redelivery_in_the_same_batch_is_applied_once(kit: Kit, flavor: Flavor) -> None:
    """The same envelope twice in one batch: the first applies, the second echoes its reply
    byte for byte with replayed=True; one ledger entry, one write."""
    await _seed(kit, flavor)
    message = update(flavor.plain, flavor.key(1), {"label": "once"})
    prior = await kit.token(flavor.plain, flavor.key(1))
    first, second, third = await kit.run(message, message, message)
    assert first.applied
    assert not first.replayed
    for echo in (second, third):
        assert echo.replayed
        assert not echo.applied
        assert echo.data == first.data
    assert await kit.token(flavor.plain, flavor.key(1)) == first.reply.row_version
    entry = await kit.ledger_row(message["request_id"])
    assert entry is not None
    assert entry["reply"] == first.data
    assert entry["writes"] is not None
    assert json.loads(entry["writes"]) == [
        {
            "entity": flavor.plain,
            "id": flavor.key(1),
            "prior": prior,
            "new": first.reply.row_version,
        }
    ]
    assert await kit.ledger_count() == 1
    # Applied once: a version column moved by exactly one.
    if flavor.name == "version":
        assert first.reply.row_version == str(int(prior or "0") + 1)


async def test_replay_does_not_reapply_after_later_writes(kit: Kit) -> None:
    """A replayed old update does not overwrite what later requests wrote."""
    await kit.seed("account", 1)
    old = update("account", 1, {"label": "old"})
    await kit.run(old)
    await kit.run(update("account", 1, {"label": "newer"}))
    token = await kit.token("account", 1)
    (replay,) = await kit.run(old)
    assert replay.replayed
    row = await kit.row("account", 1)
    assert row is not None
    assert row["label"] == "newer"
    assert await kit.token("account", 1) == token


async def test_replay_of_a_fault_is_the_fault_even_if_it_would_now_succeed(kit: Kit) -> None:
    """The first outcome stands: an update of a missing row, redelivered after the row
    appears, replays ObjectDoesNotExist and writes nothing."""
    message = update("account", 5, {"label": "x"})
    (first,) = await kit.run(message)
    assert first.reply.fault is not None
    assert first.reply.fault.name == "ObjectDoesNotExist"
    await kit.seed("account", 5, label="created later")
    (again,) = await kit.run(message)
    assert again.replayed
    assert again.data == first.data
    row = await kit.row("account", 5)
    assert row is not None
    assert row["label"] == "created later"


async def test_replay_after_the_deadline_returns_the_success(kit: Kit) -> None:
    """A request applied before its expires_at, redelivered after it, replays its success
    (it is not re-judged as RequestExpired)."""
    await kit.seed("account", 1)
    message = update("account", 1, {"label": "x"}, expires_at=kit.clock.now + timedelta(seconds=5))
    (first,) = await kit.run(message)
    assert first.reply.status == "success"
    kit.clock.advance(timedelta(days=1))
    (again,) = await kit.run(message)
    assert again.replayed
    assert again.data == first.data


async def test_same_request_in_another_spelling_is_a_replay(kit: Kit) -> None:
    """Key order and 1 vs "IfRowVersionMatches" do not make a different request."""
    await kit.seed("account", 1)
    token = await kit.token("account", 1)
    message = update("account", 1, {"label": "x", "counter": 2}, version=token, behavior=1)
    (first,) = await kit.run(message)
    assert first.reply.status == "success"
    respelt = {k: message[k] for k in reversed(list(message))}
    respelt["attributes"] = {"counter": 2, "label": "x"}
    respelt["concurrency_behavior"] = "IfRowVersionMatches"
    (again,) = await kit.run(json.dumps(respelt).encode())
    assert again.replayed
    assert again.data == first.data


@pytest.mark.parametrize(
    "change",
    [
        {"attributes": {"label": "different"}},
        {"id": 2},
        {"concurrency_behavior": "AlwaysOverwrite"},
        {"row_version": "123"},
        {"type": "delete", "attributes": None},
    ],
    ids=["attributes", "id", "behavior", "row_version", "type"],
)
async def test_same_request_id_other_payload_is_duplicate_record(
    kit: Kit, change: dict[str, Any]
) -> None:
    """DuplicateRecord, dead-lettered, nothing applied; the ledger keeps the first entry and
    a redelivery of the first request still replays the first reply."""
    await kit.seed("account", 1, 2)
    original = update("account", 1, {"label": "first"})
    (first,) = await kit.run(original)
    before = await kit.snapshot()
    other = {k: v for k, v in {**original, **change}.items() if v is not None}
    (dup,) = await kit.run(other)
    assert dup.reply.fault is not None
    assert (dup.reply.fault.code, dup.reply.fault.name) == (
        DuplicateRequest.code,
        "DuplicateRecord",
    )
    assert dup.reply.request_id == original["request_id"]
    assert not dup.applied
    assert not dup.replayed
    assert dup.dead_letter
    assert await kit.snapshot() == before  # not even a ledger entry
    (again,) = await kit.run(original)
    assert again.replayed
    assert again.data == first.data


async def test_duplicate_request_id_within_one_batch(kit: Kit) -> None:
    """In one batch the first occurrence wins; a different payload with its id faults
    DuplicateRecord, an identical one is echoed."""
    await kit.seed("account", 1, 2)
    a = update("account", 1, {"label": "a"}, request_id="same")
    b = update("account", 2, {"label": "b"}, request_id="same")
    first, dup, echo = await kit.run(a, b, a)
    assert first.reply.status == "success"
    assert first.applied
    assert dup.reply.fault is not None
    assert dup.reply.fault.name == "DuplicateRecord"
    assert not dup.applied
    assert echo.replayed
    assert echo.data == first.data
    row2 = await kit.row("account", 2)
    assert row2 is not None
    assert row2["label"] == ""
    entry = await kit.ledger_row("same")
    assert entry is not None
    assert entry["reply"] == first.data
    assert await kit.ledger_count() == 1


async def test_duplicate_of_a_faulted_request_is_still_a_duplicate(kit: Kit) -> None:
    """A request_id that faulted (and was ledgered) cannot be reused for another request:
    retries after a mismatch need a new request_id."""
    await kit.seed("account", 1)
    (mismatch,) = await kit.run(
        update("account", 1, {"label": "x"}, version="0", behavior=1, request_id="retry-me")
    )
    assert mismatch.reply.fault is not None
    token = await kit.token("account", 1)
    (dup,) = await kit.run(
        update("account", 1, {"label": "x"}, version=token, behavior=1, request_id="retry-me")
    )
    assert dup.reply.fault is not None
    assert dup.reply.fault.name == "DuplicateRecord"
    assert await kit.token("account", 1) == token
    (fresh,) = await kit.run(update("account", 1, {"label": "x"}, version=token, behavior=1))
    assert fresh.reply.status == "success"
