"""The engine against a model: a hypothesis state machine on real PostgreSQL.

Random sequences of steps drive the real :class:`Engine` on one connection, and an
in-memory model predicts every outcome: the rows and their versions, every reply (status,
fault code and path, behaviour applied, versions), what is ledgered and what is replayed.

Steps: update / delete / retrieve of one row (Default, IfRowVersionMatches or
AlwaysOverwrite, with the current token, a stale one, a made-up one or none), a batch of
several requests at once (often several on the same row: the xmin hazard), redelivery of
an earlier request (the identical reply bytes, nothing changes), reuse of a request_id for
another payload (DuplicateRecord), a crash before commit and the redelivery of what it
lost, and writes by someone else (a row re-created, a row updated behind the clients'
backs). Six entities, three per version source: ``xmin`` and a bigint version column,
each plain (Default -> AlwaysOverwrite), strict (Default -> IfRowVersionMatches) and open
(optimistic concurrency off).

The crash is a real one, as PostgreSQL sees it: a second connection holds a lock the
batch needs at its last statement (the ledger INSERT, after every row write) or at one of
its rows (mid-batch), waits until the engine's backend is blocked on it, and terminates
that backend with ``pg_terminate_backend``. The server rolls the open transaction back, as
it does when a worker dies; the engine must raise TransientError (the worker retries).

After every step: each table equals the model (every version the model holds is the
row's current one), and the ledger holds exactly one entry per processed request_id, with
the reply bytes that were returned.

One schema per test run (created here, dropped at the end); each example starts from
truncated tables. Example counts: ``tests/fuzzing.py`` (``PROCESSOR_FUZZ_EXAMPLES``).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import EllipsisType
from typing import Any, ClassVar, Final, Literal, TypeVar, cast

import asyncpg
import msgspec
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from hypothesis.statistics import collector, describe_statistics

from processor.contract import Reply
from processor.engine.engine import Envelope, Outcome
from processor.errors import (
    FAULT_TYPES,
    AttributeNotFound,
    ConcurrencyVersionMismatch,
    ConcurrencyVersionNotProvided,
    DuplicateRequest,
    Fault,
    InvalidArgument,
    ObjectDoesNotExist,
    OptimisticConcurrencyNotEnabled,
    RequestExpired,
    TransientError,
)
from tests.conftest import Endpoints
from tests.fuzzing import examples
from tests.integration.engine_kit import T0, Kit, envelope

T = TypeVar("T")
Key = int | str
RowKey = tuple[str, Key]


@dataclass(frozen=True)
class Spec:
    """An entity of engine_kit's registry, as the model sees it."""

    name: str
    flavor: Literal["xmin", "version"]
    key_column: str
    default: Literal["AlwaysOverwrite", "IfRowVersionMatches"]
    optimistic: bool

    def key(self, n: int) -> Key:
        return n if self.flavor == "xmin" else f"k{n}"


SPECS: Final = {
    spec.name: spec
    for spec in (
        Spec("account", "xmin", "id", "AlwaysOverwrite", True),
        Spec("strict_account", "xmin", "id", "IfRowVersionMatches", True),
        Spec("open_account", "xmin", "id", "AlwaysOverwrite", False),
        Spec("item", "version", "sku", "AlwaysOverwrite", True),
        Spec("strict_item", "version", "sku", "IfRowVersionMatches", True),
        Spec("open_item", "version", "sku", "AlwaysOverwrite", False),
    )
}
#: Rows that exist at the start of each example (and can be re-created); key 9 never does.
SEEDED: Final = (1, 2)
MISSING: Final = 9
ROWS: Final = [(name, spec.key(n)) for name, spec in SPECS.items() for n in SEEDED]
BEHAVIORS: Final = {
    None: "Default",  # the field left out
    "Default": "Default",
    0: "Default",
    "IfRowVersionMatches": "IfRowVersionMatches",
    1: "IfRowVersionMatches",
    "AlwaysOverwrite": "AlwaysOverwrite",
    2: "AlwaysOverwrite",
}
INT64_MAX: Final = 2**63 - 1


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """One of the strategies, each as often as its weight says (the first is the simplest)."""
    return st.sampled_from([s for weight, s in choices for _ in range(weight)]).flatmap(lambda s: s)


labels: st.SearchStrategy[Any] = weighted(
    (9, st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8)),
    (1, st.sampled_from(["a\x00b", None, 5])),  # NUL, NOT NULL, a number: InvalidArgument
)
counters: st.SearchStrategy[Any] = weighted(
    (8, st.integers(0, 10**6)),
    (1, st.sampled_from([INT64_MAX, -1])),  # -1: the table's CHECK rejects it, in PostgreSQL
    (1, st.sampled_from([2**63, None, "7", 1.5, True])),  # refused before the database
)
attribute_names = weighted(
    (9, st.lists(st.sampled_from(["label", "counter"]), min_size=1, max_size=2, unique=True)),
    (1, st.just(["label", "nope"])),  # QueryBuilderNoAttribute
)
tokens = st.sampled_from([*["current"] * 5, "stale", "stale", "none", "made-up"])
expiries = st.sampled_from([*[None] * 18, timedelta(days=1), timedelta(seconds=-1)])
operations = st.sampled_from(["update", "update", "update", "retrieve", "delete"])


# -- the harness: one event loop, one schema, two connections ---------------------------------


@dataclass
class Harness:
    """What outlives the examples: the loop, the schema and its tables, the connections."""

    runner: asyncio.Runner
    url: str
    kit: Kit
    conn: asyncpg.Connection  # the engine's; replaced after a crash

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    @property
    def ctl(self) -> asyncpg.Connection:
        """The test's own connection: seeding, inspection, the crash's lock."""
        return self.kit.pg


# -- the model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One record of a batch: the message and its envelope (the same one when redelivered)."""

    message: dict[str, Any]
    envelope: Envelope


def _item(message: dict[str, Any]) -> Item:
    return Item(message, envelope(message))


@dataclass
class Row:
    label: str
    counter: int
    version: str


@dataclass(frozen=True)
class Sent:
    """What the ledger holds for a request_id: the envelope and the reply bytes."""

    envelope: Envelope
    data: bytes
    applied: bool


@dataclass
class Model:
    rows: dict[RowKey, Row] = field(default_factory=dict)
    #: Tokens that were a row's version once and are no longer (what old clients hold).
    stale: dict[RowKey, list[str]] = field(default_factory=dict)
    #: Every token handed out for a row; xmin: over all its lives, version: this life.
    issued: dict[RowKey, set[str]] = field(default_factory=dict)
    ledger: dict[str, Sent] = field(default_factory=dict)
    #: Batches lost in a crash: their records will be delivered again.
    lost: list[list[Item]] = field(default_factory=list)

    def set_version(self, rk: RowKey, version: str) -> None:
        row = self.rows[rk]
        if row.version != version:
            self.stale.setdefault(rk, []).append(row.version)
        row.version = version


@dataclass(frozen=True)
class Expected:
    """A predicted outcome. ``row_version`` Ellipsis: a token the model cannot know (xmin)."""

    status: Literal["success", "fault"]
    fault: type[Fault] | None = None
    path: str | None = None
    behavior: str | None = None
    row_version: str | EllipsisType | None = None
    attributes: dict[str, Any] | None = None
    expected_version: str | None = None
    current_version: str | None = None
    applied: bool = False


def _fault(
    kind: type[Fault],
    behavior: str | None,
    path: str | None = None,
    *,
    expected_version: str | None = None,
    current_version: str | None = None,
) -> Expected:
    return Expected(
        "fault",
        kind,
        path,
        behavior,
        expected_version=expected_version,
        current_version=current_version,
    )


def _value_problem(name: str, value: Any) -> bool:
    """What the engine refuses before the database (engine.checks._value_problem, these columns)."""
    if name == "label":
        return not isinstance(value, str) or "\x00" in value
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return True
    return not isinstance(value, int) or not -(2**63) <= value <= INT64_MAX


def predict(model: Model, message: dict[str, Any]) -> Expected:
    """The outcome of one new request on the model's current state (nothing is changed)."""
    spec = SPECS[message["entity"]]
    rk: RowKey = (spec.name, message["id"])
    kind = message["type"]
    wire = message.get("concurrency_behavior")
    behavior: str | None = None
    if kind != "retrieve":
        behavior = BEHAVIORS[wire]
        behavior = spec.default if behavior == "Default" else behavior
    expires = message.get("expires_at")
    if expires is not None and datetime.fromisoformat(expires) <= T0:
        return _fault(RequestExpired, behavior)
    for name, value in message.get("attributes", {}).items():
        if name not in ("label", "counter"):
            return _fault(AttributeNotFound, behavior, f"attributes.{name}")
        if _value_problem(name, value):
            return _fault(InvalidArgument, behavior, f"attributes.{name}")
    token = message.get("row_version")
    if behavior == "IfRowVersionMatches":
        if not spec.optimistic:
            return _fault(OptimisticConcurrencyNotEnabled, behavior)
        if token is None:
            return _fault(ConcurrencyVersionNotProvided, behavior)
    row = model.rows.get(rk)
    if row is None:
        return _fault(ObjectDoesNotExist, behavior)
    if behavior == "IfRowVersionMatches" and token != row.version:
        return _fault(
            ConcurrencyVersionMismatch,
            behavior,
            expected_version=token,
            current_version=row.version,
        )
    if kind == "retrieve":
        attributes = {spec.key_column: rk[1], "label": row.label, "counter": row.counter}
        return Expected("success", row_version=row.version, attributes=attributes)
    if kind == "delete":
        return Expected("success", behavior=behavior, applied=True)
    if message["attributes"].get("counter", 0) < 0:  # the CHECK constraint; no column named
        return _fault(InvalidArgument, behavior)
    new: str | EllipsisType = Ellipsis
    if spec.flavor == "version":
        new = str(int(row.version) + 1)
    return Expected("success", behavior=behavior, row_version=new, applied=True)


def apply(model: Model, message: dict[str, Any], reply: Reply) -> None:
    """Change the model as a successful write did."""
    spec = SPECS[message["entity"]]
    rk: RowKey = (spec.name, message["id"])
    if message["type"] == "delete":
        old = model.rows.pop(rk)
        model.stale.setdefault(rk, []).append(old.version)
        return
    assert reply.row_version is not None
    issued = model.issued.setdefault(rk, set())
    assert reply.row_version not in issued, f"token {reply.row_version} handed out twice for {rk}"
    issued.add(reply.row_version)
    row = model.rows[rk]
    attributes = message["attributes"]
    row.label = attributes.get("label", row.label)
    row.counter = attributes.get("counter", row.counter)
    model.set_version(rk, reply.row_version)


def check(outcome: Outcome, expected: Expected, request: dict[str, Any]) -> None:
    reply = outcome.reply
    where = f"{request} -> {reply}"
    assert reply.request_id == request["request_id"], where
    assert (reply.type, reply.entity, reply.id) == (
        request["type"],
        request["entity"],
        request["id"],
    ), where
    assert reply.processed_at == T0, where
    assert reply.status == expected.status, where
    assert reply.behavior_applied == expected.behavior, where
    assert reply.attributes == expected.attributes, where
    assert reply.related is None, where
    assert msgspec.json.decode(outcome.data, type=Reply) == reply, where
    assert not outcome.replayed, where
    assert outcome.applied is expected.applied, where
    if expected.fault is None:
        assert reply.fault is None, where
        if expected.row_version is Ellipsis:
            assert reply.row_version is not None, where
        else:
            assert reply.row_version == expected.row_version, where
        assert not outcome.dead_letter, where
        return
    assert reply.fault is not None, where
    fault = expected.fault
    assert (reply.fault.code, reply.fault.name) == (fault.code, fault.name), where
    assert reply.fault.path == expected.path, where
    assert reply.fault.retryable is fault.retryable, where
    assert reply.fault.expected_version == expected.expected_version, where
    assert reply.fault.current_version == expected.current_version, where
    assert reply.row_version is None, where
    assert outcome.dead_letter is fault.dead_letter, where


# -- the state machine ------------------------------------------------------------------------


class EngineMachine(RuleBasedStateMachine):
    #: Set on a subclass per test run (run_state_machine_as_test takes a class).
    harness: ClassVar[Harness]

    def __init__(self) -> None:
        super().__init__()
        self.h = self.harness
        self.kit = self.h.kit
        self.model = Model()
        self._ids = itertools.count(1)
        self.messages: dict[str, dict[str, Any]] = {}  # request_id -> its message, for reuse

    # -- helpers ------------------------------------------------------------------------------

    def _rid(self) -> str:
        return f"sm-{next(self._ids)}"

    def _table(self, entity: str) -> str:
        return self.kit.table(entity)

    async def _read_version(self, entity: str, key: Key) -> str:
        token = await self.kit.token(entity, key)
        assert token is not None
        return token

    def _token(self, data: st.DataObject, rk: RowKey) -> str | None:
        choice = data.draw(tokens, label="token")
        row = self.model.rows.get(rk)
        if choice == "current" and row is not None:
            return row.version
        if choice in ("current", "stale") and self.model.stale.get(rk):
            return data.draw(st.sampled_from(self.model.stale[rk]), label="stale token")
        if choice == "none":
            return None
        return data.draw(st.sampled_from(["0", "1", "4294967295", "x" * 40]), label="made-up")

    def _target(self, data: st.DataObject, hot: RowKey | None = None) -> RowKey:
        if hot is not None and data.draw(st.sampled_from([True, True, False]), label="hot row"):
            return hot
        entity = data.draw(st.sampled_from(sorted(SPECS)), label="entity")
        spec = SPECS[entity]
        n = data.draw(st.sampled_from([*SEEDED, *SEEDED, MISSING]), label="key")
        return (entity, spec.key(n))

    def _write(
        self, data: st.DataObject, kind: Literal["update", "delete"], rk: RowKey
    ) -> dict[str, Any]:
        message: dict[str, Any] = {
            "type": kind,
            "request_id": self._rid(),
            "entity": rk[0],
            "id": rk[1],
        }
        if kind == "update":
            names = data.draw(attribute_names, label="attributes")
            values = {"label": labels, "counter": counters, "nope": st.just(1)}
            message["attributes"] = {n: data.draw(values[n], label=n) for n in names}
        wire = data.draw(st.sampled_from(list(BEHAVIORS)), label="behavior")
        if wire is not None:
            message["concurrency_behavior"] = wire
        token = self._token(data, rk)
        if token is not None:
            message["row_version"] = token
        delta = data.draw(expiries, label="expires in")
        if delta is not None:
            message["expires_at"] = (T0 + delta).isoformat()
        return message

    def _request(self, data: st.DataObject, hot: RowKey | None = None) -> dict[str, Any]:
        rk = self._target(data, hot)
        kind = data.draw(operations, label="op")
        if kind == "retrieve":
            return {"type": "retrieve", "request_id": self._rid(), "entity": rk[0], "id": rk[1]}
        return self._write(data, "update" if kind == "update" else "delete", rk)

    def _reused(self, data: st.DataObject) -> dict[str, Any]:
        """An earlier request_id on another payload (or, rarely, the same one: a replay)."""
        message = self._request(data)
        message["request_id"] = data.draw(st.sampled_from(sorted(self.model.ledger)), label="id")
        return message

    def _batch(self, data: st.DataObject, size: int) -> list[Item]:
        """Several records: new requests (often on one hot row), echoes of earlier records
        of the batch, redeliveries of ledgered requests, reused request_ids."""
        hot = self._target(data)
        items: list[Item] = []
        while len(items) < size:
            choice = data.draw(
                st.sampled_from(["new", "new", "new", "echo", "redeliver", "reuse"]), label="kind"
            )
            if choice == "echo" and items:
                items.append(data.draw(st.sampled_from(items), label="echo"))
            elif choice in ("redeliver", "reuse") and self.model.ledger:
                if choice == "redeliver":
                    rid = data.draw(st.sampled_from(sorted(self.model.ledger)), label="redeliver")
                    items.append(Item(self.messages[rid], self.model.ledger[rid].envelope))
                else:
                    items.append(_item(self._reused(data)))
            else:
                items.append(_item(self._request(data, hot)))
        return items

    # -- running a batch and checking it against the model ------------------------------------

    def _expect_and_check(self, items: list[Item], outcomes: list[Outcome]) -> None:
        assert len(outcomes) == len(items)
        stored = dict(self.model.ledger)  # what the engine's ledger lookup saw
        first: dict[str, tuple[Item, Outcome]] = {}
        writes: dict[RowKey, int] = {}
        for item, outcome in zip(items, outcomes, strict=True):
            message, env = item.message, item.envelope
            rid = env.request.request_id
            earlier = stored.get(rid)
            if earlier is None and rid in first:
                earlier_item, earlier_outcome = first[rid]
                if earlier_item.envelope.fingerprint == env.fingerprint:
                    event("echo in the batch")
                    self._check_replay(outcome, earlier_outcome.data)
                else:
                    self._check_duplicate(outcome, message)
                continue
            if earlier is not None:
                if earlier.envelope.fingerprint == env.fingerprint:
                    event("redelivered")
                    self._check_replay(outcome, earlier.data)
                else:
                    self._check_duplicate(outcome, message)
                continue
            expected = predict(self.model, message)
            if expected.fault is not None:
                event(f"outcome: {expected.fault.name}")
            else:
                event(f"outcome: {message['type']} ok ({expected.behavior or 'read'})")
            check(outcome, expected, message)
            if outcome.applied:
                rk: RowKey = (message["entity"], message["id"])
                writes[rk] = writes.get(rk, 0) + 1
                apply(self.model, message, outcome.reply)
            first[rid] = (item, outcome)
            self.model.ledger[rid] = Sent(env, outcome.data, outcome.applied)
            self.messages[rid] = message
        if writes:
            event(f"one row written {max(writes.values())}x in one batch")

    def _check_replay(self, outcome: Outcome, data: bytes) -> None:
        assert outcome.replayed
        assert not outcome.applied
        assert outcome.data == data, "a redelivery must get the identical reply bytes"
        fault = outcome.reply.fault
        kind = FAULT_TYPES.get(fault.code) if fault else None
        assert outcome.dead_letter is (kind is not None and kind.dead_letter)

    def _check_duplicate(self, outcome: Outcome, message: dict[str, Any]) -> None:
        event("DuplicateRecord")
        reply = outcome.reply
        assert reply.fault is not None
        assert (reply.fault.code, reply.fault.name) == (
            DuplicateRequest.code,
            DuplicateRequest.name,
        )
        assert reply.behavior_applied is None
        assert (reply.type, reply.entity, reply.id) == (
            message["type"],
            message["entity"],
            message["id"],
        )
        assert outcome.dead_letter
        assert not outcome.applied
        assert not outcome.replayed

    def _process(self, items: list[Item]) -> None:
        outcomes = self.h.run(
            self.kit.engine.process(self.h.conn, [item.envelope for item in items])
        )
        self._expect_and_check(items, outcomes)

    # -- rules --------------------------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        tables = ", ".join([*(self._table(name) for name in SPECS), self.kit.ledger.table])

        async def reset() -> None:
            await self.h.ctl.execute(f"TRUNCATE {tables}")
            for name, spec in SPECS.items():
                await self.kit.seed(name, *(spec.key(n) for n in SEEDED), label="seed")
            for rk in ROWS:
                version = await self._read_version(*rk)
                self.model.rows[rk] = Row("seed", 0, version)
                self.model.issued[rk] = {version}

        self.h.run(reset())

    @rule(data=st.data())
    def update(self, data: st.DataObject) -> None:
        self._process([_item(self._write(data, "update", self._target(data)))])

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        self._process([_item(self._write(data, "delete", self._target(data)))])

    @rule(data=st.data())
    def retrieve(self, data: st.DataObject) -> None:
        rk = self._target(data)
        message = {"type": "retrieve", "request_id": self._rid(), "entity": rk[0], "id": rk[1]}
        self._process([_item(message)])

    @rule(data=st.data(), size=st.integers(2, 8))
    def batch(self, data: st.DataObject, size: int) -> None:
        self._process(self._batch(data, size))

    @precondition(lambda self: bool(self.model.rows))
    @rule(data=st.data(), size=st.integers(2, 5))
    def batch_on_one_row(self, data: st.DataObject, size: int) -> None:
        """The xmin hazard: several writes of one row in one commit, retrieves between
        them. Each write must hand out its own token, the row's version right after it."""
        rk = data.draw(st.sampled_from(sorted(self.model.rows, key=str)), label="row")
        items = []
        for _ in range(size):
            op = data.draw(st.sampled_from(["update", "update", "update", "retrieve"]))
            if op == "retrieve":
                items.append(
                    _item(
                        {
                            "type": "retrieve",
                            "request_id": self._rid(),
                            "entity": rk[0],
                            "id": rk[1],
                        }
                    )
                )
                continue
            message: dict[str, Any] = {
                "type": "update",
                "request_id": self._rid(),
                "entity": rk[0],
                "id": rk[1],
                "attributes": {"label": data.draw(labels), "counter": data.draw(counters)},
                "concurrency_behavior": "AlwaysOverwrite",
            }
            items.append(_item(message))
        self._process(items)

    @precondition(lambda self: bool(self.model.ledger))
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        """An earlier request again, alone: the same bytes back, not a bit changed."""
        rid = data.draw(st.sampled_from(sorted(self.model.ledger)), label="request_id")
        sent = self.model.ledger[rid]
        before = self.h.run(self.kit.snapshot())  # rows and ledger, with their xmin
        (outcome,) = self.h.run(self.kit.engine.process(self.h.conn, [sent.envelope]))
        self._check_replay(outcome, sent.data)
        assert self.h.run(self.kit.snapshot()) == before

    @precondition(lambda self: bool(self.model.ledger))
    @rule(data=st.data())
    def reuse_request_id(self, data: st.DataObject) -> None:
        self._process([_item(self._reused(data))])

    @rule(data=st.data(), size=st.integers(1, 6), point=st.sampled_from(["ledger", "row"]))
    def crash_before_commit(self, data: st.DataObject, size: int, point: str) -> None:
        """The engine's backend dies before COMMIT: nothing of the batch may remain."""
        items = self._batch(data, size)
        lock_row: RowKey | None = None
        if point == "row":
            candidates = [
                (i.message["entity"], i.message["id"])
                for i in items
                if i.message["type"] != "retrieve"
                and (i.message["entity"], i.message["id"]) in self.model.rows
            ]
            lock_row = candidates[-1] if candidates else None
        crashed, outcomes = self.h.run(self._crash(items, lock_row))
        if not crashed:
            # Nothing to insert in the ledger (all replays and duplicates): it committed.
            event("crash: the batch never blocked")
            self._expect_and_check(items, outcomes)
            return
        event(f"crash: blocked by a lock on {'a row and ' if lock_row else ''}the ledger")
        self.model.lost.append(items)

    async def _crash(
        self, items: list[Item], lock_row: RowKey | None
    ) -> tuple[bool, list[Outcome]]:
        ctl, conn = self.h.ctl, self.h.conn
        pid = conn.get_server_pid()
        crashed = False
        async with ctl.transaction():
            # SHARE conflicts with the INSERT's ROW EXCLUSIVE, not with the lookup's SELECT.
            await ctl.execute(f"LOCK TABLE {self.kit.ledger.table} IN SHARE MODE")
            if lock_row is not None:
                spec = SPECS[lock_row[0]]
                await ctl.execute(
                    f"SELECT 1 FROM {self._table(spec.name)} "
                    f"WHERE {spec.key_column} = $1 FOR UPDATE",
                    lock_row[1],
                )
            task = asyncio.ensure_future(
                self.kit.engine.process(conn, [item.envelope for item in items])
            )
            deadline = asyncio.get_running_loop().time() + 30
            while not task.done():
                if await ctl.fetchval("SELECT cardinality(pg_blocking_pids($1)) > 0", pid):
                    assert await ctl.fetchval("SELECT pg_terminate_backend($1)", pid)
                    # Still holding the lock: the engine fails when the backend exits, and a
                    # backend that got the signal (FATAL) never commits.
                    with pytest.raises(TransientError):
                        await asyncio.wait_for(task, 30)
                    crashed = True
                    break
                assert asyncio.get_running_loop().time() < deadline, "the batch never blocked"
                await asyncio.sleep(0.002)
        if not crashed:
            return False, await task
        conn.terminate()
        self.h.conn = await asyncpg.connect(self.h.url)
        return True, []

    @precondition(lambda self: bool(self.model.lost))
    @rule()
    def redeliver_lost_batch(self) -> None:
        """The records of the oldest crashed batch, read again: applied now, once."""
        event("lost batch delivered again")
        self._process(self.model.lost.pop(0))

    @precondition(lambda self: len(self.model.rows) < len(ROWS))
    @rule(
        data=st.data(),
        label=st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=5),
        counter=st.integers(0, 100),
    )
    def recreate_row(self, data: st.DataObject, label: str, counter: int) -> None:
        """Someone else inserts a deleted row again (the processor never creates rows)."""
        rk = data.draw(st.sampled_from([r for r in ROWS if r not in self.model.rows]))

        async def insert() -> str:
            await self.kit.seed(rk[0], rk[1], label=label, counter=counter)
            return await self._read_version(*rk)

        version = self.h.run(insert())
        self.model.rows[rk] = Row(label, counter, version)
        if SPECS[rk[0]].flavor == "version":
            self.model.issued[rk] = set()  # a new life starts over at the column's default
        self.model.issued.setdefault(rk, set()).add(version)

    @precondition(lambda self: bool(self.model.rows))
    @rule(data=st.data(), counter=st.integers(0, 100))
    def external_write(self, data: st.DataObject, counter: int) -> None:
        """Someone else updates a row (bumping its version): every client token is stale."""
        rk = data.draw(st.sampled_from(sorted(self.model.rows, key=str)))
        spec = SPECS[rk[0]]
        bump = ", version = version + 1" if spec.flavor == "version" else ""

        async def write() -> str:
            await self.h.ctl.execute(
                f"UPDATE {self._table(spec.name)} SET counter = $2{bump} "
                f"WHERE {spec.key_column} = $1",
                rk[1],
                counter,
            )
            return await self._read_version(*rk)

        version = self.h.run(write())
        issued = self.model.issued.setdefault(rk, set())
        assert version not in issued
        issued.add(version)
        self.model.rows[rk].counter = counter
        self.model.set_version(rk, version)

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def tables_equal_the_model(self) -> None:
        """Every row, and every version the model holds is the row's current one."""
        selects = " UNION ALL ".join(
            f"SELECT '{name}' AS e, t.{spec.key_column}::text AS k, t.label, t.counter, "
            f"{'t.xmin' if spec.flavor == 'xmin' else 't.version'}::text AS v "
            f"FROM {self._table(name)} AS t"
            for name, spec in SPECS.items()
        )
        rows = self.h.run(self.h.ctl.fetch(selects))
        actual = {(r["e"], r["k"]): (r["label"], r["counter"], r["v"]) for r in rows}
        expected = {
            (e, str(k)): (row.label, row.counter, row.version)
            for (e, k), row in self.model.rows.items()
        }
        assert actual == expected

    @invariant()
    def the_ledger_holds_one_entry_per_processed_request(self) -> None:
        rows = self.h.run(
            self.h.ctl.fetch(
                f"SELECT request_id, fingerprint, reply, applied FROM {self.kit.ledger.table}"
            )
        )
        actual = {r["request_id"]: (r["fingerprint"], r["reply"], r["applied"]) for r in rows}
        expected = {
            rid: (sent.envelope.fingerprint, sent.data, sent.applied)
            for rid, sent in self.model.ledger.items()
        }
        assert actual == expected


SETTINGS: Final = settings(
    max_examples=examples(50),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# A failure is shrunk to a minimal sequence of steps, which can take minutes: more than the
# default timeout of 300 s, whose expiry would hide the minimal example.
@pytest.mark.timeout(900)
def test_engine_against_the_model(
    stack_endpoints: Endpoints, request: pytest.FixtureRequest
) -> None:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    url = stack_endpoints.database_url
    with asyncio.Runner() as runner:
        ctl = runner.run(asyncpg.connect(url))
        conn = None
        try:
            kit = runner.run(Kit.create(ctl, schema))
            conn = runner.run(asyncpg.connect(url))
            harness = Harness(runner, url, kit, conn)
            # run_state_machine_as_test is not a @given test, so the pytest plugin does not
            # collect its statistics itself: hand them over for --hypothesis-show-statistics.
            node = request.node

            def note(stats: Any) -> None:
                node.hypothesis_statistics = describe_statistics(stats | {"nodeid": node.nodeid})

            class Machine(EngineMachine):
                pass

            Machine.harness = harness
            with cast(Any, collector).with_value(note):
                run_state_machine_as_test(Machine, settings=SETTINGS)
            conn = harness.conn
        finally:
            if conn is not None:
                runner.run(conn.close())
            runner.run(ctl.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
            runner.run(ctl.close())
