"""The wire contract: what decode_request accepts, fingerprints, and salvage of bad messages."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from processor.contract import (
    BEHAVIORS,
    DeleteRequest,
    RelatedEntity,
    Reply,
    Request,
    RetrieveRequest,
    Salvage,
    UpdateRequest,
    behavior_name,
    decode_request,
    encode_reply,
    request_fingerprint,
    salvage,
)
from processor.errors import InvalidArgument


def _raw(message: Any) -> bytes:
    return json.dumps(message).encode()


def _decode(message: Any) -> Request:
    return decode_request(_raw(message))


def _fault(message: Any) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        decode_request(message if isinstance(message, bytes) else _raw(message))
    return info.value


UPDATE: dict[str, Any] = {
    "type": "update",
    "request_id": "req-1",
    "entity": "account",
    "id": 7,
    "attributes": {"name": "Ada", "balance": 12.5, "tags": ["a"], "note": None},
    "row_version": "812",
    "concurrency_behavior": "IfRowVersionMatches",
    "expires_at": "2030-05-01T12:00:00+02:00",
    "reply_to": "client-7.replies",
    "related": [
        {"entity": "item", "id": "sku-9", "attributes": {"qty": 3}, "row_version": "4"},
        {"entity": "note", "id": 2, "attributes": {"body": "x"}},
    ],
}
DELETE: dict[str, Any] = {"type": "delete", "request_id": "req-2", "entity": "item", "id": "a"}
RETRIEVE: dict[str, Any] = {"type": "retrieve", "request_id": "req-3", "entity": "note", "id": 1}


# -- decoding -------------------------------------------------------------------------------


def test_update_decodes_every_field() -> None:
    """An update with every field set decodes to an UpdateRequest with those values."""
    req = _decode(UPDATE)
    assert isinstance(req, UpdateRequest)
    assert req.request_id == "req-1"
    assert (req.entity, req.id) == ("account", 7)
    assert req.attributes == {"name": "Ada", "balance": 12.5, "tags": ["a"], "note": None}
    assert req.row_version == "812"
    assert req.behavior == "IfRowVersionMatches"
    assert req.expires_at == datetime(2030, 5, 1, 10, 0, tzinfo=UTC)
    assert req.reply_to == "client-7.replies"
    assert req.related == [
        RelatedEntity(entity="item", id="sku-9", attributes={"qty": 3}, row_version="4"),
        RelatedEntity(entity="note", id=2, attributes={"body": "x"}, row_version=None),
    ]


def test_delete_and_retrieve_decode_with_defaults() -> None:
    """Minimal delete and retrieve requests get the documented defaults."""
    delete = _decode(DELETE)
    assert isinstance(delete, DeleteRequest)
    assert (delete.entity, delete.id) == ("item", "a")
    retrieve = _decode(RETRIEVE)
    assert isinstance(retrieve, RetrieveRequest)
    for req in (delete, retrieve):
        assert req.row_version is None
        assert req.concurrency_behavior == "Default"
        assert req.behavior == "Default"
        assert req.expires_at is None
        assert req.reply_to is None


def test_minimal_update_has_no_related_rows() -> None:
    """related defaults to an empty list."""
    req = _decode(
        {"type": "update", "request_id": "r", "entity": "e", "id": 1, "attributes": {"a": 1}}
    )
    assert isinstance(req, UpdateRequest)
    assert req.related == []


@pytest.mark.parametrize("tag", ["upsert", "Update", "", None, 1])
def test_unknown_type_tag_is_rejected(tag: object) -> None:
    """Only update, delete and retrieve exist, spelt exactly so."""
    _fault({**DELETE, "type": tag})


def test_missing_type_tag_is_rejected() -> None:
    """A request must say its type."""
    message = dict(DELETE)
    del message["type"]
    _fault(message)


@pytest.mark.parametrize(
    ("wire", "name"),
    [
        ("Default", "Default"),
        ("IfRowVersionMatches", "IfRowVersionMatches"),
        ("AlwaysOverwrite", "AlwaysOverwrite"),
        (0, "Default"),
        (1, "IfRowVersionMatches"),
        (2, "AlwaysOverwrite"),
    ],
)
def test_behavior_by_name_or_dataverse_number(wire: object, name: str) -> None:
    """concurrency_behavior takes the names or Dataverse's 0, 1, 2; .behavior is the name."""
    req = _decode({**DELETE, "concurrency_behavior": wire})
    assert isinstance(req, DeleteRequest)
    assert req.concurrency_behavior == wire
    assert req.behavior == name
    assert behavior_name(wire) == name


@pytest.mark.parametrize(
    "wire", [3, -1, True, False, 1.0, "1", "ifrowversionmatches", "Always Overwrite", None]
)
def test_other_behaviors_are_rejected(wire: object) -> None:
    """No other spelling or number is a behaviour (bools and floats are not 0/1/2)."""
    fault = _fault({**DELETE, "concurrency_behavior": wire})
    assert fault.path == "concurrency_behavior"


def test_behaviors_are_dataverse_order() -> None:
    """The numbers index BEHAVIORS in Dataverse's ConcurrencyBehavior order."""
    assert BEHAVIORS == ("Default", "IfRowVersionMatches", "AlwaysOverwrite")


@pytest.mark.parametrize(
    "message",
    [
        {**DELETE, "extra": 1},
        {**RETRIEVE, "attributes": {"a": 1}},  # attributes only belong to updates
        {**DELETE, "related": []},
        {**UPDATE, "Request_Id": "x"},
    ],
)
def test_unknown_fields_are_rejected(message: dict[str, Any]) -> None:
    """forbid_unknown_fields: a misspelt or misplaced field is an error, not ignored."""
    fault = _fault(message)
    assert "unknown field" in fault.message


def test_unknown_field_in_a_related_entity_names_its_path() -> None:
    """The fault's path points at the related entity that carries the stray field."""
    message = {**UPDATE, "related": [UPDATE["related"][0], {**UPDATE["related"][1], "x": 1}]}
    fault = _fault(message)
    assert fault.path == "related[1]"
    assert "`x`" in fault.message


@pytest.mark.parametrize("request_id", ["r", "x" * 128, "é" * 128, "ü-1 with spaces/and:colons"])
def test_request_id_of_1_to_128_characters_is_accepted(request_id: str) -> None:
    """request_id is any string of 1..128 characters without NUL."""
    assert _decode({**DELETE, "request_id": request_id}).request_id == request_id


@pytest.mark.parametrize("request_id", ["", "x" * 129, "a\x00b", 12, None])
def test_request_id_out_of_bounds_is_rejected_at_its_path(request_id: object) -> None:
    """Empty, longer than 128, with NUL (PostgreSQL text cannot store it) or not a string."""
    assert _fault({**DELETE, "request_id": request_id}).path == "request_id"


def test_missing_request_id_is_rejected() -> None:
    """Every request needs a request_id (its idempotency key)."""
    message = dict(DELETE)
    del message["request_id"]
    assert "request_id" in _fault(message).message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("entity", ""),
        ("entity", "e" * 64),
        ("entity", "a\x00"),
        ("id", 1.5),
        ("id", True),
        ("id", None),
        ("id", "a\x00"),
        ("id", [1]),
        ("row_version", "1" * 41),
        ("row_version", 5),
        ("reply_to", ""),
        ("reply_to", "has space"),
        ("reply_to", "a" * 250),
        ("reply_to", "a/b"),
    ],
)
def test_field_bounds_are_enforced_at_their_path(field: str, value: object) -> None:
    """Entity 1..63, id string (no NUL) or integer, row_version <= 40, reply_to a topic."""
    assert _fault({**DELETE, field: value}).path == field


def test_update_needs_one_to_1000_attributes() -> None:
    """attributes must be a non-empty object of at most 1000 entries, names <= 63."""
    base = {k: v for k, v in UPDATE.items() if k != "related"}
    assert _fault({**base, "attributes": {}}).path == "attributes"
    big = {f"c{i}": i for i in range(1001)}
    assert _fault({**base, "attributes": big}).path == "attributes"
    assert isinstance(
        _decode({**base, "attributes": dict(list(big.items())[:1000])}), UpdateRequest
    )
    long_name = _fault({**base, "attributes": {"a" * 64: 1}})
    assert long_name.path == "attributes"
    related = _fault({**UPDATE, "related": [{"entity": "e", "id": 1, "attributes": {"a" * 64: 1}}]})
    assert related.path == "related[0].attributes"


def test_at_most_100_related_entities() -> None:
    """related is bounded, so one request cannot lock an unbounded number of rows."""
    rel = [{"entity": "e", "id": i, "attributes": {"a": 1}} for i in range(101)]
    assert _fault({**UPDATE, "related": rel}).path == "related"
    assert isinstance(_decode({**UPDATE, "related": rel[:100]}), UpdateRequest)


@pytest.mark.parametrize(
    "expires_at", ["2030-01-01T00:00:00", "2030-01-01", "tomorrow", 1893456000]
)
def test_expires_at_without_a_timezone_is_rejected(expires_at: object) -> None:
    """A deadline must be an instant: tz-less datetimes, dates and numbers are rejected."""
    assert _fault({**DELETE, "expires_at": expires_at}).path == "expires_at"


def test_expires_at_with_a_timezone_is_kept_as_given() -> None:
    """Z and numeric offsets are accepted and compare as instants."""
    utc = _decode({**DELETE, "expires_at": "2030-01-01T00:00:00Z"}).expires_at
    plus2 = _decode({**DELETE, "expires_at": "2030-01-01T02:00:00+02:00"}).expires_at
    assert utc == plus2 == datetime(2030, 1, 1, tzinfo=UTC)
    assert plus2 is not None
    assert plus2.utcoffset() == timedelta(hours=2)
    assert plus2.tzinfo == timezone(timedelta(hours=2))


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"not json", b'{"type": "delete",}', b"\xff\xfe", b'{"type":"delete"} trailing'],
)
def test_malformed_json_is_invalid_argument(data: bytes) -> None:
    """Bytes that are not one JSON document fault InvalidArgument, never another exception."""
    fault = _fault(data)
    assert fault.code == InvalidArgument.code


@pytest.mark.parametrize("data", [b"[]", b"null", b"1", b'"update"'])
def test_json_that_is_not_an_object_is_invalid_argument(data: bytes) -> None:
    """The top level must be an object."""
    _fault(data)


def test_deeply_nested_attribute_value_is_rejected_not_a_crash() -> None:
    """A hostile nesting depth is an InvalidArgument, not a RecursionError."""
    depth = 100_000
    data = (
        b'{"type":"update","request_id":"r","entity":"e","id":1,"attributes":{"a":'
        + b"[" * depth
        + b"]" * depth
        + b"}}"
    )
    _fault(data)


# -- fingerprints ---------------------------------------------------------------------------


def _fingerprint(message: dict[str, Any]) -> bytes:
    return request_fingerprint(_decode(message))


def test_fingerprint_ignores_key_order() -> None:
    """The same request with its keys (and attribute keys) in another order: same hash."""
    reordered = {k: UPDATE[k] for k in reversed(list(UPDATE))}
    reordered["attributes"] = {k: UPDATE["attributes"][k] for k in reversed(UPDATE["attributes"])}
    reordered["related"] = [{k: r[k] for k in reversed(list(r))} for r in UPDATE["related"]]
    assert json.dumps(reordered) != json.dumps(UPDATE)
    assert _fingerprint(reordered) == _fingerprint(UPDATE)


@pytest.mark.parametrize(
    ("number", "name"), [(0, "Default"), (1, "IfRowVersionMatches"), (2, "AlwaysOverwrite")]
)
def test_fingerprint_ignores_behavior_spelling(number: int, name: str) -> None:
    """1 and "IfRowVersionMatches" are the same request."""
    assert _fingerprint({**UPDATE, "concurrency_behavior": number}) == _fingerprint(
        {**UPDATE, "concurrency_behavior": name}
    )


def test_fingerprint_of_omitted_behavior_equals_explicit_default() -> None:
    """Leaving concurrency_behavior out means Default."""
    assert _fingerprint(DELETE) == _fingerprint({**DELETE, "concurrency_behavior": 0})


@pytest.mark.parametrize(
    "change",
    [
        {"request_id": "req-1b"},
        {"entity": "accounts"},
        {"id": 8},
        {"id": "7"},
        {"row_version": "813"},
        {"row_version": None},
        {"concurrency_behavior": "AlwaysOverwrite"},
        {"concurrency_behavior": 0},
        {"expires_at": "2030-05-01T12:00:01+02:00"},
        {"expires_at": None},
        {"reply_to": "other"},
        {"reply_to": None},
        {"attributes": {**UPDATE["attributes"], "name": "Bob"}},
        {"attributes": {**UPDATE["attributes"], "extra": 1}},
        {"attributes": {**UPDATE["attributes"], "note": 0}},
        {"related": UPDATE["related"][:1]},
        {"related": list(reversed(UPDATE["related"]))},
        {"related": [{**UPDATE["related"][0], "row_version": "5"}, UPDATE["related"][1]]},
        {"related": [UPDATE["related"][0], {**UPDATE["related"][1], "attributes": {"body": "y"}}]},
    ],
    ids=lambda c: ",".join(f"{k}={v!r}"[:40] for k, v in c.items()),
)
def test_fingerprint_changes_with_any_content(change: dict[str, Any]) -> None:
    """Any other difference (a value, a type, an order of related rows) is another request."""
    assert _fingerprint({**UPDATE, **change}) != _fingerprint(UPDATE)


def test_fingerprint_differs_between_request_types() -> None:
    """A delete and a retrieve of the same row with the same id are different requests."""
    assert _fingerprint(DELETE) != _fingerprint({**DELETE, "type": "retrieve"})


def test_fingerprint_is_a_sha256_digest() -> None:
    """32 bytes, stable across calls."""
    assert len(_fingerprint(UPDATE)) == 32
    assert _fingerprint(UPDATE) == _fingerprint(dict(UPDATE))


# -- salvage --------------------------------------------------------------------------------


def test_salvage_keeps_well_formed_fields_of_an_invalid_request() -> None:
    """A request that fails validation still gets a fault reply to the right place."""
    broken = {**UPDATE, "attributes": {}, "id": 7}
    data = _raw(broken)
    _fault(data)
    assert salvage(data) == Salvage(
        request_id="req-1",
        reply_to="client-7.replies",
        type="update",
        entity="account",
        id=7,
    )


@pytest.mark.parametrize(
    "data", [b"", b"not json", b"[1, 2]", b'"x"', b"null", b'{"request_id": "r"', b"\xff"]
)
def test_salvage_of_non_objects_is_empty(data: bytes) -> None:
    """Nothing can be read from bytes that are not a JSON object."""
    assert salvage(data) == Salvage()


@pytest.mark.parametrize("request_id", ["", "x" * 129, 12, ["r"], {"a": 1}, None, "a\x00b"])
def test_salvage_drops_a_malformed_request_id(request_id: object) -> None:
    """A request_id the contract would reject is not echoed in a reply."""
    found = salvage(_raw({"request_id": request_id, "reply_to": "ok"}))
    assert found.request_id is None
    assert found.reply_to == "ok"


@pytest.mark.parametrize("reply_to", ["", "a b", "../etc", "x" * 250, "a\x00", 5, ["t"], "tópic"])
def test_salvage_drops_a_malformed_reply_to(reply_to: object) -> None:
    """A fault reply never goes to a topic the contract would have rejected."""
    found = salvage(_raw({"request_id": "r", "reply_to": reply_to}))
    assert found.reply_to is None
    assert found.request_id == "r"


def test_salvage_keeps_the_longest_valid_values() -> None:
    """The bounds are the contract's: request_id 128 characters, reply_to 249."""
    found = salvage(_raw({"request_id": "x" * 128, "reply_to": "t" * 249}))
    assert found.request_id == "x" * 128
    assert found.reply_to == "t" * 249


@pytest.mark.parametrize(
    ("field", "value", "kept"),
    [
        ("type", "upsert", None),
        ("type", "delete", "delete"),
        ("entity", "e" * 64, None),
        ("entity", 5, None),
        ("entity", "e" * 63, "e" * 63),
        ("id", True, None),
        ("id", 1.5, None),
        ("id", "i" * 257, None),
        ("id", "a\x00", None),
        ("id", "i" * 256, "i" * 256),
        ("id", -3, -3),
    ],
)
def test_salvage_keeps_only_well_formed_targets(field: str, value: object, kept: object) -> None:
    """type, entity and id are echoed only when they look like the contract's."""
    found = salvage(_raw({"request_id": "r", field: value}))
    assert getattr(found, field) == kept


def test_salvage_of_a_deeply_nested_message_is_empty_not_a_crash() -> None:
    """Hostile nesting in any field cannot make salvage raise."""
    depth = 100_000
    data = b'{"request_id":"r","id":' + b"[" * depth + b"]" * depth + b"}"
    assert salvage(data) == Salvage()


def test_one_reply_encoder_keeps_a_retrieved_number_a_number_alone_and_inside_an_execute() -> None:
    """Success, fault and execute replies share one encoder: a numeric attribute read back
    as a Decimal is a JSON number in a retrieve's reply and in an execute's responses alike
    (two encoders once made it a string inside an execute)."""
    at = datetime(2026, 1, 1, tzinfo=UTC)
    inner = Reply(
        request_id="r1",
        type="retrieve",
        entity="account",
        id=1,
        status="success",
        processed_at=at,
        attributes={"balance": Decimal("10.50"), "name": "a"},
    )
    outer = Reply(
        request_id="x",
        type="execute_multiple",
        entity=None,
        id=None,
        status="success",
        processed_at=at,
        responses=[inner],
    )
    assert json.loads(encode_reply(inner))["attributes"] == {"balance": 10.5, "name": "a"}
    assert json.loads(encode_reply(outer))["responses"][0]["attributes"]["balance"] == 10.5
    assert b'"balance":10.50' in encode_reply(outer)
