"""Intake: every record becomes an envelope or a rejection; nothing raises, nothing is lost."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime

import msgspec
import pytest

from processor.contract import DeadLetter, Reply
from processor.engine.envelope import Envelope, Outcome
from processor.errors import MAX_FAULT_MESSAGE, bounded
from processor.worker.intake import (
    DEAD_LETTER_PREFIX,
    Rejected,
    admit,
    outcome_records,
    rejected_records,
)
from tests.support import Msg

NOW = datetime(2026, 1, 1, tzinfo=UTC)


GOOD = b'{"type":"delete","request_id":"r1","entity":"acct","id":1}'


def test_a_valid_request_becomes_an_envelope_with_its_source() -> None:
    item = admit(Msg(GOOD, partition=3, offset=42), max_bytes=1000, now=NOW)
    assert isinstance(item, Envelope)
    assert item.request.request_id == "r1"
    assert item.source is not None
    assert (item.source.topic, item.source.partition, item.source.offset) == ("requests", 3, 42)


@pytest.mark.parametrize(
    ("value", "request_id"),
    [
        (b"not json", None),
        (None, None),
        (b'{"type":"update","request_id":"r2","entity":"acct","id":true}', "r2"),
        (b'{"type":"nope","request_id":"r3"}', "r3"),
        (b'{"request_id":' + b'"' + b"x" * 200 + b'"}', None),
    ],
)
def test_an_undecodable_record_is_rejected_and_addressed_only_when_its_id_is_readable(
    value: bytes | None, request_id: str | None
) -> None:
    item = admit(Msg(value), max_bytes=10_000, now=NOW)
    assert isinstance(item, Rejected)
    assert item.request_id == request_id
    assert (item.reply is not None) == (request_id is not None)
    records = rejected_records(item, reply_topic="replies", dlq_topic="dlq", now=NOW)
    assert [r.topic for r in records] == (["replies", "dlq"] if request_id else ["dlq"])


def test_an_oversized_record_is_not_decoded_and_uses_the_request_id_header() -> None:
    value = b'{"type":"delete"' + b" " * 5000 + b"}"
    msg = Msg(value, headers=[("request_id", b"big-1")], partition=3, offset=42)
    item = admit(msg, max_bytes=1000, now=NOW)
    assert isinstance(item, Rejected)
    assert item.fault.code == -2130771966
    assert item.reply is not None
    assert item.reply.type is None  # never decoded
    records = rejected_records(item, reply_topic="replies", dlq_topic="dlq", now=NOW)
    letter = msgspec.json.decode(records[-1].value, type=DeadLetter)
    assert letter.value_length == len(value)
    assert letter.value_sha256 == hashlib.sha256(value).hexdigest()
    assert letter.value_prefix is not None
    assert base64.b64decode(letter.value_prefix) == value[:DEAD_LETTER_PREFIX]
    assert (letter.source_partition, letter.source_offset) == (3, 42)
    assert records[-1].key == b"acct:1"


def test_a_reply_goes_to_reply_to_with_request_id_and_traceparent_headers() -> None:
    value = b'{"type":"delete","request_id":"r1","entity":"acct","id":1,"reply_to":"mine"}'
    msg = Msg(value, headers=[("traceparent", b"00-abc-def-01"), ("other", b"x")])
    env = admit(msg, max_bytes=1000, now=NOW)
    assert isinstance(env, Envelope)
    reply = Reply(
        request_id="r1", type="delete", entity="acct", id=1, status="success", processed_at=NOW
    )
    out = outcome_records(
        env, msg, Outcome(reply, b"{}"), reply_topic="replies", dlq_topic="dlq", now=NOW
    )
    assert len(out) == 1
    assert out[0].topic == "mine"
    assert out[0].key == b"acct:1"
    assert out[0].headers == [("request_id", b"r1"), ("traceparent", b"00-abc-def-01")]


@pytest.mark.parametrize(
    "value",
    [
        # an unknown field whose name is 100,000 characters: msgspec quotes it
        b'{"type":"update","request_id":"r9","entity":"acct","id":1,"attributes":{"a":1},"'
        + b"x" * 100_000
        + b'":1}',
        # terminal escapes and newlines quoted back in the message
        b'{"type":"update","request_id":"r9","entity":"acct","id":1,"attributes":{"a":1},'
        b'"\\u001b[31m\\n":1}',
    ],
)
def test_a_fault_message_quoting_hostile_input_is_bounded_and_escaped(value: bytes) -> None:
    """Replies and dead letters carry at most MAX_FAULT_MESSAGE characters of the fault's
    message, with control characters escaped: the input never reaches them raw."""
    item = admit(Msg(value), max_bytes=1_000_000, now=NOW)
    assert isinstance(item, Rejected)
    records = rejected_records(item, reply_topic="replies", dlq_topic="dlq", now=NOW)
    reply = msgspec.json.decode(records[0].value, type=Reply)
    assert reply.fault is not None
    message = reply.fault.message
    assert len(message) <= MAX_FAULT_MESSAGE
    assert message.isprintable()
    assert "unknown field" in message
    dead = msgspec.json.decode(records[1].value, type=DeadLetter)
    assert len(dead.error) <= MAX_FAULT_MESSAGE + 40  # "<FaultName>: " + the message
    assert dead.error.isprintable()


def test_bounded_keeps_printable_text_and_marks_what_it_cut() -> None:
    assert bounded("row é changed") == "row é changed"
    assert bounded("a\x1bb\n") == "a\\x1bb\\x0a"
    cut = bounded("y" * 10_000)
    assert len(cut) == MAX_FAULT_MESSAGE
    assert cut.endswith("... (10000 characters)")


@pytest.mark.parametrize(
    "value",
    [
        b"not json",
        b'{"type":"update"}',  # JSON, but no request_id in it
        b'{"type":"delete","request_id":"\x80","entity":"acct","id":1}',  # bad UTF-8
        b'{"type":"delete","request_id":"","entity":"acct","id":1}',  # an id the contract refuses
        None,  # a tombstone
    ],
)
def test_an_unreadable_message_is_addressed_by_its_request_id_header(value: bytes | None) -> None:
    """The README lets producers set a `request_id` header; when the body has no readable
    request_id the header addresses the fault reply (and names the dead letter)."""
    msg = Msg(value, headers=[("traceparent", b"00-abc-def-01"), ("request_id", b"hdr-1")])
    item = admit(msg, max_bytes=10_000, now=NOW)
    assert isinstance(item, Rejected)
    assert item.request_id == "hdr-1"
    records = rejected_records(item, reply_topic="replies", dlq_topic="dlq", now=NOW)
    assert [r.topic for r in records] == ["replies", "dlq"]
    assert records[0].headers == [("request_id", b"hdr-1"), ("traceparent", b"00-abc-def-01")]
    reply = msgspec.json.decode(records[0].value, type=Reply)
    assert (reply.request_id, reply.status) == ("hdr-1", "fault")
    assert reply.fault is not None
    assert reply.fault.code == item.fault.code
    assert msgspec.json.decode(records[1].value, type=DeadLetter).request_id == "hdr-1"


def test_a_readable_request_id_in_the_body_wins_over_the_header() -> None:
    value = b'{"type":"update","request_id":"body-1","entity":"acct","id":true}'
    item = admit(Msg(value, headers=[("request_id", b"hdr-1")]), max_bytes=10_000, now=NOW)
    assert isinstance(item, Rejected)
    assert item.request_id == "body-1"


@pytest.mark.parametrize(
    "header",
    [b"", b"a\x00b", b"x" * 129, b"\xff\xfe", None],
    ids=["empty", "nul", "129-chars", "bad-utf8", "null"],
)
@pytest.mark.parametrize("value", [b"not json", b"x" * 20_000, None], ids=["bad", "big", "none"])
def test_a_request_id_header_the_contract_would_refuse_addresses_nothing(
    header: bytes | None, value: bytes | None
) -> None:
    item = admit(
        Msg(value, headers=[("request_id", header)]),  # type: ignore[list-item]
        max_bytes=10_000,
        now=NOW,
    )
    assert isinstance(item, Rejected)
    assert item.request_id is None
    assert item.reply is None
    records = rejected_records(item, reply_topic="replies", dlq_topic="dlq", now=NOW)
    assert [r.topic for r in records] == ["dlq"]
    assert msgspec.json.decode(records[0].value, type=DeadLetter).request_id is None
