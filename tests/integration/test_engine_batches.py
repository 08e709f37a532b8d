"""retrieve_entity, execute_transaction and execute_multiple through the engine, on real
PostgreSQL: Dataverse's semantics (all or nothing with FaultedRequestIndex; each on its
own with ContinueOnError / ReturnResponses and RequestIndex), the ledger, per-row order."""

from __future__ import annotations

from typing import Any

from processor.engine.batches import MAX_REPLY_BYTES
from processor.errors import (
    ConcurrencyVersionMismatch,
    DuplicateRequest,
    EntityNotFound,
    InvalidArgument,
    ObjectDoesNotExist,
    RequestTooLarge,
)
from tests.integration.engine_kit import Kit, delete, retrieve, rid, update


def transaction(*requests: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "type": "execute_transaction",
        "request_id": fields.pop("request_id", None) or rid(),
        "requests": list(requests),
        **fields,
    }


def multiple(*requests: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "type": "execute_multiple",
        "request_id": fields.pop("request_id", None) or rid(),
        "requests": list(requests),
        **fields,
    }


async def test_retrieve_entity_answers_from_the_registry(kit: Kit) -> None:
    outcome = await kit.one({"type": "retrieve_entity", "request_id": rid(), "entity": "item"})
    reply = outcome.reply
    assert reply.status == "success"
    assert reply.type == "retrieve_entity"
    meta = reply.entity_metadata
    assert meta is not None
    assert meta.logical_name == "item"
    assert meta.is_optimistic_concurrency_enabled is True
    assert meta.default_behavior == "AlwaysOverwrite"
    assert (meta.row_version, meta.row_version_column) == ("column", "version")
    assert (meta.key.logical_name, meta.key.type) == ("sku", "text")
    assert [(a.logical_name, a.type) for a in meta.attributes] == [
        ("label", "text"),
        ("counter", "bigint"),
    ]
    strict = (
        await kit.one({"type": "retrieve_entity", "request_id": rid(), "entity": "open_account"})
    ).reply.entity_metadata
    assert strict is not None
    assert strict.is_optimistic_concurrency_enabled is False
    assert strict.row_version == "xmin"
    assert strict.row_version_column is None

    unknown = await kit.one({"type": "retrieve_entity", "request_id": "e-1", "entity": "nope"})
    assert unknown.reply.fault is not None
    assert unknown.reply.fault.code == EntityNotFound.code
    assert unknown.reply.fault.name == "QueryBuilderNoEntity"
    assert unknown.dead_letter
    again = await kit.one({"type": "retrieve_entity", "request_id": "e-1", "entity": "nope"})
    assert again.replayed
    assert again.data == unknown.data


async def test_a_transaction_applies_in_order_and_replies_in_order(kit: Kit) -> None:
    await kit.seed("account", 1, 2)
    await kit.seed("item", "k1")
    v1 = await kit.token("account", 1)
    request = transaction(
        update("account", 1, {"counter": 5}, version=v1, behavior="IfRowVersionMatches"),
        update("account", 1, {"counter": 6}),  # the same row again: its own subtransaction
        retrieve("account", 1),
        update("item", "k1", {"label": "x"}),
        delete("account", 2),
    )
    outcome = await kit.one(request)
    reply = outcome.reply
    assert reply.status == "success", reply.fault
    assert reply.type == "execute_transaction"
    assert reply.responses is not None
    assert [r.request_index for r in reply.responses] == [0, 1, 2, 3, 4]
    assert [r.request_id for r in reply.responses] == [r["request_id"] for r in request["requests"]]
    first, second, read, _, _ = reply.responses
    assert first.row_version != second.row_version  # no two writes share an xmin token
    assert read.attributes is not None
    assert read.attributes["counter"] == 6
    assert read.row_version == second.row_version == await kit.token("account", 1)
    assert await kit.row("account", 2) is None
    # Ledgered: the outer with its whole reply, every inner under its own id.
    outer = await kit.ledger_row(request["request_id"])
    assert outer is not None
    assert outer["reply"] == outcome.data
    assert not outer["applied"]
    for inner in request["requests"]:
        assert await kit.ledger_row(inner["request_id"]) is not None
    again = await kit.one(request)
    assert again.replayed
    assert again.data == outcome.data


async def test_a_failing_request_rolls_the_whole_transaction_back_with_its_index(
    kit: Kit,
) -> None:
    await kit.seed("account", 1, 2, 3)
    before = await kit.snapshot()
    request = transaction(
        update("account", 1, {"counter": 1}),
        delete("account", 2),
        update("account", 3, {"counter": 1}, version="1", behavior="IfRowVersionMatches"),
        update("account", 99, {"counter": 1}),  # would fail too, but later
    )
    outcome = await kit.one(request)
    reply = outcome.reply
    assert reply.status == "fault"
    assert reply.faulted_request_index == 2
    assert reply.fault is not None
    assert reply.fault.code == ConcurrencyVersionMismatch.code
    assert reply.fault.expected_version == "1"
    assert reply.fault.current_version == await kit.token("account", 3)
    assert reply.responses is None
    assert not outcome.dead_letter
    after = await kit.snapshot()
    assert {k: v for k, v in after.items() if k != "ledger"} == {
        k: v for k, v in before.items() if k != "ledger"
    }
    # Only the outer request is ledgered: the inner ones left no trace.
    assert await kit.ledger_count() == 1
    for inner in request["requests"]:
        assert await kit.ledger_row(inner["request_id"]) is None


async def test_the_first_failure_in_request_order_wins_across_rounds(kit: Kit) -> None:
    """Rounds run requests of different rows side by side: request 2 (row 2) fails in the
    first round, request 1 (row 1 again) in the second; 1 comes first in order."""
    await kit.seed("account", 1, 2)
    v1 = await kit.token("account", 1)
    outcome = await kit.one(
        transaction(
            update("account", 1, {"counter": 1}),
            update("account", 1, {"counter": 2}, version=v1, behavior="IfRowVersionMatches"),
            update("account", 2, {"counter": 1}, version="0", behavior="IfRowVersionMatches"),
        )
    )
    assert outcome.reply.faulted_request_index == 1
    assert outcome.reply.fault is not None
    assert outcome.reply.fault.expected_version == v1


async def test_a_value_the_database_refuses_faults_its_own_index(kit: Kit) -> None:
    await kit.seed("account", 1, 2, 3)
    outcome = await kit.one(
        transaction(
            update("account", 1, {"counter": 1}),
            update("account", 2, {"counter": -1}),  # CHECK (counter >= 0)
            update("account", 3, {"counter": 1}),
        )
    )
    assert outcome.reply.faulted_request_index == 1
    assert outcome.reply.fault is not None
    assert outcome.reply.fault.code == InvalidArgument.code
    assert outcome.dead_letter
    assert (await kit.row("account", 1) or {})["counter"] == 0


async def test_a_prepare_failure_faults_at_its_index(kit: Kit) -> None:
    await kit.seed("account", 1)
    outcome = await kit.one(
        transaction(update("account", 1, {"counter": 1}), update("account", 1, {"nope": 1}))
    )
    assert outcome.reply.faulted_request_index == 1
    assert outcome.reply.fault is not None
    assert outcome.reply.fault.path == "attributes.nope"
    assert (await kit.row("account", 1) or {})["counter"] == 0


async def test_an_inner_request_id_already_used_is_a_duplicate(kit: Kit) -> None:
    await kit.seed("account", 1)
    await kit.one(update("account", 1, {"counter": 1}, request_id="used"))
    outcome = await kit.one(
        transaction(update("account", 1, {"counter": 2}), delete("account", 1, request_id="used"))
    )
    assert outcome.reply.faulted_request_index == 1
    assert outcome.reply.fault is not None
    assert outcome.reply.fault.code == DuplicateRequest.code
    assert (await kit.row("account", 1) or {})["counter"] == 1


async def test_multiple_stops_at_the_first_fault_unless_continue_on_error(kit: Kit) -> None:
    await kit.seed("account", 1, 2, 3)
    requests = [
        update("account", 1, {"counter": 1}),
        update("account", 99, {"counter": 1}),
        update("account", 2, {"counter": -1}),
        update("account", 3, {"counter": 1}),
    ]
    stopped = await kit.one(multiple(*requests))
    reply = stopped.reply
    assert reply.status == "success"
    assert reply.is_faulted
    assert reply.responses is not None
    assert [(r.request_index, r.status) for r in reply.responses] == [(0, "success"), (1, "fault")]
    assert reply.responses[1].fault is not None
    assert reply.responses[1].fault.code == ObjectDoesNotExist.code
    assert (await kit.row("account", 1) or {})["counter"] == 1  # each on its own: it stays
    assert (await kit.row("account", 3) or {})["counter"] == 0

    fresh = [{**r, "request_id": rid()} for r in requests]
    went_on = await kit.one(multiple(*fresh, continue_on_error=True))
    assert went_on.reply.responses is not None
    assert [(r.request_index, r.status) for r in went_on.reply.responses] == [
        (0, "success"),
        (1, "fault"),
        (2, "fault"),
        (3, "success"),
    ]
    assert went_on.dead_letter  # the CHECK violation is bad input
    assert (await kit.row("account", 3) or {})["counter"] == 1

    faults_only = await kit.one(
        multiple(
            *[{**r, "request_id": rid()} for r in requests],
            continue_on_error=True,
            return_responses=False,
        )
    )
    assert faults_only.reply.responses is not None
    assert [r.request_index for r in faults_only.reply.responses] == [1, 2]


async def test_multiple_updates_of_one_row_each_get_their_own_version(kit: Kit) -> None:
    await kit.seed("account", 1)
    outcome = await kit.one(multiple(*[update("account", 1, {"counter": n}) for n in range(1, 6)]))
    assert outcome.reply.responses is not None
    versions = [r.row_version for r in outcome.reply.responses]
    assert len(set(versions)) == 5
    assert versions[-1] == await kit.token("account", 1)
    assert (await kit.row("account", 1) or {})["counter"] == 5


async def test_per_row_order_holds_across_batches_in_one_engine_batch(kit: Kit) -> None:
    await kit.seed("account", 1)
    outcomes = await kit.run(
        update("account", 1, {"counter": 1}),
        transaction(update("account", 1, {"counter": 2}), retrieve("account", 1)),
        update("account", 1, {"counter": 3}),
        multiple(retrieve("account", 1), update("account", 1, {"counter": 4})),
        retrieve("account", 1),
    )
    assert [o.reply.status for o in outcomes] == ["success"] * 5
    tx, multi = outcomes[1].reply.responses, outcomes[3].reply.responses
    assert tx is not None
    assert multi is not None
    assert tx[1].attributes is not None
    assert tx[1].attributes["counter"] == 2
    assert multi[0].attributes is not None
    assert multi[0].attributes["counter"] == 3
    assert outcomes[4].reply.attributes is not None
    assert outcomes[4].reply.attributes["counter"] == 4


async def test_a_reply_too_large_to_publish_is_refused_and_nothing_applied(kit: Kit) -> None:
    big = "x" * 2000
    await kit.seed("account", *range(1, 501), label=big)
    request = transaction(*[retrieve("account", n) for n in range(1, 501)])
    outcome = await kit.one(request)
    assert outcome.reply.fault is not None
    assert outcome.reply.fault.code == RequestTooLarge.code
    assert len(outcome.data) < MAX_REPLY_BYTES
    writes = multiple(
        update("account", 1, {"counter": 1}), *[retrieve("account", n) for n in range(1, 501)]
    )
    refused = await kit.one(writes)
    assert refused.reply.fault is not None
    assert refused.reply.fault.code == RequestTooLarge.code
    assert (await kit.row("account", 1) or {})["counter"] == 0
    assert await kit.ledger_row(writes["requests"][0]["request_id"]) is None
