"""A request's outcome: its reply, encoded once (``contract.encode_reply``, success and
fault alike), and the ledger entry that keeps the reply's exact bytes.

A fault found before the database and one found by it are built here alike; an
``UnexpectedError`` is never ledgered (it is not the request's final outcome: a resend
retries).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Final

import msgspec

from processor.contract import Behavior, RelatedVersion, Reply, encode_reply, fault_detail
from processor.db.ledger import LedgerEntry
from processor.engine.checks import _Batch, _Job, _json_encoder, _shown
from processor.engine.envelope import Envelope, Outcome
from processor.errors import FAULT_TYPES, DuplicateRequest, Fault, UnexpectedError

_attrs_decoder: Final = msgspec.json.Decoder(dict[str, Any], float_hook=Decimal)


def success_outcome(job: _Job, batch: _Batch) -> Outcome:
    """A job that passed its checks and was applied (or read): its reply, ledgered."""
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
    outcome = Outcome(reply, encode_reply(reply), applied=job.kind != "retrieve")
    record(job.envelope, outcome, batch, writes)
    return outcome


def fault_reply(env: Envelope, fault: Fault, now: datetime, behavior: Behavior | None) -> Outcome:
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


def fault_outcome(env: Envelope, fault: Fault, batch: _Batch, behavior: Behavior | None) -> Outcome:
    outcome = fault_reply(env, fault, batch.now, behavior)
    # A retryable internal error is not the request's final outcome: a resend retries.
    if not isinstance(fault, UnexpectedError):
        record(env, outcome, batch, None)
    return outcome


def duplicate(env: Envelope, now: datetime) -> Outcome:
    """Not ledgered: the request_id belongs to the first request, whose outcome stands."""
    fault = DuplicateRequest(
        f"request_id {_shown(env.request.request_id)} was already used for a different request"
    )
    return fault_reply(env, fault, now, None)


def record(env: Envelope, outcome: Outcome, batch: _Batch, writes: str | None) -> None:
    """A row request's ledger row: its reply, and the versions it wrote (``writes``)."""
    row = env.row
    batch.entries.append(
        ledger_entry(env, outcome, batch, entity=row.entity, record_id=str(row.id), writes=writes)
    )


def ledger_entry(
    env: Envelope,
    outcome: Outcome,
    batch: _Batch,
    *,
    entity: str,
    record_id: str,
    writes: str | None,
    applied: bool | None = None,
) -> LedgerEntry:
    """The ledger row of ``outcome``: the exact reply bytes, and where the request came from.

    ``applied`` is the outcome's unless given (an execute's own row: its inner rows apply).
    """
    reply, src = outcome.reply, env.source
    return LedgerEntry(
        request_id=reply.request_id,
        fingerprint=env.fingerprint,
        type=str(reply.type),
        entity=entity,
        record_id=record_id,
        status=reply.status,
        fault_code=reply.fault.code if reply.fault else None,
        applied=outcome.applied if applied is None else applied,
        writes=writes,
        reply=outcome.data,
        source_topic=src.topic if src else None,
        source_partition=src.partition if src else None,
        source_offset=src.offset if src else None,
        processed_at=batch.now,
    )


def replayed(reply: Reply, data: bytes) -> Outcome:
    fault_type = FAULT_TYPES.get(reply.fault.code) if reply.fault else None
    return Outcome(
        reply, data, replayed=True, dead_letter=fault_type is not None and fault_type.dead_letter
    )
