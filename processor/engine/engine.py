"""The compare-and-set engine: a batch of requests in one transaction, one outcome each.

How a batch runs (``Engine.process``):

1. The ledger is read for every request_id at once. A request seen before gets its stored
   reply and applies nothing; the same id with another payload faults (DuplicateRecord).
2. Every new request is checked without the database: expiry, entity, attributes and
   their types, then Dataverse's order: IfRowVersionMatches needs optimistic concurrency
   on the entity, then a row_version.
3. Requests are put in *rounds*: a round touches each row at most once, and a row's
   requests keep their order across rounds. Round k > 0 runs inside its own savepoint, so
   its writes carry their own (sub)transaction id: no two writes ever hand out the same
   xmin token (the xmin hazard), while the batch still commits once.
4. Per round and entity: one ``SELECT ... FOR UPDATE`` reads the current versions, the
   checks (exists, version matches) run in Python, one ``UPDATE ... FROM unnest`` and
   one ``DELETE`` apply the winners. All-or-nothing for related rows falls out: a request
   is applied only if all its rows pass.
5. One INSERT writes every outcome to the ledger, in the same transaction.

If any statement fails on a value (a constraint, an overflow), the transaction is rolled
back and the batch redone with each request in its own savepoint, so only the guilty
request faults. Service failures raise :class:`TransientError`: the caller retries the
whole batch, which is safe because nothing of it committed.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, Literal

import asyncpg
import msgspec

from processor.contract import (
    EXECUTE_TYPES,
    ROW_REQUEST_TYPES,
    Behavior,
    DeleteRequest,
    RelatedVersion,
    Reply,
    Request,
    RetrieveRequest,
    UpdateRequest,
    decode_reply,
    encode_reply,
    fault_detail,
)
from processor.db import Connection, is_data_error, is_transient
from processor.db.ledger import Ledger, LedgerEntry
from processor.db.registry import Column, Entity, Registry
from processor.db.statements import EntityStatements
from processor.engine.envelope import Envelope, Outcome, Source
from processor.errors import (
    FAULT_TYPES,
    AttributeNotFound,
    ConcurrencyVersionMismatch,
    ConcurrencyVersionNotProvided,
    DuplicateRequest,
    EntityNotFound,
    Fault,
    InvalidArgument,
    ObjectDoesNotExist,
    OptimisticConcurrencyNotEnabled,
    RequestExpired,
    TransientError,
    UnexpectedError,
)

__all__ = [
    "Engine",
    "Envelope",
    "Outcome",
    "Row",
    "Source",
    "is_transient",
    "round_numbers",
    "rows_of",
]

#: Rounds per transaction: each round after the first is a subtransaction, and
#: PostgreSQL caches only 64 subtransaction ids per backend before snapshots get slow.
MAX_ROUNDS: Final = 32

_attrs_decoder: Final = msgspec.json.Decoder(dict[str, Any], float_hook=Decimal)
_json_encoder: Final = msgspec.json.Encoder(decimal_format="number")


def _shown(value: object, limit: int = 64) -> str:
    """A bounded, escaped rendering of untrusted input for fault messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(slots=True)
class _Target:
    entity: Entity
    key: object  # the key as the database returns it (int, str or uuid.UUID)
    wire_id: str | int
    row_version: str | None
    attributes: dict[str, Any] | None
    path: str | None  # None for the request's own row, "related[i]" for a related one
    prior: str | None = None
    new: str | None = None

    @property
    def touch(self) -> tuple[str, object]:
        return (self.entity.name, self.key)


@dataclass(slots=True)
class _Job:
    index: int
    envelope: Envelope
    kind: Literal["update", "delete", "retrieve"]
    behavior: Behavior | None
    targets: list[_Target]
    attributes_json: str | None = None  # retrieve result
    outcome: Outcome | None = None


@dataclass(slots=True)
class _Batch:
    now: datetime
    outcomes: list[Outcome | None]
    jobs: list[_Job] = field(default_factory=list)
    entries: list[LedgerEntry] = field(default_factory=list)
    # index of a later duplicate in the batch -> index of its first occurrence
    echoes: dict[int, int] = field(default_factory=dict)


class _DataError(Exception):
    """A statement failed on a value: redo the batch one request per savepoint."""


class Engine:
    """Applies batches of requests with Dataverse's optimistic-concurrency semantics."""

    def __init__(
        self,
        registry: Registry,
        ledger: Ledger,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        max_rounds: int = MAX_ROUNDS,
    ) -> None:
        self.registry = registry
        self.ledger = ledger
        self._clock = clock
        self._max_rounds = max_rounds
        self._sql = {name: EntityStatements.build(e) for name, e in registry.entities.items()}

    async def process(self, conn: Connection, envelopes: Sequence[Envelope]) -> list[Outcome]:
        """Apply ``envelopes`` in order; one outcome per envelope, in the same order.

        Commits once per chunk of at most ``max_rounds`` rounds (usually once). Raises
        :class:`TransientError` when the database fails; nothing of the failed chunk
        is committed then, and calling again with the same envelopes is safe.
        """
        if not all(isinstance(e.request, ROW_REQUEST_TYPES) for e in envelopes):
            from processor.engine.batches import process_mixed  # built on this module's steps

            return await process_mixed(self, conn, envelopes)
        outcomes: list[Outcome] = []
        for chunk in self._chunks(envelopes):
            try:
                outcomes.extend(await self._process_chunk(conn, chunk))
            except TransientError:
                raise
            except Exception as exc:
                if is_transient(exc):
                    raise TransientError(f"{type(exc).__name__}: {exc}") from exc
                raise
        return outcomes

    def _chunks(self, envelopes: Sequence[Envelope]) -> list[Sequence[Envelope]]:
        """Split where a row would need more than ``max_rounds`` rounds in one transaction."""
        chunks: list[Sequence[Envelope]] = []
        start = 0
        while start < len(envelopes):
            rest = envelopes[start:]
            numbers = round_numbers([rows_of(self.registry, e.request) for e in rest])
            end = next((i for i, n in enumerate(numbers) if n >= self._max_rounds), len(rest))
            chunks.append(rest[:end])
            start += end
        return chunks

    async def _process_chunk(
        self, conn: Connection, envelopes: Sequence[Envelope]
    ) -> list[Outcome]:
        try:
            async with conn.transaction():
                return await self._run(conn, envelopes, isolate=False)
        except _DataError:
            async with conn.transaction():
                return await self._run(conn, envelopes, isolate=True)

    async def _run(
        self, conn: Connection, envelopes: Sequence[Envelope], *, isolate: bool
    ) -> list[Outcome]:
        batch = _Batch(now=self._clock(), outcomes=[None] * len(envelopes))
        stored = await self.ledger.lookup(conn, list({e.request.request_id for e in envelopes}))
        first_seen: dict[str, int] = {}
        for i, env in enumerate(envelopes):
            rid = env.request.request_id
            previous = stored.get(rid)
            if previous is not None:
                if previous.fingerprint == env.fingerprint:
                    batch.outcomes[i] = _replayed(decode_reply(previous.reply), previous.reply)
                else:
                    batch.outcomes[i] = self._duplicate(env, batch.now)
                continue
            if rid in first_seen:
                j = first_seen[rid]
                if envelopes[j].fingerprint == env.fingerprint:
                    batch.echoes[i] = j
                else:
                    batch.outcomes[i] = self._duplicate(env, batch.now)
                continue
            first_seen[rid] = i
            try:
                batch.jobs.append(self._prepare(i, env, batch.now))
            except Fault as fault:
                behavior = self._resolved_behavior(env.request)
                batch.outcomes[i] = self._fault_outcome(env, fault, batch, behavior)

        if isolate:
            for job in batch.jobs:
                await self._run_isolated(conn, job, batch)
        else:
            for number, round_jobs in enumerate(_rounds(batch.jobs)):
                if number == 0:
                    await self._run_round(conn, round_jobs, batch)
                else:
                    # Its own subtransaction: its writes get their own xmin.
                    async with conn.transaction():
                        await self._run_round(conn, round_jobs, batch)

        for job in batch.jobs:
            assert job.outcome is not None
            batch.outcomes[job.index] = job.outcome
        for i, j in batch.echoes.items():
            first = batch.outcomes[j]
            assert first is not None
            batch.outcomes[i] = _replayed(first.reply, first.data)
        await self.ledger.insert(conn, batch.entries)
        return [o for o in batch.outcomes if o is not None]

    # -- checks without the database ------------------------------------------------------

    def _prepare(self, index: int, env: Envelope, now: datetime) -> _Job:
        req = env.row
        if req.expires_at is not None and req.expires_at <= now:
            raise RequestExpired(
                f"request expired at {req.expires_at.isoformat()}, processed at {now.isoformat()}"
            )
        entity = self._entity(req.entity)
        kind: Literal["update", "delete", "retrieve"]
        if isinstance(req, UpdateRequest):
            kind = "update"
            attributes: dict[str, Any] | None = _checked_attributes(entity, req.attributes)
        elif isinstance(req, DeleteRequest):
            kind, attributes = "delete", None
        else:
            assert isinstance(req, RetrieveRequest)
            kind, attributes = "retrieve", None
        main = _Target(
            entity, _key(entity, req.id, "id"), req.id, req.row_version, attributes, None
        )
        targets = [main]
        if isinstance(req, UpdateRequest):
            for n, rel in enumerate(req.related):
                path = f"related[{n}]"
                try:
                    rel_entity = self._entity(rel.entity)
                    target = _Target(
                        rel_entity,
                        _key(rel_entity, rel.id, "id"),
                        rel.id,
                        rel.row_version,
                        _checked_attributes(rel_entity, rel.attributes),
                        path,
                    )
                except Fault as exc:
                    raise exc.at(path) from None
                targets.append(target)
            touches = [t.touch for t in targets]
            if len(set(touches)) != len(touches):
                raise InvalidArgument("a row appears more than once in the request and related")
        behavior = self._resolved_behavior(req)
        if behavior == "IfRowVersionMatches":
            for t in targets:
                problem: Fault | None = None
                if not t.entity.optimistic_concurrency:
                    problem = OptimisticConcurrencyNotEnabled(
                        f"optimistic concurrency is not enabled for entity {t.entity.name!r}"
                    )
                elif t.row_version is None:
                    problem = ConcurrencyVersionNotProvided(
                        "row_version must be provided when concurrency_behavior is "
                        "IfRowVersionMatches"
                    )
                if problem is not None:
                    raise problem.at(t.path) if t.path else problem
        return _Job(index, env, kind, behavior, targets)

    def _resolved_behavior(self, req: Request) -> Behavior | None:
        """What Default means for this request's entity; None for retrieve or no entity."""
        if not isinstance(req, UpdateRequest | DeleteRequest):
            return None
        entity = self.registry.get(req.entity)
        if entity is None:
            return None
        behavior = req.behavior
        return entity.default_behavior if behavior == "Default" else behavior

    def _entity(self, name: str) -> Entity:
        entity = self.registry.get(name)
        if entity is None:
            raise EntityNotFound(f"entity {_shown(name)} is not in the registry")
        return entity

    # -- rounds ---------------------------------------------------------------------------

    async def _run_round(self, conn: Connection, jobs: list[_Job], batch: _Batch) -> None:
        try:
            await self._check_and_apply(conn, jobs, batch)
        except asyncpg.PostgresError as exc:
            if is_data_error(exc):
                raise _DataError() from exc
            if is_transient(exc):
                raise
            raise _DataError() from exc

    async def _run_isolated(self, conn: Connection, job: _Job, batch: _Batch) -> None:
        mark = len(batch.entries)
        try:
            async with conn.transaction():
                await self._check_and_apply(conn, [job], batch)
        except asyncpg.PostgresError as exc:
            if is_transient(exc):
                raise
            del batch.entries[mark:]
            message = (exc.message if hasattr(exc, "message") else str(exc))[:300]
            fault: Fault
            if is_data_error(exc):
                fault = InvalidArgument(f"the database rejected a value: {message}")
                column = getattr(exc, "column_name", None)
                if isinstance(column, str):
                    fault.path = f"attributes.{column}"
            else:
                fault = UnexpectedError(f"the database failed on this request: {message}")
            job.outcome = self._fault_outcome(job.envelope, fault, batch, behavior=job.behavior)

    async def _check_and_apply(self, conn: Connection, jobs: list[_Job], batch: _Batch) -> None:
        locks: dict[str, list[object]] = defaultdict(list)
        reads: dict[str, list[object]] = defaultdict(list)
        for job in jobs:
            for t in job.targets:
                (reads if job.kind == "retrieve" else locks)[t.entity.name].append(t.key)
        current: dict[tuple[str, object], str] = {}
        attributes: dict[tuple[str, object], str] = {}
        for name, keys in locks.items():
            for row in await conn.fetch(self._sql[name].lock, keys):
                current[(name, row["k"])] = row["v"]
        for name, keys in reads.items():
            for row in await conn.fetch(self._sql[name].read, keys):
                current[(name, row["k"])] = row["v"]
                attributes[(name, row["k"])] = row["a"]

        updates: dict[str, list[_Target]] = defaultdict(list)
        deletes: dict[str, list[_Target]] = defaultdict(list)
        winners: list[_Job] = []
        for job in jobs:
            fault = _check_versions(job, current)
            if fault is not None:
                job.outcome = self._fault_outcome(job.envelope, fault, batch, job.behavior)
                continue
            if job.kind == "retrieve":
                job.attributes_json = attributes[job.targets[0].touch]
            for t in job.targets:
                t.prior = current[t.touch]
                if job.kind == "update":
                    updates[t.entity.name].append(t)
                elif job.kind == "delete":
                    deletes[t.entity.name].append(t)
            winners.append(job)

        for name, targets in updates.items():
            new = {
                row["k"]: row["v"]
                for row in await conn.fetch(
                    self._sql[name].update,
                    [t.key for t in targets],
                    [_json_encoder.encode(t.attributes).decode() for t in targets],
                )
            }
            for t in targets:
                t.new = new[t.key]  # the row is locked by us: it is there
        for name, targets in deletes.items():
            gone = {
                row["k"]
                for row in await conn.fetch(self._sql[name].delete, [t.key for t in targets])
            }
            assert all(t.key in gone for t in targets)
        for job in winners:
            job.outcome = self._success_outcome(job, batch)

    # -- outcomes -------------------------------------------------------------------------

    def _success_outcome(self, job: _Job, batch: _Batch) -> Outcome:
        req = job.envelope.row
        main = job.targets[0]
        attrs = None
        if job.kind == "retrieve":
            assert job.attributes_json is not None
            attrs = _attrs_decoder.decode(job.attributes_json)
        reply = Reply(
            request_id=req.request_id,
            type=job.kind,
            entity=req.entity,
            id=req.id,
            status="success",
            processed_at=batch.now,
            row_version=main.prior if job.kind == "retrieve" else main.new,
            behavior_applied=job.behavior,
            attributes=attrs,
            related=[
                RelatedVersion(entity=t.entity.name, id=t.wire_id, row_version=t.new or "")
                for t in job.targets[1:]
            ]
            or None,
        )
        writes = None
        if job.kind != "retrieve":
            writes = _json_encoder.encode(
                [
                    {"entity": t.entity.name, "id": t.wire_id, "prior": t.prior, "new": t.new}
                    for t in job.targets
                ]
            ).decode()
        outcome = Outcome(reply, _json_encoder.encode(reply), applied=job.kind != "retrieve")
        self._record(job.envelope, outcome, batch, writes)
        return outcome

    def _fault_reply(
        self, env: Envelope, fault: Fault, now: datetime, behavior: Behavior | None
    ) -> Outcome:
        req = env.request
        reply = Reply(
            request_id=req.request_id,
            type=req.__struct_config__.tag,  # type: ignore[arg-type]
            entity=getattr(req, "entity", None),  # execute requests have none
            id=getattr(req, "id", None),
            status="fault",
            processed_at=now,
            behavior_applied=behavior,
            fault=fault_detail(fault),
        )
        return Outcome(reply, encode_reply(reply), dead_letter=fault.dead_letter)

    def _fault_outcome(
        self, env: Envelope, fault: Fault, batch: _Batch, behavior: Behavior | None
    ) -> Outcome:
        outcome = self._fault_reply(env, fault, batch.now, behavior)
        # A retryable internal error is not the request's final outcome: a resend retries.
        if not isinstance(fault, UnexpectedError):
            self._record(env, outcome, batch, None)
        return outcome

    def unexpected(self, env: Envelope, exc: BaseException) -> Outcome:
        """The outcome for a request the processor failed on: retryable, not ledgered."""
        fault = UnexpectedError(f"internal error: {type(exc).__name__}")
        return self._fault_reply(env, fault, self._clock(), self._resolved_behavior(env.request))

    def _duplicate(self, env: Envelope, now: datetime) -> Outcome:
        """Not ledgered: the request_id belongs to the first request, whose outcome stands."""
        fault = DuplicateRequest(
            f"request_id {_shown(env.request.request_id)} was already used for a different request"
        )
        return self._fault_reply(env, fault, now, None)

    def _record(self, env: Envelope, outcome: Outcome, batch: _Batch, writes: str | None) -> None:
        reply, src = outcome.reply, env.source
        batch.entries.append(
            LedgerEntry(
                request_id=reply.request_id,
                fingerprint=env.fingerprint,
                type=str(reply.type),
                entity=env.row.entity,
                record_id=str(env.row.id),
                status=reply.status,
                fault_code=reply.fault.code if reply.fault else None,
                applied=outcome.applied,
                writes=writes,
                reply=outcome.data,
                source_topic=src.topic if src else None,
                source_partition=src.partition if src else None,
                source_offset=src.offset if src else None,
                processed_at=batch.now,
            )
        )


def _replayed(reply: Reply, data: bytes) -> Outcome:
    fault_type = FAULT_TYPES.get(reply.fault.code) if reply.fault else None
    return Outcome(
        reply, data, replayed=True, dead_letter=fault_type is not None and fault_type.dead_letter
    )


def _check_versions(job: _Job, current: dict[tuple[str, object], str]) -> Fault | None:
    for t in job.targets:
        version = current.get(t.touch)
        if version is None:
            fault: Fault = ObjectDoesNotExist(
                f"{t.entity.name} with id {_shown(t.wire_id)} does not exist"
            )
            return fault.at(t.path) if t.path else fault
        if job.behavior == "IfRowVersionMatches" and version != t.row_version:
            fault = ConcurrencyVersionMismatch(
                "the version of the existing record doesn't match the row_version provided",
                expected_version=t.row_version,
                current_version=version,
            )
            return fault.at(t.path) if t.path else fault
    return None


#: A row: the entity's logical name and its key as the database compares it.
Row = tuple[str, object]


def rows_of(registry: Registry, request: Request) -> list[Row]:
    """The rows ``request`` touches (its own, then its related ones), keys parsed as the
    engine parses them: ``42`` and ``"42"`` of an integer key are different requests (one
    faults), but a UUID spelled in upper or lower case, with or without braces, is one row.

    The worker's lanes and the engine's rounds both order requests by these rows, so they
    must agree on what "the same row" is. A key that does not parse (the request will
    fault) is used as it was sent. An execute request touches the rows of all its requests.
    """
    if isinstance(request, EXECUTE_TYPES):
        # The union of its requests' rows: per-row order holds across batches too.
        return list(dict.fromkeys(row for r in request.requests for row in rows_of(registry, r)))
    if not isinstance(request, ROW_REQUEST_TYPES):
        return []  # retrieve_entity touches no row
    rows = [_row(registry, request.entity, request.id)]
    if isinstance(request, UpdateRequest):
        rows.extend(_row(registry, r.entity, r.id) for r in request.related)
    return rows


def _row(registry: Registry, name: str, value: str | int) -> Row:
    """What :func:`_key` makes of a key, as a row; a key it refuses stays as sent. Only a
    UUID changes on the way (integer and text keys are compared as given), and this runs
    for every request of every batch: no more work than that."""
    entity = registry.get(name)
    if entity is None:
        return (name, value)
    if entity.key_kind == "uuid" and isinstance(value, str):
        try:
            return (entity.name, uuid.UUID(value))
        except ValueError:
            pass
    return (entity.name, value)


def round_numbers(rows: Sequence[Sequence[Row]]) -> list[int]:
    """For each item in order, the first round after every earlier item sharing a row.

    A round then touches each row at most once, and a row's items keep their order
    across rounds: round ``n`` of a transaction runs before round ``n + 1``.
    """
    numbers: list[int] = []
    last: dict[Row, int] = {}
    for touched in rows:
        number = max((last.get(r, -1) for r in touched), default=-1) + 1
        for r in touched:
            last[r] = number
        numbers.append(number)
    return numbers


def _rounds(jobs: list[_Job]) -> list[list[_Job]]:
    rounds: list[list[_Job]] = []
    for job, number in zip(
        jobs, round_numbers([[t.touch for t in job.targets] for job in jobs]), strict=True
    ):
        if number == len(rounds):
            rounds.append([])
        rounds[number].append(job)
    return rounds


def _key(entity: Entity, value: str | int, path: str) -> object:
    kind = entity.key_kind
    if kind == "int":
        if not isinstance(value, int):
            raise InvalidArgument(f"{entity.name} ids are integers, got a string").at(path)
        low, high = entity.key.int_range or (-(2**63), 2**63 - 1)
        if not low <= value <= high:
            raise InvalidArgument(f"id {value} is out of range for {entity.key.type}").at(path)
        return value
    if not isinstance(value, str):
        raise InvalidArgument(f"{entity.name} ids are strings, got an integer").at(path)
    if kind == "uuid":
        try:
            return uuid.UUID(value)
        except ValueError:
            raise InvalidArgument(f"id {_shown(value)} is not a UUID").at(path) from None
    if "\x00" in value:
        raise InvalidArgument("id contains a NUL character").at(path)
    return value


def _checked_attributes(entity: Entity, attributes: dict[str, Any]) -> dict[str, Any]:
    for name, value in attributes.items():
        column = entity.attributes.get(name)
        if column is None:
            raise AttributeNotFound(
                f"{_shown(name)} is not a writable attribute of entity {entity.name!r}"
            ).at(f"attributes.{name[:63]}")
        problem = _value_problem(column, value)
        if problem is not None:
            raise InvalidArgument(f"{name}: {problem}").at(f"attributes.{name}")
    return attributes


def _value_problem(column: Column, value: Any) -> str | None:
    """Why ``value`` cannot go into ``column``, or None when PostgreSQL should decide."""
    if value is None:
        return None if column.nullable else f"column is NOT NULL ({column.type})"
    category, base = column.category, column.base_type
    if base in ("json", "jsonb"):
        return None
    if category == "N":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"expected a number for {column.type}, got {type(value).__name__}"
        bounds = column.int_range
        if bounds is not None:
            if not isinstance(value, int):
                return f"expected an integer for {column.type}"
            if not bounds[0] <= value <= bounds[1]:
                return f"{value} is out of range for {column.type}"
        return None
    if category == "B":
        return None if isinstance(value, bool) else f"expected true or false, got {_shown(value)}"
    if category == "A":
        return None if isinstance(value, list) else f"expected an array for {column.type}"
    if category in ("S", "D") or base == "uuid":
        if not isinstance(value, str):
            return f"expected a string for {column.type}, got {type(value).__name__}"
        if "\x00" in value:
            return "contains a NUL character"
        return None
    return None
