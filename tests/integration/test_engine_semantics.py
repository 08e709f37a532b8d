"""Dataverse's optimistic-concurrency semantics, cell by cell, on real PostgreSQL.

Every cell runs for update and delete, and for an ``xmin`` entity and a version-column
entity. After each request the database is checked: a fault writes nothing but its ledger
entry, a success writes exactly its row(s) and hands out the row's new version.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from processor.engine.engine import Outcome
from processor.errors import (
    AttributeNotFound,
    ConcurrencyVersionMismatch,
    ConcurrencyVersionNotProvided,
    EntityNotFound,
    Fault,
    InvalidArgument,
    ObjectDoesNotExist,
    OptimisticConcurrencyNotEnabled,
    RequestExpired,
)
from tests.integration.engine_kit import (
    FLAVORS,
    VERSION,
    XMIN,
    Flavor,
    Kit,
    delete,
    related,
    retrieve,
    update,
)

OPS = ["update", "delete"]
IF_MATCH = ["IfRowVersionMatches", 1]
OVERWRITE = ["AlwaysOverwrite", 2]
DEFAULT = ["Default", 0, None]  # None: the field left out


def _request(
    op: str,
    entity: str,
    key: int | str,
    *,
    version: str | None = None,
    behavior: str | int | None = None,
) -> dict[str, Any]:
    if op == "update":
        return update(entity, key, {"label": "new"}, version=version, behavior=behavior)
    return delete(entity, key, version=version, behavior=behavior)


def _assert_fault(outcome: Outcome, fault: type[Fault], path: str | None = None) -> None:
    reply = outcome.reply
    assert reply.status == "fault", reply
    assert reply.fault is not None
    assert (reply.fault.code, reply.fault.name) == (fault.code, fault.name)
    assert reply.fault.retryable is fault.retryable
    assert reply.fault.path == path
    assert reply.row_version is None
    assert not outcome.applied
    assert not outcome.replayed
    assert outcome.dead_letter is fault.dead_letter


async def _assert_only_ledger_changed(
    kit: Kit, before: dict[str, Any], outcome: Outcome, *, recorded: bool = True
) -> None:
    """The tables are as they were; the ledger holds the fault (and nothing was applied)."""
    after = await kit.snapshot()
    assert {k: v for k, v in after.items() if k != "ledger"} == {
        k: v for k, v in before.items() if k != "ledger"
    }
    entry = await kit.ledger_row(outcome.reply.request_id)
    if not recorded:
        assert entry is None
        return
    assert entry is not None
    assert entry["status"] == "fault"
    assert entry["applied"] is False
    assert entry["writes"] is None
    assert entry["reply"] == outcome.data
    assert outcome.reply.fault is not None
    assert entry["fault_code"] == outcome.reply.fault.code


async def _assert_applied(
    kit: Kit, op: str, flavor: Flavor, entity: str, key: int | str, outcome: Outcome, prior: str
) -> None:
    """The write happened: an update changed the row and returned its new token; a delete
    removed it. The ledger records the prior and new versions."""
    reply = outcome.reply
    assert reply.status == "success", reply.fault
    assert reply.fault is None
    assert outcome.applied
    assert not outcome.replayed
    assert not outcome.dead_letter
    entry = await kit.ledger_row(reply.request_id)
    assert entry is not None
    assert entry["applied"] is True
    assert entry["status"] == "success"
    if op == "update":
        row = await kit.row(entity, key)
        assert row is not None
        assert row["label"] == "new"
        token = await kit.token(entity, key)
        assert reply.row_version == token
        assert reply.row_version != prior
        if flavor is VERSION:
            assert reply.row_version == str(int(prior) + 1)
        assert entry["writes"] is not None
        assert f'"prior": "{prior}"' in entry["writes"]
        assert f'"new": "{token}"' in entry["writes"]
    else:
        assert await kit.row(entity, key) is None
        assert reply.row_version is None


# -- entity unknown ---------------------------------------------------------------------------


@pytest.mark.parametrize("op", [*OPS, "retrieve"])
async def test_unknown_entity_faults_query_builder_no_entity(kit: Kit, op: str) -> None:
    """An entity outside the registry: QueryBuilderNoEntity, dead-lettered, nothing written."""
    before = await kit.snapshot()
    message = retrieve("nosuch", 1) if op == "retrieve" else _request(op, "nosuch", 1)
    outcome = await kit.one(message)
    _assert_fault(outcome, EntityNotFound)
    assert outcome.reply.behavior_applied is None
    await _assert_only_ledger_changed(kit, before, outcome)


# -- IfRowVersionMatches on an entity without optimistic concurrency ------------------------


@pytest.mark.parametrize("behavior", IF_MATCH)
@pytest.mark.parametrize("with_version", [True, False], ids=["version", "no-version"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_if_row_version_matches_on_entity_without_oc_faults_not_enabled(
    kit: Kit, flavor: Flavor, op: str, with_version: bool, behavior: str | int
) -> None:
    """OptimisticConcurrencyNotEnabled, whether or not a version is given (this check comes
    before ConcurrencyVersionNotProvided)."""
    key = flavor.key(1)
    await kit.seed(flavor.open, key)
    token = await kit.token(flavor.open, key)
    before = await kit.snapshot()
    version = token if with_version else None
    outcome = await kit.one(_request(op, flavor.open, key, version=version, behavior=behavior))
    _assert_fault(outcome, OptimisticConcurrencyNotEnabled)
    assert outcome.reply.behavior_applied == "IfRowVersionMatches"
    await _assert_only_ledger_changed(kit, before, outcome)


@pytest.mark.parametrize("behavior", [*OVERWRITE, *DEFAULT])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_entity_without_oc_applies_overwrite_and_default(
    kit: Kit, flavor: Flavor, op: str, behavior: str | int | None
) -> None:
    """Without optimistic concurrency, Default and AlwaysOverwrite write, even with a stale
    version."""
    key = flavor.key(1)
    await kit.seed(flavor.open, key)
    prior = await kit.token(flavor.open, key)
    assert prior is not None
    outcome = await kit.one(_request(op, flavor.open, key, version="1234567", behavior=behavior))
    assert outcome.reply.behavior_applied == "AlwaysOverwrite"
    await _assert_applied(kit, op, flavor, flavor.open, key, outcome, prior)


# -- IfRowVersionMatches without a version ------------------------------------------------------


@pytest.mark.parametrize("row_exists", [True, False], ids=["row", "no-row"])
@pytest.mark.parametrize("behavior", IF_MATCH)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_if_row_version_matches_without_version_faults_not_provided(
    kit: Kit, flavor: Flavor, op: str, behavior: str | int, row_exists: bool
) -> None:
    """ConcurrencyVersionNotProvided; it wins over a missing row (checked before the
    database is read)."""
    key = flavor.key(1)
    if row_exists:
        await kit.seed(flavor.plain, key)
    before = await kit.snapshot()
    outcome = await kit.one(_request(op, flavor.plain, key, behavior=behavior))
    _assert_fault(outcome, ConcurrencyVersionNotProvided)
    assert outcome.reply.behavior_applied == "IfRowVersionMatches"
    await _assert_only_ledger_changed(kit, before, outcome)


# -- the row is missing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("behavior", "version"),
    [("IfRowVersionMatches", "1"), (1, "1"), ("AlwaysOverwrite", None), (2, "1"), (None, None)],
)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_missing_row_faults_object_does_not_exist_and_is_never_created(
    kit: Kit, flavor: Flavor, op: str, behavior: str | int | None, version: str | None
) -> None:
    """ObjectDoesNotExist whatever the behaviour; a version given for a missing row is not a
    mismatch; an update never inserts the row."""
    await kit.seed(flavor.plain, flavor.key(2))
    before = await kit.snapshot()
    outcome = await kit.one(
        _request(op, flavor.plain, flavor.key(1), version=version, behavior=behavior)
    )
    _assert_fault(outcome, ObjectDoesNotExist)
    assert await kit.row(flavor.plain, flavor.key(1)) is None
    assert await kit.count(flavor.plain) == 1
    await _assert_only_ledger_changed(kit, before, outcome)


# -- version mismatch / match ---------------------------------------------------------------------


@pytest.mark.parametrize("behavior", IF_MATCH)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_stale_version_faults_mismatch_with_expected_and_current(
    kit: Kit, flavor: Flavor, op: str, behavior: str | int
) -> None:
    """ConcurrencyVersionMismatch (retryable) carries the version given and the row's."""
    key = flavor.key(1)
    await kit.seed(flavor.plain, key)
    stale = await kit.token(flavor.plain, key)
    assert stale is not None
    await kit.pg.execute(f"UPDATE {kit.table(flavor.plain)} SET label = 'other'")
    if flavor is VERSION:
        await kit.pg.execute(f"UPDATE {kit.table(flavor.plain)} SET version = version + 1")
    current = await kit.token(flavor.plain, key)
    assert current != stale
    before = await kit.snapshot()
    outcome = await kit.one(_request(op, flavor.plain, key, version=stale, behavior=behavior))
    _assert_fault(outcome, ConcurrencyVersionMismatch)
    assert outcome.reply.fault is not None
    assert outcome.reply.fault.expected_version == stale
    assert outcome.reply.fault.current_version == current
    assert outcome.reply.behavior_applied == "IfRowVersionMatches"
    await _assert_only_ledger_changed(kit, before, outcome)


@pytest.mark.parametrize("bogus", ["", "0", "abc", "-1", " 1"])
@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_malformed_version_is_a_mismatch_not_an_error(
    kit: Kit, flavor: Flavor, bogus: str
) -> None:
    """The token is opaque: anything that is not the row's version is a mismatch."""
    key = flavor.key(1)
    await kit.seed(flavor.plain, key)
    before = await kit.snapshot()
    outcome = await kit.one(_request("update", flavor.plain, key, version=bogus, behavior=1))
    _assert_fault(outcome, ConcurrencyVersionMismatch)
    assert outcome.reply.fault is not None
    assert outcome.reply.fault.expected_version == bogus
    await _assert_only_ledger_changed(kit, before, outcome)


@pytest.mark.parametrize("behavior", IF_MATCH)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_matching_version_succeeds_with_a_new_version(
    kit: Kit, flavor: Flavor, op: str, behavior: str | int
) -> None:
    """The version matches: the write happens and the reply carries the row's new token."""
    key = flavor.key(1)
    await kit.seed(flavor.plain, key, flavor.key(2))
    prior = await kit.token(flavor.plain, key)
    assert prior is not None
    other_before = await kit.row(flavor.plain, flavor.key(2))
    outcome = await kit.one(_request(op, flavor.plain, key, version=prior, behavior=behavior))
    assert outcome.reply.behavior_applied == "IfRowVersionMatches"
    await _assert_applied(kit, op, flavor, flavor.plain, key, outcome, prior)
    assert await kit.row(flavor.plain, flavor.key(2)) == other_before


@pytest.mark.parametrize("version", [None, "stale"], ids=["no-version", "stale-version"])
@pytest.mark.parametrize("behavior", OVERWRITE)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_always_overwrite_skips_the_check(
    kit: Kit, flavor: Flavor, op: str, behavior: str | int, version: str | None
) -> None:
    """AlwaysOverwrite writes whatever version is given (or none), even on a strict entity."""
    key = flavor.key(1)
    await kit.seed(flavor.strict, key)
    prior = await kit.token(flavor.strict, key)
    assert prior is not None
    outcome = await kit.one(_request(op, flavor.strict, key, version=version, behavior=behavior))
    assert outcome.reply.behavior_applied == "AlwaysOverwrite"
    await _assert_applied(kit, op, flavor, flavor.strict, key, outcome, prior)


async def test_update_writes_only_the_named_attributes(kit: Kit) -> None:
    """Columns the request does not name keep their values, NOT NULL domains included; a
    named column set to null becomes NULL."""
    await kit.seed("typed", 1, name="n", note="keep", small=3, meta='{"a": 1}')
    await kit.pg.execute(f"UPDATE {kit.table('typed')} SET rank = 5, code = 'c' WHERE id = 1")
    outcome = await kit.one(update("typed", 1, {"note": "changed", "code": None}))
    assert outcome.reply.status == "success", outcome.reply.fault
    row = await kit.row("typed", 1)
    assert row is not None
    assert (row["name"], row["note"], row["small"], row["rank"]) == ("n", "changed", 3, 5)
    assert row["code"] is None
    assert row["meta"] == '{"a": 1}'


# -- Default ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [None, "stale"], ids=["no-version", "stale-version"])
@pytest.mark.parametrize("behavior", DEFAULT)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_default_on_always_overwrite_entity_overwrites(
    kit: Kit, flavor: Flavor, op: str, behavior: str | int | None, version: str | None
) -> None:
    """Default resolves to the entity's default (AlwaysOverwrite) and the reply says so."""
    key = flavor.key(1)
    await kit.seed(flavor.plain, key)
    prior = await kit.token(flavor.plain, key)
    assert prior is not None
    outcome = await kit.one(_request(op, flavor.plain, key, version=version, behavior=behavior))
    assert outcome.reply.behavior_applied == "AlwaysOverwrite"
    await _assert_applied(kit, op, flavor, flavor.plain, key, outcome, prior)


@pytest.mark.parametrize("behavior", DEFAULT)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_default_on_if_row_version_matches_entity_checks_the_version(
    kit: Kit, flavor: Flavor, op: str, behavior: str | int | None
) -> None:
    """Default resolves to IfRowVersionMatches on a strict entity: no version faults
    NotProvided, a stale one Mismatch, the current one succeeds; the reply says which."""
    key = flavor.key(1)
    await kit.seed(flavor.strict, key)
    prior = await kit.token(flavor.strict, key)
    assert prior is not None
    before = await kit.snapshot()

    missing = await kit.one(_request(op, flavor.strict, key, behavior=behavior))
    _assert_fault(missing, ConcurrencyVersionNotProvided)
    assert missing.reply.behavior_applied == "IfRowVersionMatches"
    await _assert_only_ledger_changed(kit, before, missing)

    stale = await kit.one(_request(op, flavor.strict, key, version="999999", behavior=behavior))
    _assert_fault(stale, ConcurrencyVersionMismatch)
    assert stale.reply.behavior_applied == "IfRowVersionMatches"
    assert stale.reply.fault is not None
    assert stale.reply.fault.current_version == prior
    await _assert_only_ledger_changed(kit, before, stale)

    good = await kit.one(_request(op, flavor.strict, key, version=prior, behavior=behavior))
    assert good.reply.behavior_applied == "IfRowVersionMatches"
    await _assert_applied(kit, op, flavor, flavor.strict, key, good, prior)


@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_numbers_and_names_give_identical_replies(kit: Kit, flavor: Flavor) -> None:
    """0/1/2 behave exactly like Default/IfRowVersionMatches/AlwaysOverwrite: the same
    replies (but for request_id and the new token) on identical rows."""
    keys = [flavor.key(n) for n in range(1, 7)]
    await kit.seed(flavor.strict, *keys)
    tokens = [await kit.token(flavor.strict, k) for k in keys]
    pairs = [("Default", 0), ("IfRowVersionMatches", 1), ("AlwaysOverwrite", 2)]
    for n, (name, number) in enumerate(pairs):
        by_name = await kit.one(_request("update", flavor.strict, keys[2 * n], behavior=name))
        by_number = await kit.one(
            _request("update", flavor.strict, keys[2 * n + 1], behavior=number)
        )
        a, b = by_name.reply, by_number.reply
        assert a.status == b.status
        assert a.behavior_applied == b.behavior_applied
        assert (a.fault.code if a.fault else None) == (b.fault.code if b.fault else None)
    # Default and IfRowVersionMatches (no version) faulted; AlwaysOverwrite wrote both rows.
    assert [await kit.token(flavor.strict, k) == t for k, t in zip(keys, tokens, strict=True)] == [
        True,
        True,
        True,
        True,
        False,
        False,
    ]


# -- order of the checks ------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_expiry_is_checked_first(kit: Kit, flavor: Flavor, op: str) -> None:
    """An expired request faults RequestExpired even if it would fault otherwise."""
    expired = kit.clock.now - timedelta(seconds=1)
    for message in [
        _request(op, "nosuch", flavor.key(1)),
        _request(op, flavor.open, flavor.key(1), behavior=1),
        _request(op, flavor.plain, flavor.key(1), behavior=1),
    ]:
        message["expires_at"] = expired.isoformat()
        outcome = await kit.one(message)
        _assert_fault(outcome, RequestExpired)


@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_unknown_attribute_is_checked_before_concurrency(kit: Kit, flavor: Flavor) -> None:
    """QueryBuilderNoAttribute comes before the behaviour checks and the database."""
    before = await kit.snapshot()
    outcome = await kit.one(update(flavor.open, flavor.key(1), {"nope": 1}, behavior=1))
    _assert_fault(outcome, AttributeNotFound, "attributes.nope")
    await _assert_only_ledger_changed(kit, before, outcome)


# -- related entities ---------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_related_rows_update_together_each_with_its_new_version(
    kit: Kit, flavor: Flavor
) -> None:
    """Main and related rows (of both flavours) are written in one transaction; the reply
    carries each related row's new token."""
    other = VERSION if flavor is XMIN else XMIN
    await kit.seed(flavor.plain, flavor.key(1), flavor.key(2))
    await kit.seed(other.plain, other.key(1))
    tokens = {
        "main": await kit.token(flavor.plain, flavor.key(1)),
        "r0": await kit.token(flavor.plain, flavor.key(2)),
        "r1": await kit.token(other.plain, other.key(1)),
    }
    outcome = await kit.one(
        update(
            flavor.plain,
            flavor.key(1),
            {"label": "main"},
            behavior="IfRowVersionMatches",
            version=tokens["main"],
            related=[
                related(flavor.plain, flavor.key(2), {"label": "r0"}, tokens["r0"]),
                related(other.plain, other.key(1), {"label": "r1", "counter": 5}, tokens["r1"]),
            ],
        )
    )
    assert outcome.reply.status == "success", outcome.reply.fault
    assert outcome.applied
    main_row = await kit.row(flavor.plain, flavor.key(1))
    r0_row = await kit.row(flavor.plain, flavor.key(2))
    r1_row = await kit.row(other.plain, other.key(1))
    assert main_row is not None
    assert r0_row is not None
    assert r1_row is not None
    assert (main_row["label"], r0_row["label"], r1_row["label"]) == ("main", "r0", "r1")
    assert r1_row["counter"] == 5
    assert outcome.reply.row_version == await kit.token(flavor.plain, flavor.key(1))
    assert outcome.reply.related is not None
    assert [(r.entity, r.id, r.row_version) for r in outcome.reply.related] == [
        (flavor.plain, flavor.key(2), await kit.token(flavor.plain, flavor.key(2))),
        (other.plain, other.key(1), await kit.token(other.plain, other.key(1))),
    ]
    for r, old in zip(outcome.reply.related, [tokens["r0"], tokens["r1"]], strict=True):
        assert r.row_version != old


@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_related_mismatch_rolls_back_everything(kit: Kit, flavor: Flavor) -> None:
    """All-or-nothing: a stale version on related[1] faults the request with
    path related[1]; the main row and related[0] are untouched."""
    keys = [flavor.key(n) for n in (1, 2, 3)]
    await kit.seed(flavor.plain, *keys)
    tokens = [await kit.token(flavor.plain, k) for k in keys]
    assert None not in tokens
    before = await kit.snapshot()
    outcome = await kit.one(
        update(
            flavor.plain,
            keys[0],
            {"label": "main"},
            behavior=1,
            version=tokens[0],
            related=[
                related(flavor.plain, keys[1], {"label": "r0"}, tokens[1]),
                related(flavor.plain, keys[2], {"label": "r1"}, "999999"),
            ],
        )
    )
    _assert_fault(outcome, ConcurrencyVersionMismatch, "related[1]")
    assert outcome.reply.fault is not None
    assert outcome.reply.fault.expected_version == "999999"
    assert outcome.reply.fault.current_version == tokens[2]
    await _assert_only_ledger_changed(kit, before, outcome)


@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_related_checks_name_the_related_path(kit: Kit, flavor: Flavor) -> None:
    """Each check on a related row reports related[i]: missing row, no version, optimistic
    concurrency off, unknown entity, unknown attribute."""
    keys = [flavor.key(n) for n in (1, 2)]
    await kit.seed(flavor.plain, *keys)
    await kit.seed(flavor.open, keys[1])
    main_token = await kit.token(flavor.plain, keys[0])
    r_token = await kit.token(flavor.plain, keys[1])
    open_token = await kit.token(flavor.open, keys[1])
    good = related(flavor.plain, keys[1], {"label": "r"}, r_token)
    cases: list[tuple[dict[str, Any], type[Fault], str]] = [
        (
            related(flavor.plain, flavor.key(9), {"label": "x"}, "1"),
            ObjectDoesNotExist,
            "related[1]",
        ),
        (
            related(flavor.plain, flavor.key(9), {"label": "x"}),
            ConcurrencyVersionNotProvided,
            "related[1]",
        ),
        (
            related(flavor.open, keys[1], {"label": "x"}, open_token),
            OptimisticConcurrencyNotEnabled,
            "related[1]",
        ),
        (related("nosuch", 1, {"label": "x"}, "1"), EntityNotFound, "related[1]"),
        (
            related(flavor.plain, flavor.key(9), {"bad": 1}, "1"),
            AttributeNotFound,
            "related[1].attributes.bad",
        ),
    ]
    before = await kit.snapshot()
    for rel, fault, path in cases:
        outcome = await kit.one(
            update(
                flavor.plain,
                keys[0],
                {"label": "m"},
                behavior=1,
                version=main_token,
                related=[good, rel],
            )
        )
        _assert_fault(outcome, fault, path)
        await _assert_only_ledger_changed(kit, before, outcome)


@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_the_same_row_twice_in_one_request_is_invalid(kit: Kit, flavor: Flavor) -> None:
    """A request that names its own row as related (or one row twice) is InvalidArgument."""
    await kit.seed(flavor.plain, flavor.key(1), flavor.key(2))
    before = await kit.snapshot()
    for rels in (
        [related(flavor.plain, flavor.key(1), {"label": "x"})],
        [related(flavor.plain, flavor.key(2), {"label": "x"})] * 2,
    ):
        outcome = await kit.one(update(flavor.plain, flavor.key(1), {"label": "m"}, related=rels))
        _assert_fault(outcome, InvalidArgument)
        await _assert_only_ledger_changed(kit, before, outcome)


# -- retrieve -------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_retrieve_returns_attributes_and_current_version(kit: Kit, flavor: Flavor) -> None:
    """The key and every registered attribute (not the version column), with the token that
    an IfRowVersionMatches update then accepts; nothing is written."""
    key = flavor.key(1)
    await kit.seed(flavor.strict, key, label="hello", counter=3)
    token = await kit.token(flavor.strict, key)
    before = await kit.snapshot()
    outcome = await kit.one(retrieve(flavor.strict, key))
    reply = outcome.reply
    assert reply.status == "success"
    assert reply.type == "retrieve"
    assert reply.row_version == token
    key_column = "id" if flavor is XMIN else "sku"
    assert reply.attributes == {key_column: key, "label": "hello", "counter": 3}
    assert reply.behavior_applied is None
    assert not outcome.applied
    after = await kit.snapshot()
    assert {k: v for k, v in after.items() if k != "ledger"} == {
        k: v for k, v in before.items() if k != "ledger"
    }
    follow = await kit.one(_request("update", flavor.strict, key, version=reply.row_version))
    assert follow.reply.status == "success"


@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_retrieve_of_missing_row_faults_object_does_not_exist(
    kit: Kit, flavor: Flavor
) -> None:
    """Retrieve of a row that is not there: ObjectDoesNotExist."""
    outcome = await kit.one(retrieve(flavor.plain, flavor.key(1)))
    _assert_fault(outcome, ObjectDoesNotExist)


async def test_retrieve_ignores_the_concurrency_behavior(kit: Kit) -> None:
    """A retrieve has no version check: IfRowVersionMatches without a version still reads."""
    await kit.seed("strict_account", 1)
    message = retrieve("strict_account", 1)
    message["concurrency_behavior"] = "IfRowVersionMatches"
    outcome = await kit.one(message)
    assert outcome.reply.status == "success"
    assert outcome.reply.row_version == await kit.token("strict_account", 1)


# -- expiry ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", [*OPS, "retrieve"])
@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_expired_request_faults_and_applies_nothing(
    kit: Kit, flavor: Flavor, op: str
) -> None:
    """expires_at at or before the engine's clock: RequestExpired, dead-lettered, no write;
    one microsecond later it would have applied."""
    key = flavor.key(1)
    await kit.seed(flavor.plain, key)
    before = await kit.snapshot()
    for expires_at in (kit.clock.now, kit.clock.now - timedelta(days=1)):
        message = (
            retrieve(flavor.plain, key) if op == "retrieve" else _request(op, flavor.plain, key)
        )
        message["expires_at"] = expires_at.isoformat()
        outcome = await kit.one(message)
        _assert_fault(outcome, RequestExpired)
        await _assert_only_ledger_changed(kit, before, outcome)
    message = retrieve(flavor.plain, key) if op == "retrieve" else _request(op, flavor.plain, key)
    message["expires_at"] = (kit.clock.now + timedelta(microseconds=1)).isoformat()
    assert (await kit.one(message)).reply.status == "success"


async def test_clock_decides_expiry(kit: Kit) -> None:
    """The same request is applied before its deadline and faults after it (a new id)."""
    await kit.seed("account", 1)
    deadline = kit.clock.now + timedelta(minutes=5)
    first = await kit.one(update("account", 1, {"label": "a"}, expires_at=deadline))
    assert first.reply.status == "success"
    kit.clock.advance(timedelta(minutes=5))
    late = await kit.one(update("account", 1, {"label": "b"}, expires_at=deadline))
    _assert_fault(late, RequestExpired)
    row = await kit.row("account", 1)
    assert row is not None
    assert row["label"] == "a"
    assert late.reply.processed_at == kit.clock.now
