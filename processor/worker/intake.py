"""From Kafka records to engine input, and from outcomes back to Kafka records.

Pure functions, no I/O: a record becomes an :class:`~processor.engine.Envelope`, or a
:class:`Rejected` (its fault reply when it can be addressed, and always a dead letter).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Protocol

import msgspec

from processor.contract import (
    REQUEST_TYPES,
    DeadLetter,
    DeadLetterHeader,
    Reply,
    decode_request,
    encode_reply,
    fault_detail,
    request_key,
    salvage,
)
from processor.engine.envelope import Envelope, Outcome, Source
from processor.errors import Fault, InvalidArgument, RequestTooLarge

__all__ = [
    "DEAD_LETTER_PREFIX",
    "Message",
    "OutRecord",
    "Rejected",
    "admit",
    "outcome_records",
    "rejected_records",
]

#: How much of a bad message's value the dead letter keeps.
DEAD_LETTER_PREFIX: Final = 4096
Headers = Sequence[tuple[str, bytes]]
_PASSED_HEADERS: Final = ("traceparent", "tracestate")
_dead_letter_encoder: Final = msgspec.json.Encoder()


class Message(Protocol):
    """The fields of an aiokafka ConsumerRecord that intake reads."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Headers: ...


@dataclass(frozen=True, slots=True)
class OutRecord:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    #: The request's reply_partition (checked against the topic); None: Kafka picks by key.
    partition: int | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message the engine never saw, and why."""

    message: Message
    fault: Fault
    request_id: str | None
    reply_to: str | None
    reply: Reply | None  # None when no request_id could be read: nothing to correlate
    reply_partition: int | None = None


def _header(headers: Headers, name: str) -> str | None:
    for key, value in headers:
        if key == name and value:
            try:
                return value.decode()
            except UnicodeDecodeError:
                return None
    return None


def _header_request_id(headers: Headers) -> str | None:
    """The ``request_id`` header, if it is one the contract allows in the body (1 to 128
    characters, no NUL): the only address of a message whose body cannot be read."""
    rid = _header(headers, "request_id")
    return rid if rid and len(rid) <= 128 and "\x00" not in rid else None


def admit(message: Message, *, max_bytes: int, now: datetime) -> Envelope | Rejected:
    """Decode one record; never raises for anything the record contains."""
    value = message.value
    if value is not None and len(value) > max_bytes:
        # Not decoded at all: a request_id header is the only way to address a reply.
        fault: Fault = RequestTooLarge(f"message of {len(value)} bytes is over {max_bytes}")
        rid = _header_request_id(message.headers)
        return _rejected(message, fault, rid, None, None, None, None, now)
    if value is None:
        fault = InvalidArgument("message has no value (a tombstone)")
        rid = _header_request_id(message.headers)
        return _rejected(message, fault, rid, None, None, None, None, now)
    try:
        request = decode_request(value)
    except Fault as exc:
        # The body's request_id when it can be read, else the producer's header.
        found = salvage(value)
        rejected = _rejected(
            message,
            exc,
            found.request_id or _header_request_id(message.headers),
            found.reply_to,
            found.type,
            found.entity,
            found.id,
            now,
        )
        return dataclasses.replace(rejected, reply_partition=found.reply_partition)
    source = Source(message.topic, message.partition, message.offset)
    return Envelope.of(request, source)


def reject(envelope: Envelope, message: Message, fault: Fault, now: datetime) -> Rejected:
    """Turn an admitted envelope into a rejection (e.g. its reply_to topic does not exist)."""
    req = envelope.request
    entity, record_id = getattr(req, "entity", None), getattr(req, "id", None)
    return _rejected(
        message, fault, req.request_id, None, req.__struct_config__.tag, entity, record_id, now
    )


def _rejected(
    message: Message,
    fault: Fault,
    request_id: str | None,
    reply_to: str | None,
    type_: object,
    entity: str | None,
    record_id: str | int | None,
    now: datetime,
) -> Rejected:
    reply = None
    if request_id is not None:
        reply = Reply(
            request_id=request_id,
            type=type_ if type_ in REQUEST_TYPES else None,
            entity=entity,
            id=record_id,
            status="fault",
            processed_at=now,
            fault=fault_detail(fault),
        )
    return Rejected(message, fault, request_id, reply_to, reply)


def _reply_headers(message: Message, request_id: str) -> list[tuple[str, bytes]]:
    headers = [("request_id", request_id.encode())]
    headers.extend((k, v) for k, v in message.headers if k in _PASSED_HEADERS)
    return headers


def outcome_records(
    envelope: Envelope,
    message: Message,
    outcome: Outcome,
    *,
    reply_topic: str,
    dlq_topic: str,
    now: datetime,
) -> list[OutRecord]:
    """The reply of an engine outcome, plus a dead letter when the request was bad input."""
    req = envelope.request
    key = message.key if message.key is not None else request_key(req)
    records = [
        OutRecord(
            req.reply_to or reply_topic,
            key,
            outcome.data,
            _reply_headers(message, req.request_id),
            req.reply_partition,
        )
    ]
    if outcome.dead_letter and outcome.reply.fault is not None:
        fault = outcome.reply.fault
        records.append(
            _dead_letter(
                message,
                f"{fault.name}: {fault.message}",
                fault.code,
                req.request_id,
                dlq_topic,
                now,
            )
        )
    return records


def rejected_records(
    rejected: Rejected, *, reply_topic: str, dlq_topic: str, now: datetime
) -> list[OutRecord]:
    """The fault reply (when addressable) and the dead letter of a rejected message."""
    records = []
    message, fault = rejected.message, rejected.fault
    if rejected.reply is not None and rejected.request_id is not None:
        records.append(
            OutRecord(
                rejected.reply_to or reply_topic,
                message.key,
                encode_reply(rejected.reply),
                _reply_headers(message, rejected.request_id),
                rejected.reply_partition,
            )
        )
    error = f"{fault.name}: {fault.message}"
    if fault.path:
        error += f" (at {fault.path})"
    records.append(_dead_letter(message, error, fault.code, rejected.request_id, dlq_topic, now))
    return records


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _dead_letter(
    message: Message,
    error: str,
    code: int | None,
    request_id: str | None,
    dlq_topic: str,
    now: datetime,
) -> OutRecord:
    value = message.value
    letter = DeadLetter(
        error=error[:1000],
        fault_code=code,
        request_id=request_id,
        source_topic=message.topic,
        source_partition=message.partition,
        source_offset=message.offset,
        key=_b64(message.key) if message.key is not None else None,
        headers=[
            DeadLetterHeader(k, _b64(v) if v is not None else None) for k, v in message.headers
        ],
        value_prefix=_b64(value[:DEAD_LETTER_PREFIX]) if value is not None else None,
        value_length=len(value) if value is not None else 0,
        value_sha256=hashlib.sha256(value).hexdigest() if value is not None else None,
        dead_lettered_at=now,
    )
    headers = [*message.headers, ("dlq.error", error[:200].encode())]
    return OutRecord(dlq_topic, message.key, _dead_letter_encoder.encode(letter), headers)
