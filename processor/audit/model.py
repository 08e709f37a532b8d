"""The audit's vocabulary: the anomaly names, the options, and what it keeps of a record.

Pure: no I/O. The readers (:mod:`.topics`, :mod:`.ledger`) turn records and rows into
these; the checks (:mod:`.checks`, :mod:`.auditor`) judge them; :mod:`.report` says what
was found.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec

from processor.contract import Reply, decode_reply
from processor.engine.envelope import Envelope
from processor.errors import FAULT_TYPES, ConfigError
from processor.worker.intake import Message, admit

MISSING_REPLY: Final = "missing-reply"
DUPLICATE_REPLY: Final = "duplicate-reply"
REPLY_WITHOUT_REQUEST: Final = "reply-without-request"
LEDGER_MISMATCH: Final = "ledger-mismatch"
BROKEN_VERSION_CHAIN: Final = "broken-version-chain"
DOUBLE_APPLICATION: Final = "double-application"
OUT_OF_ORDER_APPLICATION: Final = "out-of-order-application"
UNANSWERED_BAD_INPUT: Final = "unanswered-bad-input"
SPURIOUS_DEAD_LETTER: Final = "spurious-dead-letter"
#: Every anomaly the audit reports, in the order of the report.
ANOMALIES: Final = (
    MISSING_REPLY,
    DUPLICATE_REPLY,
    REPLY_WITHOUT_REQUEST,
    LEDGER_MISMATCH,
    DOUBLE_APPLICATION,
    BROKEN_VERSION_CHAIN,
    OUT_OF_ORDER_APPLICATION,
    UNANSWERED_BAD_INPUT,
    SPURIOUS_DEAD_LETTER,
)

#: `processor audit` exits with this when it found anomalies (1: it could not run, 2: usage).
EXIT_ANOMALIES: Final = 3


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_encoder: Final = msgspec.json.Encoder(order="deterministic")


def digest_of(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def fault_name(code: int | None) -> str:
    if code is None:
        return "none"
    known = FAULT_TYPES.get(code)
    return known.name if known is not None else f"code {code}"


def loc(topic: str, partition: int, offset: int) -> str:
    return f"{topic}[{partition}]@{offset}"


# -- the options ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditOptions:
    """What to audit. The defaults audit everything, strictly (no replays expected)."""

    #: Request records with a timestamp in [since, until) (per partition, by offsets_for_times).
    since: datetime | None = None
    until: datetime | None = None
    #: Or an offset range: partition (None: every partition) -> [start, end); end None: the end.
    offsets: Mapping[int | None, tuple[int, int | None]] | None = None
    #: Consumer groups that replayed the request topic (each adds one expected reply per
    #: record its committed offset is past). The original group is ``settings.group_id``.
    replayed_groups: tuple[str, ...] = ()
    #: Lenient replays: extra copies identical to another copy count as republished.
    accept_republished: bool = False
    #: Per-record history of this entity (and record id) from the ledger.
    entity: str | None = None
    record_id: str | None = None
    history_limit: int = 1000
    #: How far before the first request the reply and dead-letter topics are read.
    reply_slack: timedelta = timedelta(seconds=60)
    #: Also read the existing reply_to topics named by requests.
    reply_to_topics: bool = True
    max_examples: int = 20
    #: request_ids per ledger query.
    chunk: int = 2000

    def validate(self) -> None:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ConfigError(f"--{name} needs a time zone (RFC 3339, e.g. ...Z)")
        if self.since and self.until and self.since >= self.until:
            raise ConfigError("--since must be before --until")
        if self.offsets is not None and (self.since or self.until):
            raise ConfigError("--offsets and --since/--until exclude each other")
        if self.record_id is not None and self.entity is None:
            raise ConfigError("--id needs --entity")
        if self.history_limit <= 0 or self.max_examples < 0 or self.chunk <= 0:
            raise ConfigError("--history-limit and the chunk must be > 0, --max-examples >= 0")
        if self.reply_slack < timedelta(0):
            raise ConfigError("--reply-slack must be >= 0")


@dataclass(frozen=True, slots=True)
class Anomaly:
    kind: str
    detail: str
    request_id: str | None = None
    entity: str | None = None
    record_id: str | None = None
    where: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "detail": self.detail}
        if self.request_id is not None:
            out["request_id"] = self.request_id
        if self.entity is not None:
            out["entity"] = self.entity
            out["id"] = self.record_id
        if self.where:
            out["where"] = list(self.where)
        return out


# -- what the audit keeps of each record --------------------------------------------------


@dataclass(slots=True)
class RequestRecord:
    """One record of the request topic, as the worker's intake classifies it."""

    partition: int
    offset: int
    timestamp: int  # ms
    request_id: str | None
    admitted: bool
    fingerprint: bytes | None = None  # admitted
    fault_code: int | None = None  # rejected: intake's fault
    reply_to: str | None = None
    type: str | None = None
    entity: str | None = None  # kept only for the history's entity
    record_id: str | None = None
    reply_partition: int | None = None
    #: An execute request's inner request_ids: ledgered under their own ids, at its offset.
    inner_ids: frozenset[str] = frozenset()


def read_request(message: Message, timestamp: int, *, max_bytes: int) -> RequestRecord:
    """Classify a request-topic record exactly as the worker's intake does."""
    item = admit(message, max_bytes=max_bytes, now=_EPOCH)
    if isinstance(item, Envelope):
        req = item.request
        return RequestRecord(
            message.partition,
            message.offset,
            timestamp,
            req.request_id,
            True,
            fingerprint=item.fingerprint,
            reply_to=req.reply_to,
            type=req.__struct_config__.tag,  # type: ignore[arg-type]
            entity=getattr(req, "entity", ""),  # execute requests have none
            record_id=str(getattr(req, "id", "")),
            reply_partition=req.reply_partition,
            inner_ids=frozenset(r.request_id for r in getattr(req, "requests", ())),
        )
    return RequestRecord(
        message.partition,
        message.offset,
        timestamp,
        item.request_id,
        False,
        fault_code=item.fault.code,
        reply_to=item.reply_to,
    )


@dataclass(slots=True)
class ReplyCopy:
    """One record of a reply topic: its place, a digest of its bytes and the key fields."""

    topic: str
    partition: int
    offset: int
    request_id: str | None  # None: the value is not a Reply
    digest: bytes
    status: str | None = None
    type: str | None = None
    fault_code: int | None = None
    fault_path: str | None = None
    row_version: str | None = None
    loose: bytes | None = None  # fault replies: digest without processed_at
    #: Applying replies: which application (its new version and processed_at).
    application: str | None = None

    @property
    def applying(self) -> bool:
        return self.status == "success" and self.type in ("update", "delete")

    @property
    def where(self) -> str:
        return loc(self.topic, self.partition, self.offset)

    @property
    def summary(self) -> str:
        if self.status == "fault":
            return f"fault {fault_name(self.fault_code)}"
        if self.row_version is None:  # a delete (or a reply without a version)
            return f"{self.status} {self.type}"
        return f"{self.status} {self.type} version {self.row_version}"


def read_reply(topic: str, partition: int, offset: int, value: bytes | None) -> ReplyCopy:
    data = value or b""
    digest = digest_of(data)
    try:
        reply = decode_reply(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ReplyCopy(topic, partition, offset, None, digest)
    loose = application = None
    if reply.status == "success" and reply.type in ("update", "delete"):
        application = application_of(reply)
    if reply.status == "fault":
        loose = digest_of(_encoder.encode(msgspec.structs.replace(reply, processed_at=_EPOCH)))
    return ReplyCopy(
        topic,
        partition,
        offset,
        reply.request_id,
        digest,
        reply.status,
        reply.type,
        reply.fault.code if reply.fault else None,
        reply.fault.path if reply.fault else None,
        reply.row_version,
        loose,
        application,
    )


def application_of(reply: Reply) -> str:
    """One application of a request: a new version, made at one processed_at."""
    return f"{reply.row_version} at {reply.processed_at.isoformat()}"


@dataclass(frozen=True, slots=True)
class Write:
    """One write of a record, from ``ledger.writes``."""

    request_id: str
    prior: str | None
    new: str | None  # None: a delete
    processed_at: datetime | None = None
    source: str | None = None
    #: The request's source record (topic, partition, offset), when the ledger has it.
    origin: tuple[str, int, int] | None = None
    #: The write is of the request's own record (``writes[0]``), not of a related row.
    own: bool = True
    #: The request is one the audit was asked about (its source is in the audited range);
    #: the others' writes only link chains.
    audited: bool = True


@dataclass(frozen=True, slots=True)
class LedgerFacts:
    fingerprint: bytes
    digest: bytes
    status: str
    type: str
    fault_code: int | None
    applied: bool
    source: tuple[str, int, int] | None
    processed_at: datetime
    application: str | None  # applied and consistent: which application the ledger holds

    @property
    def summary(self) -> str:
        if self.status == "fault":
            return f"fault {fault_name(self.fault_code)}"
        return f"{self.status} {self.type}"


class Progress:
    def __init__(self, sink: Callable[[str], None] | None, interval: float = 2.0) -> None:
        self._sink = sink
        self._interval = interval
        self._last = time.monotonic()
        self._shown: set[str] = set()

    def update(self, label: str, done: int, total: int | None = None) -> None:
        if self._sink is None or time.monotonic() - self._last < self._interval:
            return
        self._last = time.monotonic()
        self._shown.add(label)
        if total:
            self._sink(f"audit: {label}: {done:,}/{total:,} ({100 * done // max(total, 1)}%)")
        else:
            self._sink(f"audit: {label}: {done:,}")

    def done(self, label: str, done: int) -> None:
        if self._sink is not None and label in self._shown:
            self._sink(f"audit: {label}: {done:,} done")
