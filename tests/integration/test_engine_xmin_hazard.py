"""The xmin hazard: one transaction writing a row twice must not hand out one token twice.

Every row written by one transaction gets that transaction's xid as xmin. If a batch (one
commit) applied two writes to the same row in the same (sub)transaction, both replies
would carry the same token, and a client holding the first token could overwrite the
second write unseen. These tests prove that every write in a batch hands out its own
token, equal to the row's version right after that write, and that earlier tokens are
dead afterwards; for xmin and for version-column entities.
"""

from __future__ import annotations

import pytest

from processor.engine.engine import Engine, Outcome
from tests.integration.engine_kit import (
    FLAVORS,
    VERSION,
    Flavor,
    Kit,
    envelope,
    related,
    retrieve,
    update,
)


def _tokens(outcomes: list[Outcome]) -> list[str]:
    tokens = []
    for outcome in outcomes:
        assert outcome.reply.status == "success", outcome.reply.fault
        assert outcome.reply.row_version is not None
        tokens.append(outcome.reply.row_version)
    return tokens


async def _assert_stale(
    kit: Kit, flavor: Flavor, entity: str, key: int | str, tokens: list[str]
) -> None:
    """A client holding any of these tokens is refused (and writes nothing)."""
    current = await kit.token(entity, key)
    for token in tokens:
        outcome = await kit.one(update(entity, key, {"label": "lost"}, version=token, behavior=1))
        assert outcome.reply.fault is not None, f"token {token} still accepted ({flavor})"
        assert outcome.reply.fault.name == "ConcurrencyVersionMismatch"
        assert outcome.reply.fault.current_version == current
    assert await kit.token(entity, key) == current


@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_writes_to_one_row_in_one_batch_get_distinct_tokens(kit: Kit, flavor: Flavor) -> None:
    """Five overwrites of one row in one batch: five distinct tokens, each the row's version
    right after that write (a retrieve between writes reads it back), the last one current;
    every earlier token is then refused."""
    key = flavor.key(1)
    await kit.seed(flavor.plain, key)
    initial = await kit.token(flavor.plain, key)
    messages = []
    for n in range(5):
        messages.append(update(flavor.plain, key, {"label": f"w{n}", "counter": n}))
        messages.append(retrieve(flavor.plain, key))
    outcomes = await kit.run(*messages)
    writes, reads = outcomes[0::2], outcomes[1::2]
    write_tokens = _tokens(writes)
    assert len(set(write_tokens)) == 5
    assert initial not in write_tokens
    assert _tokens(reads) == write_tokens  # each write's token is the row's version after it
    for n, read in enumerate(reads):
        assert read.reply.attributes is not None
        assert read.reply.attributes["label"] == f"w{n}"
    assert await kit.token(flavor.plain, key) == write_tokens[-1]
    row = await kit.row(flavor.plain, key)
    assert row is not None
    assert row["label"] == "w4"
    # The ledger's version chain links the writes in order.
    chain = []
    for outcome in writes:
        entry = await kit.ledger_row(outcome.reply.request_id)
        assert entry is not None
        chain.append(entry["writes"])
    previous = initial
    for token, writes_json in zip(write_tokens, chain, strict=True):
        assert f'"prior": "{previous}"' in writes_json
        assert f'"new": "{token}"' in writes_json
        previous = token
    await _assert_stale(kit, flavor, flavor.plain, key, [initial or "", *write_tokens[:-1]])


async def test_version_column_chain_in_one_batch_succeeds_in_order(kit: Kit) -> None:
    """IfRowVersionMatches updates in one batch, each using the previous reply's token
    (predictable for a version column: +1), all succeed in order; a stale one in the middle
    faults and does not break the chain."""
    await kit.seed("item", "k1")
    assert await kit.token("item", "k1") == "1"
    messages = [
        update("item", "k1", {"label": "a"}, version="1", behavior=1),
        update("item", "k1", {"label": "b"}, version="2", behavior=1),
        update("item", "k1", {"label": "stale"}, version="2", behavior=1),
        update("item", "k1", {"label": "c"}, version="3", behavior=1),
    ]
    outcomes = await kit.run(*messages)
    assert [o.reply.row_version for o in outcomes] == ["2", "3", None, "4"]
    assert outcomes[2].reply.fault is not None
    assert outcomes[2].reply.fault.current_version == "3"
    row = await kit.row("item", "k1")
    assert row is not None
    assert (row["label"], row["version"]) == ("c", 4)


@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_chained_if_row_version_matches_across_batches(kit: Kit, flavor: Flavor) -> None:
    """Batches of several writes to one row: the next batch's IfRowVersionMatches with the
    previous batch's last token succeeds, with its first token it is refused."""
    key = flavor.key(1)
    await kit.seed(flavor.plain, key)
    token = await kit.token(flavor.plain, key)
    for batch in range(3):
        outcomes = await kit.run(
            update(flavor.plain, key, {"label": f"b{batch}-0"}, version=token, behavior=1),
            update(flavor.plain, key, {"label": f"b{batch}-1"}),
            update(flavor.plain, key, {"label": f"b{batch}-2"}),
        )
        tokens = _tokens(outcomes)
        assert len(set(tokens)) == 3
        await _assert_stale(kit, flavor, flavor.plain, key, tokens[:2])
        token = tokens[-1]
    row = await kit.row(flavor.plain, key)
    assert row is not None
    assert row["label"] == "b2-2"


@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_related_row_shared_across_requests_gets_distinct_tokens(
    kit: Kit, flavor: Flavor
) -> None:
    """A related row written by three requests of one batch (twice as related, once as the
    main row) reports three distinct tokens, each its version right after that write."""
    shared = flavor.key(100)
    await kit.seed(flavor.plain, flavor.key(1), flavor.key(2), shared)
    outcomes = await kit.run(
        update(
            flavor.plain,
            flavor.key(1),
            {"label": "m1"},
            related=[related(flavor.plain, shared, {"label": "s1"})],
        ),
        retrieve(flavor.plain, shared),
        update(
            flavor.plain,
            flavor.key(2),
            {"label": "m2"},
            related=[related(flavor.plain, shared, {"label": "s2"})],
        ),
        retrieve(flavor.plain, shared),
        update(flavor.plain, shared, {"label": "s3"}),
        retrieve(flavor.plain, shared),
    )
    for outcome in outcomes:
        assert outcome.reply.status == "success", outcome.reply.fault
    first, second = outcomes[0].reply.related, outcomes[2].reply.related
    assert first is not None
    assert second is not None
    shared_tokens = [first[0].row_version, second[0].row_version, outcomes[4].reply.row_version]
    assert len(set(shared_tokens)) == 3
    assert [outcomes[i].reply.row_version for i in (1, 3, 5)] == shared_tokens
    # The main rows' tokens are current.
    assert outcomes[0].reply.row_version == await kit.token(flavor.plain, flavor.key(1))
    assert outcomes[2].reply.row_version == await kit.token(flavor.plain, flavor.key(2))
    await _assert_stale(kit, flavor, flavor.plain, shared, [str(t) for t in shared_tokens[:2]])


@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_distinct_tokens_survive_the_isolation_redo(kit: Kit, flavor: Flavor) -> None:
    """A constraint violation makes the engine redo the batch one request per savepoint;
    writes to one row still get distinct tokens and the guilty request alone faults."""
    key = flavor.key(1)
    await kit.seed(flavor.plain, key, flavor.key(2))
    outcomes = await kit.run(
        update(flavor.plain, key, {"label": "a"}),
        update(flavor.plain, key, {"label": "b"}),
        update(flavor.plain, flavor.key(2), {"counter": -1}),  # CHECK (counter >= 0)
        update(flavor.plain, key, {"label": "c"}),
    )
    assert outcomes[2].reply.fault is not None
    assert outcomes[2].reply.fault.name == "InvalidArgument"
    tokens = _tokens([outcomes[0], outcomes[1], outcomes[3]])
    assert len(set(tokens)) == 3
    assert await kit.token(flavor.plain, key) == tokens[-1]
    await _assert_stale(kit, flavor, flavor.plain, key, tokens[:2])


@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_distinct_tokens_when_a_hot_row_splits_the_batch(kit: Kit, flavor: Flavor) -> None:
    """More writes to one row than rounds per transaction: the batch is split into several
    commits, and every token is still distinct and in order."""
    engine = Engine(kit.registry, kit.ledger, clock=kit.clock, max_rounds=3)
    key = flavor.key(1)
    await kit.seed(flavor.plain, key)
    messages = [update(flavor.plain, key, {"label": f"w{n}"}) for n in range(10)]
    outcomes = await engine.process(kit.pg, [envelope(m) for m in messages])
    tokens = _tokens(outcomes)
    assert len(set(tokens)) == 10
    if flavor is VERSION:
        assert tokens == [str(n) for n in range(2, 12)]
    assert await kit.token(flavor.plain, key) == tokens[-1]
    row = await kit.row(flavor.plain, key)
    assert row is not None
    assert row["label"] == "w9"
    await _assert_stale(kit, flavor, flavor.plain, key, tokens[:-1])


@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_delete_between_writes_in_one_batch(kit: Kit, flavor: Flavor) -> None:
    """update, delete, update of one row in one batch: the second update finds no row and
    faults ObjectDoesNotExist; the row stays deleted."""
    key = flavor.key(1)
    await kit.seed(flavor.plain, key)
    outcomes = await kit.run(
        update(flavor.plain, key, {"label": "a"}),
        {"type": "delete", "request_id": "del-1", "entity": flavor.plain, "id": key},
        update(flavor.plain, key, {"label": "b"}),
    )
    assert [o.reply.status for o in outcomes] == ["success", "success", "fault"]
    assert outcomes[2].reply.fault is not None
    assert outcomes[2].reply.fault.name == "ObjectDoesNotExist"
    assert await kit.row(flavor.plain, key) is None
