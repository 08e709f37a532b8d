"""The wire contract: request and reply messages (JSON, UTF-8), decoded and encoded once.

Schema evolution follows msgspec's rules: a new field always gets a default, a field is
never retyped, and ``schemas/`` is regenerated from these structs (a test fails on drift).
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import Annotated, Any, Final, Literal, TypeAlias

import msgspec
from msgspec import Meta, Struct

from processor.errors import Fault, InvalidArgument

__all__ = [
    "BEHAVIORS",
    "EXECUTE_TYPES",
    "MAX_BATCH_REQUESTS",
    "REQUEST_TYPES",
    "ROW_REQUEST_TYPES",
    "AttributeMetadata",
    "Behavior",
    "DeadLetter",
    "DeadLetterHeader",
    "DeleteRequest",
    "EntityMetadata",
    "ExecuteMultipleRequest",
    "ExecuteRequest",
    "ExecuteTransactionRequest",
    "FaultDetail",
    "RelatedEntity",
    "RelatedVersion",
    "Reply",
    "Request",
    "RetrieveEntityRequest",
    "RetrieveRequest",
    "RowRequest",
    "UpdateRequest",
    "behavior_name",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "fault_detail",
    "record_key",
    "request_fingerprint",
    "request_key",
    "salvage",
]

#: PostgreSQL text cannot hold NUL: the ledger stores request_id, entity and id as text,
#: so a NUL in them must fail at decoding, not in the batch's INSERT.
_NO_NUL: Final = "^[^\\x00]*$"
RequestId: TypeAlias = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=128,
        pattern=_NO_NUL,
        description="Idempotency key and correlation id.",
    ),
]
EntityName: TypeAlias = Annotated[
    str,
    Meta(min_length=1, max_length=63, pattern=_NO_NUL, description="The entity's logical name."),
]
#: The ledger indexes (entity, record_id) in a btree, whose entries hold at most 2704 bytes:
#: a longer id failed the whole batch's ledger INSERT. Keys are integers of at most bigint,
#: or strings of at most 256 characters (1024 bytes of UTF-8).
MAX_ID_LENGTH: Final = 256
RecordId: TypeAlias = Annotated[
    Annotated[str, Meta(max_length=MAX_ID_LENGTH, pattern=_NO_NUL)]
    | Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)],
    Meta(description="Primary key value: string or integer per the entity's key."),
]
RowVersion: TypeAlias = Annotated[
    str, Meta(max_length=40, description="Opaque version token from a reply or retrieve.")
]
TopicName: TypeAlias = Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,249}$")]
#: The same, for ``fullmatch``: msgspec checks a pattern with ``re.search``, where ``$`` also
#: matches before a final newline ("replies\n"); in the published (ECMA-262) pattern it
#: does not. decode_request checks reply_to again with this.
_TOPIC_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,249}")
#: How deep an attribute value may nest arrays and objects. msgspec bounds nesting only by
#: the interpreter's recursion limit, which depends on the caller's stack: a value that
#: decoded in intake could fail to encode hundreds of frames deeper, in the engine.
MAX_NESTING: Final = 64
Attributes: TypeAlias = Annotated[
    dict[Annotated[str, Meta(max_length=63)], Any],
    Meta(
        description=f"Column name -> JSON value (arrays and objects nest at most {MAX_NESTING}).",
        max_length=1000,
    ),
]
Behavior: TypeAlias = Literal["Default", "IfRowVersionMatches", "AlwaysOverwrite"]
BehaviorWire: TypeAlias = Annotated[
    Literal["Default", "IfRowVersionMatches", "AlwaysOverwrite", 0, 1, 2],
    Meta(description="ConcurrencyBehavior by name, or Dataverse's numbers 0, 1, 2."),
]

BEHAVIORS: Final[tuple[Behavior, ...]] = ("Default", "IfRowVersionMatches", "AlwaysOverwrite")


def behavior_name(value: str | int) -> Behavior:
    """Normalise a wire behaviour (name or 0/1/2) to its name."""
    if isinstance(value, int):
        return BEHAVIORS[value]
    assert value in BEHAVIORS
    return value


class RelatedEntity(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A related row updated in the same transaction, checked with its own version."""

    entity: EntityName
    id: RecordId
    attributes: Annotated[Attributes, Meta(min_length=1)]
    row_version: RowVersion | None = None


#: A partition of the reply topic (``reply_to``, or the workers' default reply topic).
ReplyPartition: TypeAlias = Annotated[
    int,
    Meta(
        ge=0,
        le=2**31 - 1,
        description="Partition of the reply topic to publish the reply on (default: by key).",
    ),
]
Expiry: TypeAlias = Annotated[datetime, Meta(tz=True)]


class _RequestBase(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag_field="type"):
    # The field order is part of request_fingerprint (ledgered): append, never reorder.
    request_id: RequestId
    entity: EntityName
    id: RecordId
    row_version: RowVersion | None = None
    concurrency_behavior: BehaviorWire = "Default"
    expires_at: Expiry | None = None
    reply_to: TopicName | None = None
    reply_partition: ReplyPartition | None = None

    @property
    def behavior(self) -> Behavior:
        return behavior_name(self.concurrency_behavior)


class UpdateRequest(_RequestBase, frozen=True, tag="update"):
    """Update the row's attributes (never creates it); ``related`` rows in the same txn."""

    attributes: Annotated[Attributes, Meta(min_length=1)]
    related: Annotated[list[RelatedEntity], Meta(max_length=100)] = []


class DeleteRequest(_RequestBase, frozen=True, tag="delete"):
    """Delete the row."""


class RetrieveRequest(_RequestBase, frozen=True, tag="retrieve"):
    """Return the row's attributes and its current version token."""


#: The requests on one row (plus related rows): what an execute request may contain.
RowRequest: TypeAlias = UpdateRequest | DeleteRequest | RetrieveRequest
ROW_REQUEST_TYPES: Final = (UpdateRequest, DeleteRequest, RetrieveRequest)

#: Dataverse's limit on the requests of one ExecuteMultiple / ExecuteTransaction.
MAX_BATCH_REQUESTS: Final = 1000


class _Routed(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, tag_field="type"):
    request_id: RequestId
    expires_at: Expiry | None = None
    reply_to: TopicName | None = None
    reply_partition: ReplyPartition | None = None


class RetrieveEntityRequest(_Routed, frozen=True, tag="retrieve_entity"):
    """Dataverse's RetrieveEntityRequest: the entity's metadata from the workers' registry."""

    entity: EntityName


BatchRequests: TypeAlias = Annotated[
    list[RowRequest],
    Meta(
        min_length=1,
        max_length=MAX_BATCH_REQUESTS,
        description=f"1 to {MAX_BATCH_REQUESTS} update, delete or retrieve requests, applied "
        "in order. Each has its own request_id (unique, also against the outer one); no "
        "reply_to or reply_partition of its own; no execute request inside (no nesting).",
    ),
]


class ExecuteTransactionRequest(_Routed, frozen=True, tag="execute_transaction"):
    """Dataverse's ExecuteTransactionRequest: the requests in order, all or nothing.

    A failure rolls back every request and faults the whole with ``faulted_request_index``
    and that request's own fault; on success the replies come back in order.
    """

    requests: BatchRequests
    return_responses: bool = True


class ExecuteMultipleRequest(_Routed, frozen=True, tag="execute_multiple"):
    """Dataverse's ExecuteMultipleRequest: each request applied on its own, in order.

    A fault stops the rest unless ``continue_on_error``; the responses are every request's
    reply (``return_responses``) or only the faults, each with its ``request_index``.
    """

    requests: BatchRequests
    continue_on_error: bool = False
    return_responses: bool = True


ExecuteRequest: TypeAlias = ExecuteTransactionRequest | ExecuteMultipleRequest
EXECUTE_TYPES: Final = (ExecuteTransactionRequest, ExecuteMultipleRequest)

Request: TypeAlias = (
    UpdateRequest
    | DeleteRequest
    | RetrieveRequest
    | RetrieveEntityRequest
    | ExecuteTransactionRequest
    | ExecuteMultipleRequest
)
RequestType: TypeAlias = Literal[
    "update", "delete", "retrieve", "retrieve_entity", "execute_transaction", "execute_multiple"
]
#: Every request type, by its ``type`` tag.
REQUEST_TYPES: Final[tuple[RequestType, ...]] = (
    "update",
    "delete",
    "retrieve",
    "retrieve_entity",
    "execute_transaction",
    "execute_multiple",
)


def request_key(request: Request) -> bytes:
    """The Kafka key a request is sent with: ``<entity>:<id>`` of its (first) row.

    Kafka keeps a key's requests in one partition, in order; an execute request goes with
    its first row, a retrieve_entity with ``<entity>:*``.
    """
    if isinstance(request, ExecuteTransactionRequest | ExecuteMultipleRequest):
        request = request.requests[0]
    if isinstance(request, RetrieveEntityRequest):
        return f"{request.entity}:*".encode()
    key = record_key(request.entity, request.id)
    assert key is not None  # a decoded request always names its entity and id
    return key


def record_key(entity: object, record_id: object) -> bytes | None:
    """``<entity>:<id>``, the Kafka key of one row's requests (also for raw JSON objects).

    None, no key (the partitioner spreads the record), when the entity is not a non-empty
    string or the id is missing: the one fallback for every producer of requests.
    """
    if not isinstance(entity, str) or not entity or record_id is None:
        return None
    return f"{entity}:{record_id}".encode()


class FaultDetail(Struct, frozen=True, omit_defaults=True, kw_only=True):
    code: int
    name: str
    message: str
    retryable: bool
    expected_version: str | None = None
    current_version: str | None = None
    path: str | None = None


class RelatedVersion(Struct, frozen=True, kw_only=True):
    """A related row's new version after a successful update."""

    entity: str
    id: str | int
    row_version: str


class AttributeMetadata(Struct, frozen=True, kw_only=True):
    """A column of an entity: its logical name and PostgreSQL type."""

    logical_name: str
    type: str
    nullable: bool


class EntityMetadata(Struct, frozen=True, kw_only=True):
    """Dataverse's EntityMetadata, the parts a caller of the processor needs."""

    logical_name: str
    is_optimistic_concurrency_enabled: bool
    #: What ``Default`` means for this entity.
    default_behavior: Literal["AlwaysOverwrite", "IfRowVersionMatches"]
    #: Where row versions come from: PostgreSQL's xmin, or an integer version column.
    row_version: Literal["xmin", "column"]
    row_version_column: str | None
    key: AttributeMetadata
    #: The writable attributes, in table order.
    attributes: list[AttributeMetadata]


class Reply(Struct, frozen=True, kw_only=True):
    """The one reply every request gets, success or fault."""

    request_id: str
    type: RequestType | None
    entity: str | None
    id: str | int | None
    status: Literal["success", "fault"]
    processed_at: datetime
    row_version: str | None = None
    behavior_applied: Behavior | None = None
    attributes: dict[str, Any] | None = None
    related: list[RelatedVersion] | None = None
    fault: FaultDetail | None = None
    #: retrieve_entity: the entity's metadata.
    entity_metadata: EntityMetadata | None = None
    #: execute_*: the inner requests' replies, in order (each with its request_index).
    responses: list[Reply] | None = None
    #: An inner reply: its request's index in the execute request.
    request_index: int | None = None
    #: execute_transaction fault: the index of the request that failed (``fault`` is its own).
    faulted_request_index: int | None = None
    #: execute_multiple: whether any request faulted.
    is_faulted: bool | None = None


class DeadLetterHeader(Struct, frozen=True):
    key: str
    value: str | None  # base64 of the header's bytes


class DeadLetter(Struct, frozen=True, kw_only=True):
    """The dead-letter record's value: the original message, bounded, and why it failed.

    The record's Kafka key and headers are the original ones too, so a consumer of the
    dead-letter topic can route it without decoding this.
    """

    error: str
    fault_code: int | None
    request_id: str | None
    source_topic: str
    source_partition: int
    source_offset: int
    key: str | None  # base64 of the original key
    headers: list[DeadLetterHeader]
    value_prefix: str | None  # base64 of at most the first 4096 bytes of the value
    value_length: int
    value_sha256: str | None
    dead_lettered_at: datetime


def fault_detail(fault: Fault) -> FaultDetail:
    return FaultDetail(
        code=fault.code,
        name=fault.name,
        message=fault.message,
        retryable=fault.retryable,
        expected_version=fault.expected_version,
        current_version=fault.current_version,
        path=fault.path,
    )


_request_decoder: Final = msgspec.json.Decoder(Request)
_encoder: Final = msgspec.json.Encoder(order="deterministic")


_PATH_RE: Final = re.compile(r" - at (?:`key` in )?`\$\.?(?P<path>[^`]*)`$")


_NESTED_RE: Final = re.compile(
    r"Invalid value '(?P<type>execute_transaction|execute_multiple|retrieve_entity)' - at "
    r"`\$\.requests\[(?P<index>\d+)\]\.type`$"
)


def decode_request(data: bytes) -> Request:
    """Decode one request; any defect raises :class:`InvalidArgument` naming the path."""
    try:
        request: Request = _request_decoder.decode(data)
    except msgspec.ValidationError as exc:
        text = str(exc)
        nested = _NESTED_RE.search(text)
        if nested:
            what = "an execute request" if nested["type"] != "retrieve_entity" else "a batch"
            fault = InvalidArgument(
                f"invalid request: {nested['type']} cannot be inside an execute request "
                f"(no nesting; {what} holds update, delete and retrieve requests only)"
            )
            fault.path = f"requests[{nested['index']}].type"
            raise fault from exc
        match = _PATH_RE.search(text)
        if match and match["path"] == "requests" and " of length " in text:
            got = "none" if ">=" in text else f"more than {MAX_BATCH_REQUESTS}"
            text = (
                f"an execute request holds 1 to {MAX_BATCH_REQUESTS} requests, got {got} ({text})"
            )
        fault = InvalidArgument(f"invalid request: {text}")
        if match and match["path"]:
            fault.path = match["path"]
        raise fault from exc
    except msgspec.DecodeError as exc:
        raise InvalidArgument(f"malformed JSON: {exc}") from exc
    except UnicodeDecodeError as exc:  # msgspec's for invalid UTF-8 inside a string
        raise InvalidArgument(f"malformed JSON: a string is not UTF-8 ({exc.reason})") from exc
    except RecursionError as exc:  # msgspec bounds nesting by the interpreter's limit
        raise InvalidArgument("malformed JSON: nested too deeply") from exc
    if request.reply_to is not None and not _TOPIC_RE.fullmatch(request.reply_to):
        fault = InvalidArgument(f"invalid request: reply_to {request.reply_to!r} is not a topic")
        fault.path = "reply_to"
        raise fault
    if isinstance(request, ExecuteTransactionRequest | ExecuteMultipleRequest):
        _check_batch(request)
    elif isinstance(request, UpdateRequest):
        _check_row_nesting(request, "")
    return request


def _check_row_nesting(request: RowRequest, prefix: str) -> None:
    if isinstance(request, UpdateRequest):
        _check_nesting(request.attributes, f"{prefix}attributes")
        for n, rel in enumerate(request.related):
            _check_nesting(rel.attributes, f"{prefix}related[{n}].attributes")


def _check_batch(request: ExecuteRequest) -> None:
    """What the schema cannot say about an execute request's inner requests."""
    seen = {request.request_id: -1}
    for n, inner in enumerate(request.requests):
        where = f"requests[{n}]"
        problem, path = None, ""
        if inner.reply_to is not None or inner.reply_partition is not None:
            field_ = "reply_to" if inner.reply_to is not None else "reply_partition"
            problem = f"{field_} is set on the execute request, not on the requests inside it"
            path = f"{where}.{field_}"
        elif inner.request_id in seen:
            first = seen[inner.request_id]
            problem = (
                "an inner request_id must differ from the execute request's own"
                if first < 0
                else f"request_id is used twice in the batch (also requests[{first}])"
            )
            path = f"{where}.request_id"
        if problem is not None:
            fault = InvalidArgument(f"invalid request: {problem}")
            fault.path = path
            raise fault
        seen[inner.request_id] = n
        _check_row_nesting(inner, f"{where}.")


def _check_nesting(attributes: dict[str, Any], path: str) -> None:
    for name, value in attributes.items():
        if isinstance(value, dict | list) and _nested_deeper(value, MAX_NESTING):
            fault = InvalidArgument(
                f"invalid request: value nested too deeply (over {MAX_NESTING} levels)"
            )
            fault.path = f"{path}.{name}"
            raise fault


def _nested_deeper(value: dict[str, Any] | list[Any], limit: int) -> bool:
    """True when arrays and objects nest more than ``limit`` deep in ``value`` (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


class Salvage(Struct, frozen=True):
    """What can be read from a request that did not decode, to address its fault reply."""

    request_id: str | None = None
    reply_to: str | None = None
    type: str | None = None
    entity: str | None = None
    id: str | int | None = None
    reply_partition: int | None = None


class _Loose(Struct):
    request_id: Any = None
    reply_to: Any = None
    reply_partition: Any = None
    type: Any = None
    entity: Any = None
    id: Any = None


_loose_decoder: Final = msgspec.json.Decoder(_Loose)


def salvage(data: bytes) -> Salvage:
    """Read request_id, reply_to and the target from a message that failed to decode.

    Each field is kept only if it is well formed, so a fault reply never goes to a
    topic or carries an id that the contract would have rejected.
    """
    try:
        loose = _loose_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
        return Salvage()

    def text(value: Any, limit: int) -> str | None:
        if isinstance(value, str) and 0 < len(value) <= limit and "\x00" not in value:
            return value
        return None

    reply_to = text(loose.reply_to, 249)
    record_id = loose.id
    if (
        isinstance(record_id, bool)
        or not isinstance(record_id, str | int)
        or (isinstance(record_id, str) and (len(record_id) > 256 or "\x00" in record_id))
    ):
        record_id = None
    return Salvage(
        request_id=text(loose.request_id, 128),
        reply_to=reply_to if reply_to and _TOPIC_RE.fullmatch(reply_to) else None,
        type=loose.type if loose.type in REQUEST_TYPES else None,
        entity=text(loose.entity, 63),
        id=record_id,
        reply_partition=partition
        if isinstance(partition := loose.reply_partition, int)
        and not isinstance(partition, bool)
        and 0 <= partition < 2**31
        else None,
    )


#: The one encoder of replies, success and fault alike (the engine, execute's replies, intake's
#: rejections): a retrieved numeric attribute (a Decimal, read with ``float_hook=Decimal``)
#: stays a JSON number, and attributes keep the order PostgreSQL returned them in.
_reply_encoder: Final = msgspec.json.Encoder(decimal_format="number")


def encode_reply(reply: Reply) -> bytes:
    return _reply_encoder.encode(reply)


_reply_decoder: Final = msgspec.json.Decoder(Reply)


def decode_reply(data: bytes) -> Reply:
    """A reply's bytes as a :class:`Reply`; raises msgspec's DecodeError or ValidationError."""
    return _reply_decoder.decode(data)


def request_fingerprint(request: Request) -> bytes:
    """SHA-256 of the request's canonical form: equal for the same logical request.

    Key order, the spelling of the behaviour (``1`` or ``"IfRowVersionMatches"``) and the
    ``reply_partition`` (a client resends to the partition it now owns) do not change it;
    any other difference in content does.
    """
    canonical: Request
    if isinstance(request, ExecuteTransactionRequest | ExecuteMultipleRequest):
        canonical = msgspec.structs.replace(
            request, requests=[_canonical_row(r) for r in request.requests]
        )
    elif isinstance(request, RetrieveEntityRequest):
        canonical = request
    else:
        canonical = _canonical_row(request)
    if not isinstance(canonical, ROW_REQUEST_TYPES):
        return hashlib.sha256(
            _encoder.encode(msgspec.structs.replace(canonical, reply_partition=None))
        ).digest()
    # A row request hashes as it did before reply_partition existed, so that the replies
    # ledgered then keep matching; msgspec encodes it last (the last defaulted field).
    data = _encoder.encode(canonical)
    head, tail = data[:-40], data[-40:]  # the field is at most 30 bytes
    return hashlib.sha256(head + _ROUTE_FIELD.sub(b"}", tail, count=1)).digest()


_ROUTE_FIELD: Final = re.compile(rb',"reply_partition":(?:null|\d+)\}$')


def _canonical_row(request: RowRequest) -> RowRequest:
    return msgspec.structs.replace(request, concurrency_behavior=request.behavior)
