"""Requests beyond one row: retrieve_entity, execute_transaction and execute_multiple.

Built on the engine's own steps (``_prepare``, ``_check_and_apply`` in rounds, its outcomes
and ledger entries), so an inner request is checked and applied exactly as the same
request on its own would be. :func:`process_mixed` keeps a batch's order: the runs of row
requests go through :meth:`Engine.process`, and each of these requests runs in its own
database transaction, in its place.

**execute_transaction** (Dataverse's ExecuteTransactionRequest): one savepoint around the
inner requests, applied in rounds (a row at most once per round, later rounds in their own
savepoints: no two writes share an xmin token). The first failure *in request order*
rolls the savepoint back; the reply is a fault carrying ``faulted_request_index`` and that
request's own fault. Why the lowest failing index is the right one although rounds run
requests of different rows side by side: a request's outcome depends only on the earlier
requests on its rows, which are in earlier rounds, so every request before the first
failure sees exactly what it would see applied one by one. A value the database rejects
(a CHECK) fails a whole round: the transaction is then redone one request at a time.

**execute_multiple** (ExecuteMultipleRequest): each inner request in its own savepoint
(the engine's isolated path), in order; a fault stops the rest unless
``continue_on_error``. The reply is a success with ``is_faulted`` and the responses (all,
or only the faults without ``return_responses``), each with its ``request_index``.

**Idempotency.** The outer request_id is ledgered with the whole reply, and a redelivery
replays it. Each applied inner request is ledgered too, under its own request_id with its
own reply and writes (so the per-row version history stays complete, and an inner
request_id stays unique: one already in the ledger faults as DuplicateRecord). The outer
row has ``applied = false`` and no writes: the inner rows carry them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Final

import msgspec

from processor.contract import (
    ROW_REQUEST_TYPES,
    ExecuteMultipleRequest,
    ExecuteTransactionRequest,
    Reply,
    RetrieveEntityRequest,
    decode_reply,
    encode_reply,
    fault_detail,
)
from processor.db import Connection
from processor.db.errors import as_transient
from processor.engine.checks import _Batch, _DataError, _Job, _rounds, _shown
from processor.engine.engine import Engine
from processor.engine.envelope import Envelope, Outcome
from processor.engine.metadata import entity_metadata
from processor.engine.outcomes import duplicate, fault_outcome, fault_reply, ledger_entry
from processor.errors import (
    FAULT_TYPES,
    DuplicateRequest,
    EntityNotFound,
    Fault,
    RequestExpired,
    RequestTooLarge,
    UnexpectedError,
)

__all__ = ["MAX_REPLY_BYTES", "process_mixed"]

#: Largest reply an execute request may get: Kafka refuses records over ~1 MB by default,
#: and a reply that cannot be published would hold its partition forever.
MAX_REPLY_BYTES: Final = 900_000


class _Rollback(Exception):
    """Roll back the execute request's savepoint; its outcome is already decided."""


async def process_mixed(
    engine: Engine, conn: Connection, envelopes: Sequence[Envelope]
) -> list[Outcome]:
    """Like :meth:`Engine.process`, for a batch holding requests beyond one row."""
    outcomes: list[Outcome] = []
    run: list[Envelope] = []
    for env in envelopes:
        if isinstance(env.request, ROW_REQUEST_TYPES):
            run.append(env)
            continue
        if run:
            outcomes.extend(await engine.process(conn, run))
            run = []
        with as_transient():
            outcomes.append(await _process_one(engine, conn, env))
    if run:
        outcomes.extend(await engine.process(conn, run))
    return outcomes


async def _process_one(engine: Engine, conn: Connection, env: Envelope) -> Outcome:
    req = env.request
    assert isinstance(
        req, RetrieveEntityRequest | ExecuteTransactionRequest | ExecuteMultipleRequest
    )
    async with conn.transaction():
        inner_ids = (
            [] if isinstance(req, RetrieveEntityRequest) else [r.request_id for r in req.requests]
        )
        stored = await engine.ledger.lookup(conn, [req.request_id, *inner_ids])
        batch = _Batch(now=engine._clock(), outcomes=[])
        previous = stored.get(req.request_id)
        if previous is not None:
            if previous.fingerprint == env.fingerprint:
                return _replayed(decode_reply(previous.reply), previous.reply)
            fault: Fault = DuplicateRequest(
                f"request_id {_shown(req.request_id)} was already used for a different request"
            )
            return _fault(env, fault, batch, ledgered=False)
        if req.expires_at is not None and req.expires_at <= batch.now:
            fault = RequestExpired(
                f"request expired at {req.expires_at.isoformat()}, "
                f"processed at {batch.now.isoformat()}"
            )
            return await _finish(engine, conn, batch, _fault(env, fault, batch))
        if isinstance(req, RetrieveEntityRequest):
            outcome = _retrieve_entity(engine, env, req, batch)
        elif isinstance(req, ExecuteTransactionRequest):
            outcome = await _transaction(engine, conn, env, req, batch, set(stored))
        else:
            outcome = await _multiple(engine, conn, env, req, batch, set(stored))
        return await _finish(engine, conn, batch, outcome)


async def _finish(engine: Engine, conn: Connection, batch: _Batch, outcome: Outcome) -> Outcome:
    await engine.ledger.insert(conn, batch.entries)
    return outcome


def _retrieve_entity(
    engine: Engine, env: Envelope, req: RetrieveEntityRequest, batch: _Batch
) -> Outcome:
    entity = engine.registry.get(req.entity)
    if entity is None:
        fault = EntityNotFound(f"entity {_shown(req.entity)} is not in the registry")
        return _fault(env, fault, batch)
    reply = Reply(
        request_id=req.request_id,
        type="retrieve_entity",
        entity=req.entity,
        id=None,
        status="success",
        processed_at=batch.now,
        entity_metadata=entity_metadata(entity),
    )
    outcome = Outcome(reply, encode_reply(reply))
    _record(env, outcome, batch)
    return outcome


# -- execute_transaction ----------------------------------------------------------------------


async def _transaction(
    engine: Engine,
    conn: Connection,
    env: Envelope,
    req: ExecuteTransactionRequest,
    batch: _Batch,
    known: set[str],
) -> Outcome:
    failed: tuple[int, Outcome] | None = None
    jobs: list[_Job] = []
    for index, inner in enumerate(req.requests):
        ienv = Envelope.of(inner, env.source)
        if inner.request_id in known:
            failed = (index, duplicate(ienv, batch.now))
            break
        try:
            jobs.append(engine._prepare(index, ienv, batch.now))
        except Fault as exc:
            failed = (
                index,
                fault_reply(ienv, exc, batch.now, engine._resolved_behavior(inner)),
            )
            break
    mark = len(batch.entries)
    try:
        outcome = await _apply_transaction(engine, conn, env, req, jobs, batch, failed, False)
    except _DataError:
        # A value the database refused failed a whole round: redo one request at a time.
        del batch.entries[mark:]
        jobs = [engine._prepare(j.index, j.envelope, batch.now) for j in jobs]
        outcome = await _apply_transaction(engine, conn, env, req, jobs, batch, failed, True)
    if outcome.reply.status == "fault":
        del batch.entries[mark:]  # rolled back: the inner requests left no trace
        if outcome.reply.fault is None or outcome.reply.fault.code != UnexpectedError.code:
            _record(env, outcome, batch)
    else:
        _record(env, outcome, batch)
    return outcome


async def _apply_transaction(
    engine: Engine,
    conn: Connection,
    env: Envelope,
    req: ExecuteTransactionRequest,
    jobs: list[_Job],
    batch: _Batch,
    failed: tuple[int, Outcome] | None,
    one_by_one: bool,
) -> Outcome:
    """The transaction's outcome; its savepoint is rolled back unless it succeeded."""
    outcome: Outcome | None = None
    try:
        async with conn.transaction():
            run = _one_by_one if one_by_one else _in_rounds
            failed = await run(engine, conn, jobs, batch, failed)
            outcome = _transaction_outcome(env, req, jobs, failed, batch)
            if outcome.reply.status == "fault":
                raise _Rollback()
    except _Rollback:
        pass
    assert outcome is not None
    return outcome


async def _in_rounds(
    engine: Engine,
    conn: Connection,
    jobs: list[_Job],
    batch: _Batch,
    failed: tuple[int, Outcome] | None,
) -> tuple[int, Outcome] | None:
    """Apply ``jobs`` round by round; the first failure in request order, or ``failed``."""
    for number, round_jobs in enumerate(_rounds(jobs)):
        limit = failed[0] if failed is not None else len(jobs) + 1
        todo = [j for j in round_jobs if j.index < limit]
        if not todo:
            continue
        if number == 0:
            await engine._run_round(conn, todo, batch)
        else:
            async with conn.transaction():  # its own subtransaction: its own xmin
                await engine._run_round(conn, todo, batch)
        failed = _first_failure(todo, failed)
    return failed


async def _one_by_one(
    engine: Engine,
    conn: Connection,
    jobs: list[_Job],
    batch: _Batch,
    failed: tuple[int, Outcome] | None,
) -> tuple[int, Outcome] | None:
    """Each job in its own savepoint, in order, up to the first failure."""
    for job in jobs:
        if failed is not None and job.index >= failed[0]:
            break
        await engine._run_isolated(conn, job, batch)
        failed = _first_failure([job], failed)
    return failed


def _first_failure(
    jobs: list[_Job], failed: tuple[int, Outcome] | None
) -> tuple[int, Outcome] | None:
    for job in jobs:
        assert job.outcome is not None
        if job.outcome.reply.status == "fault" and (failed is None or job.index < failed[0]):
            failed = (job.index, job.outcome)
    return failed


def _transaction_outcome(
    env: Envelope,
    req: ExecuteTransactionRequest,
    jobs: list[_Job],
    failed: tuple[int, Outcome] | None,
    batch: _Batch,
) -> Outcome:
    if failed is not None:
        index, inner = failed
        assert inner.reply.fault is not None
        reply = _outer(req, "fault", batch.now, fault=inner.reply.fault, faulted=index)
        return Outcome(reply, encode_reply(reply), dead_letter=inner.dead_letter)
    responses = None
    if req.return_responses:
        responses = [_indexed(j.outcome, j.index) for j in jobs]
    reply = _outer(req, "success", batch.now, responses=responses)
    applied = any(j.outcome is not None and j.outcome.applied for j in jobs)
    return _bounded(env, Outcome(reply, encode_reply(reply), applied=applied), batch)


# -- execute_multiple ---------------------------------------------------------------------------


async def _multiple(
    engine: Engine,
    conn: Connection,
    env: Envelope,
    req: ExecuteMultipleRequest,
    batch: _Batch,
    known: set[str],
) -> Outcome:
    mark = len(batch.entries)
    outcome: Outcome | None = None
    try:
        async with conn.transaction():
            outcome = await _each(engine, conn, env, req, batch, known)
            if len(outcome.data) > MAX_REPLY_BYTES:
                raise _Rollback()
    except _Rollback:
        # Too large to publish: nothing of it may stand, the caller gets one fault.
        assert outcome is not None
        del batch.entries[mark:]
        return _fault(env, _too_large(len(outcome.data)), batch)
    _record(env, outcome, batch)
    return outcome


async def _each(
    engine: Engine,
    conn: Connection,
    env: Envelope,
    req: ExecuteMultipleRequest,
    batch: _Batch,
    known: set[str],
) -> Outcome:
    results: list[tuple[int, Outcome]] = []
    for index, inner in enumerate(req.requests):
        ienv = Envelope.of(inner, env.source)
        if inner.request_id in known:
            outcome = duplicate(ienv, batch.now)
        else:
            try:
                job = engine._prepare(index, ienv, batch.now)
            except Fault as exc:
                behavior = engine._resolved_behavior(inner)
                outcome = fault_outcome(ienv, exc, batch, behavior)
            else:
                await engine._run_isolated(conn, job, batch)  # its own savepoint
                assert job.outcome is not None
                outcome = job.outcome
        results.append((index, outcome))
        if outcome.reply.status == "fault" and not req.continue_on_error:
            break
    faults = [(i, o) for i, o in results if o.reply.status == "fault"]
    shown = results if req.return_responses else faults
    reply = _outer(
        req,
        "success",
        batch.now,
        responses=[_indexed(o, i) for i, o in shown],
        is_faulted=bool(faults),
    )
    return Outcome(
        reply,
        encode_reply(reply),
        applied=any(o.applied for _, o in results),
        dead_letter=any(o.dead_letter for _, o in faults),
    )


# -- replies and the ledger -------------------------------------------------------------------


def _outer(
    req: ExecuteTransactionRequest | ExecuteMultipleRequest,
    status: str,
    now: datetime,
    *,
    fault: object = None,
    faulted: int | None = None,
    responses: list[Reply] | None = None,
    is_faulted: bool | None = None,
) -> Reply:
    return Reply(
        request_id=req.request_id,
        type=req.__struct_config__.tag,  # type: ignore[arg-type]
        entity=None,
        id=None,
        status=status,  # type: ignore[arg-type]
        processed_at=now,
        fault=fault,  # type: ignore[arg-type]
        faulted_request_index=faulted,
        responses=responses,
        is_faulted=is_faulted,
    )


def _indexed(outcome: Outcome | None, index: int) -> Reply:
    assert outcome is not None
    return msgspec.structs.replace(outcome.reply, request_index=index)


def _bounded(env: Envelope, outcome: Outcome, batch: _Batch) -> Outcome:
    """The outcome, or (not ledgered yet) a fault when its reply could not be published."""
    if len(outcome.data) <= MAX_REPLY_BYTES:
        return outcome
    return _fault(env, _too_large(len(outcome.data)), batch, ledgered=False)


def _too_large(size: int) -> RequestTooLarge:
    return RequestTooLarge(
        f"the reply would be {size} bytes, over {MAX_REPLY_BYTES}: nothing was applied; "
        "send fewer requests, or return_responses=false"
    )


def _fault(env: Envelope, fault: Fault, batch: _Batch, *, ledgered: bool = True) -> Outcome:
    req = env.request
    reply = Reply(
        request_id=req.request_id,
        type=req.__struct_config__.tag,  # type: ignore[arg-type]
        entity=getattr(req, "entity", None),
        id=None,
        status="fault",
        processed_at=batch.now,
        fault=fault_detail(fault),
    )
    outcome = Outcome(reply, encode_reply(reply), dead_letter=fault.dead_letter)
    if ledgered and not isinstance(fault, UnexpectedError):
        _record(env, outcome, batch)
    return outcome


def _replayed(reply: Reply, data: bytes) -> Outcome:
    codes = [reply.fault.code] if reply.fault else []
    codes += [r.fault.code for r in reply.responses or () if r.fault is not None]
    dead = any((t := FAULT_TYPES.get(c)) is not None and t.dead_letter for c in codes)
    return Outcome(reply, data, replayed=True, dead_letter=dead)


def _record(env: Envelope, outcome: Outcome, batch: _Batch) -> None:
    """The outer request's ledger row: its whole reply; the inner rows hold the writes."""
    req = env.request
    entity = req.entity if isinstance(req, RetrieveEntityRequest) else ""
    batch.entries.append(
        ledger_entry(env, outcome, batch, entity=entity, record_id="", writes=None, applied=False)
    )
