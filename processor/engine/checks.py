"""What the engine decides without the database: a request's job (its entity, keys, values
and concurrency behaviour), its version checks, and the rows and rounds that order a batch.

``engine.py`` runs the jobs against PostgreSQL; ``outcomes.py`` turns them into replies.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

import msgspec

from processor.contract import (
    EXECUTE_TYPES,
    ROW_REQUEST_TYPES,
    Behavior,
    DeleteRequest,
    Request,
    RetrieveRequest,
    UpdateRequest,
)
from processor.db.ledger import LedgerEntry
from processor.db.registry import Column, Entity, Registry
from processor.engine.envelope import Envelope, Outcome
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

#: Attribute values as JSON for the database and the ledger (Decimals stay numbers).
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


def prepare(registry: Registry, index: int, env: Envelope, now: datetime) -> _Job:
    """The job of a row request, checked without the database; raises its :class:`Fault`."""
    req = env.row
    if req.expires_at is not None and req.expires_at <= now:
        raise RequestExpired(
            f"request expired at {req.expires_at.isoformat()}, processed at {now.isoformat()}"
        )
    entity = _entity(registry, req.entity)
    kind: Literal["update", "delete", "retrieve"]
    if isinstance(req, UpdateRequest):
        kind = "update"
        attributes: dict[str, Any] | None = _checked_attributes(entity, req.attributes)
    elif isinstance(req, DeleteRequest):
        kind, attributes = "delete", None
    else:
        assert isinstance(req, RetrieveRequest)
        kind, attributes = "retrieve", None
    main = _Target(entity, _key(entity, req.id, "id"), req.id, req.row_version, attributes, None)
    targets = [main]
    if isinstance(req, UpdateRequest):
        for n, rel in enumerate(req.related):
            path = f"related[{n}]"
            try:
                rel_entity = _entity(registry, rel.entity)
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
    behavior = resolved_behavior(registry, req)
    if behavior == "IfRowVersionMatches":
        for t in targets:
            problem: Fault | None = None
            if not t.entity.optimistic_concurrency:
                problem = OptimisticConcurrencyNotEnabled(
                    f"optimistic concurrency is not enabled for entity {t.entity.name!r}"
                )
            elif t.row_version is None:
                problem = ConcurrencyVersionNotProvided(
                    "row_version must be provided when concurrency_behavior is IfRowVersionMatches"
                )
            if problem is not None:
                raise problem.at(t.path) if t.path else problem
    return _Job(index, env, kind, behavior, targets)


def resolved_behavior(registry: Registry, req: Request) -> Behavior | None:
    """What Default means for this request's entity; None for retrieve or no entity."""
    if not isinstance(req, UpdateRequest | DeleteRequest):
        return None
    entity = registry.get(req.entity)
    if entity is None:
        return None
    behavior = req.behavior
    return entity.default_behavior if behavior == "Default" else behavior


def _entity(registry: Registry, name: str) -> Entity:
    entity = registry.get(name)
    if entity is None:
        raise EntityNotFound(f"entity {_shown(name)} is not in the registry")
    return entity


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
