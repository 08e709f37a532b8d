"""``processor audit``: prove from the topics and the ledger what happened to every request.

Read-only. It reads the request topic, the reply topic (and every existing ``reply_to``
topic a request names), the dead-letter topic, all ``read_committed`` as the workers and
clients see them, and the request ledger, and checks the promises of docs/design.md.

**Scope.** The request topic is read from the beginning of every partition (a *complete*
audit when no record was deleted by retention), from a time range (``since``/``until``,
mapped to offsets with ``offsets_for_times``: the first record at or after each time), or
from an offset range. The reply and dead-letter topics are read from the range's earliest
request timestamp minus ``reply_slack`` (clock skew between producers) up to their end.
Their end offsets are taken *before* the request topic's, so a reply read always has its
request read too (a live system shows its in-flight requests as missing replies: audit
a quiet system, or use ``until``). End offsets are the last stable offsets: after a worker
was killed, its open transaction hides later replies until the broker aborts it (the
60 s transaction timeout), so wait that long before auditing.

**Request records.** A record decodes to a request (``processor.intake.admit``, exactly the
worker's rules, including ``PROCESSOR_MAX_MESSAGE_BYTES``) or is *rejected* (undecodable,
tombstone, oversize); a rejected record with a readable request_id gets a fault reply, and
every rejected record gets a dead letter. Each record is one request *delivery*: a client
resend (same request_id) is another record and gets its own reply.

**Checks** (each anomaly is counted, and the first ``max_examples`` of each kind are kept):

- ``missing-reply`` (Jepsen's *lost*): a request_id has fewer replies than its records
  times their passes (below). The detail says whether the worker group had consumed the
  record (committed offset past it: lost) or not (not processed yet).
- ``duplicate-reply``: more replies than records times passes (Jepsen's *duplicated*).
- ``reply-without-request``: a reply on the reply topic whose request is not on the
  request topic: no record with its request_id and no ledger row, or a ledger row citing a
  source offset (inside the audited range) that holds no such request; also an
  undecodable reply. A reply whose ledger row cites a source outside the audited range (or
  another topic) is counted as out of scope; in a partial audit a reply without a ledger
  row cannot be placed and is counted as unverifiable, not as an anomaly, and extra
  replies of a request whose ledgered delivery lies outside the range are out of scope
  too (a resend straddling the range's end can still look like a duplicate-reply: the
  detail says so).
- ``ledger-mismatch``: a reply of a ledgered request is not byte for byte the ledger's
  ``reply``; a ledgered outcome (a success, or a fault other than the non-ledgered ones
  below) with no ledger row; a ledger row inconsistent in itself (reply bytes vs status,
  fault_code, type, entity, record_id, applied, writes, the reply's row_version vs the
  last write) or with its source record (the offset holds another request, another
  fingerprint, or nothing). Not ledgered by design, so never a mismatch: ``UnExpected``
  faults, ``DuplicateRecord`` faults (the id's ledger row is the first request's), and
  intake rejections (``InvalidArgument``/``RequestTooLarge`` of an undecodable record, or
  of a ``reply_to`` topic that did not exist).
- ``double-application``: one request applied twice. The ledger's primary key makes two
  rows impossible, so the evidence is (a) two *different applications* among the applying
  replies (success of an update or delete) of one request_id and its (consistent) ledger
  row, an application being a new row_version made at one processed_at: e.g. a ledger row
  pruned or lost and the request replayed (the lost row's write then also leaves a gap in
  the record's chain); or (b) one ledger row whose writes list the same record twice.
- ``broken-version-chain``: a record's writes (``ledger.writes`` of every applied row,
  ordered by processed_at, source partition and offset) do not form one chain. Within an
  incarnation (a delete ends one; a later write starts the next, after an insert outside
  the processor) the writes must link prior -> new into a single path: a fork (two writes
  over the same version: a lost update), a gap (a prior no write produced), a version
  produced twice or a cycle breaks it. Links are followed by value, so two workers'
  batches whose processed_at clocks disagree still chain. A write made outside the
  processor (plain SQL) shows as a gap: the audit proves the processor was the only writer.
  Judged only where the ledger sees the chain through the audited requests: the records
  they wrote (other topics' records are not read), from each record's first write by an
  audited request on (what came before, another topic's traffic or a reset by plain SQL,
  is where the chain enters the range); other requests' writes in between link the chain,
  and a break that involves none of the audited writes is counted as not judged.
- ``out-of-order-application``: a record's writes, followed along its version chain (the
  order they were applied in), do not follow the request topic's offsets: a request of
  the record's own key was applied after a request that came later on the same partition
  (per-key order broken, e.g. two lanes or two owners applying one key's requests
  concurrently). Checked per incarnation whose chain is linked (a broken chain has no
  order to check), on the record's own writes only (``writes[0]``: related rows are keyed
  by another record and may legitimately interleave), and per source topic and partition
  (a key maps to one partition when producers key requests ``<entity>:<id>``).
- ``unanswered-bad-input``: a record that needed a dead letter (rejected at intake, or its
  outcome is a dead-letter fault: InvalidArgument, QueryBuilderNoEntity,
  QueryBuilderNoAttribute, DuplicateRecord, RequestExpired, RequestTooLarge) has none on
  the dead-letter topic (matched by source_topic/partition/offset).
- ``spurious-dead-letter``: a dead letter for a record whose outcome needs none, or citing
  an offset of the audited range that holds no record.

**Replays.** Replaying the request topic through a new consumer group republishes every
outcome: ledgered replies byte for byte, and the non-ledgered ones (intake rejections,
DuplicateRecord) again with a new processed_at; rows do not change. So after a replay the
reply topic legitimately holds a second copy of each reply. The audit does not guess:
``replayed_groups`` names the groups that replayed, and each record expects one reply per
pass: one for the original group plus one for every replayed group whose committed offset
(read from the broker) is past the record, so a replay interrupted halfway is accounted
for exactly. Copies within that count are reported as ``republished``, copies beyond it as
duplicate-reply, and a replayed copy of a ledgered reply must still be the ledger's bytes.
``accept_republished`` is the lenient alternative for when the replaying groups are
unknown or their offsets expired: extra copies identical to another copy of the same
request (byte for byte; for fault replies, equal but for processed_at) count as
republished; only an extra copy that differs is a duplicate-reply. It cannot tell a real
duplicate publication from a replay, hence it is off by default. Without either, an extra
copy is a duplicate-reply, and when every reply has the same number of extra copies the
report says it looks like a replay. Run the audit when the replay has caught up (the
replay group's offsets and its replies are committed together; a replay still running
shows its latest batch as duplicates or missing).

**Scale.** Topics are read in batches with per-partition end offsets; per request the audit
keeps a few small fields and a 16-byte digest of each reply, not the bytes. Ledger rows are
fetched by request_id in chunks inside one REPEATABLE READ READ ONLY snapshot, and two
passes are streamed with server-side cursors: the rows citing the audited offsets, and the
applied writes of the records the audited requests wrote, in the processed_at window of
those requests, sorted by record in the database, so memory holds one record's history at
a time. Progress goes to ``progress`` (stderr for the command) every 2 s.

**A shared ledger.** Other request topics (or other deployments) may share the ledger
schema: the audit judges its request topic's requests and the rows they wrote, counts the
ledger rows of other topics, and says so (``AuditReport.coverage``: what was judged, what
was not).

**History.** ``entity`` (and ``record_id``) adds that record's ledger history; it is a
query: ``AuditReport.history_ok`` (the command's exit status with ``--entity``) depends on
the anomalies of its records and requests alone (``history_anomalies``).

Entry point: ``await run_audit(settings, AuditOptions(...)) -> AuditReport``;
``report.ok`` is True when no anomaly was found.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import asyncpg
import msgspec
from aiokafka import TopicPartition

from processor import db, kafka
from processor.config import Settings
from processor.contract import DeadLetter, Reply, decode_reply
from processor.engine import Envelope
from processor.errors import (
    FAULT_TYPES,
    ConfigError,
    DuplicateRequest,
    InvalidArgument,
    ProcessorError,
    RequestTooLarge,
    UnexpectedError,
)
from processor.intake import Message, admit
from processor.ledger import Ledger, LedgerEntry

__all__ = [
    "ANOMALIES",
    "BROKEN_VERSION_CHAIN",
    "DOUBLE_APPLICATION",
    "DUPLICATE_REPLY",
    "EXIT_ANOMALIES",
    "LEDGER_MISMATCH",
    "MISSING_REPLY",
    "OUT_OF_ORDER_APPLICATION",
    "REPLY_WITHOUT_REQUEST",
    "SPURIOUS_DEAD_LETTER",
    "UNANSWERED_BAD_INPUT",
    "Anomaly",
    "AuditOptions",
    "AuditReport",
    "Auditor",
    "ReplyCopy",
    "RequestRecord",
    "Write",
    "add_arguments",
    "check_chain",
    "judge_chain",
    "ledger_row_problems",
    "parse_offsets",
    "read_reply",
    "read_request",
    "run_audit",
    "run_from_args",
]

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

_DUPLICATE: Final = DuplicateRequest.code
_UNEXPECTED: Final = UnexpectedError.code
_INTAKE_CODES: Final = frozenset({InvalidArgument.code, RequestTooLarge.code})
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_dead_decoder: Final = msgspec.json.Decoder(DeadLetter)
_encoder: Final = msgspec.json.Encoder(order="deterministic")


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _fault_name(code: int | None) -> str:
    if code is None:
        return "none"
    known = FAULT_TYPES.get(code)
    return known.name if known is not None else f"code {code}"


def _loc(topic: str, partition: int, offset: int) -> str:
    return f"{topic}[{partition}]@{offset}"


# -- the options and the report ------------------------------------------------------------


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


def _n(count: int, word: str, plural: str | None = None) -> str:
    """``1 reply``, ``2 replies``: a count with its noun."""
    if count == 1:
        return f"{count:,} {word}"
    if plural is None:
        plural = word[:-1] + "ies" if word.endswith("y") and word[-2:] != "ey" else word + "s"
    return f"{count:,} {plural}"


@dataclass(slots=True)
class AuditReport:
    """What the audit read and found. ``ok``: no anomaly of any kind."""

    scope: dict[str, Any]
    counts: dict[str, int]
    outcomes: dict[str, int]
    fault_codes: dict[str, dict[str, Any]]
    anomalies: dict[str, int]
    examples: dict[str, list[dict[str, Any]]]
    notes: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] | None = None
    #: What the audit judged, and what it saw but could not or need not judge.
    coverage: dict[str, list[str]] = field(default_factory=dict)
    #: With a history (``--entity``): the anomalies that concern its records and requests.
    history_anomalies: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(self.anomalies.values())

    @property
    def history_ok(self) -> bool:
        """The history's records and requests have no anomaly (whatever is found elsewhere)."""
        return not self.history_anomalies

    def count(self, kind: str) -> int:
        return self.anomalies.get(kind, 0)

    def found(self) -> set[str]:
        """The kinds of anomaly found."""
        return {kind for kind, n in self.anomalies.items() if n}

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "scope": self.scope,
            "coverage": self.coverage,
            "counts": self.counts,
            "outcomes": self.outcomes,
            "fault_codes": self.fault_codes,
            "anomalies": self.anomalies,
            "examples": self.examples,
            "notes": self.notes,
            "history": self.history,
            "history_anomalies": self.history_anomalies,
        }

    def to_json(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self.to_dict()), indent=2)

    def render(self) -> str:
        """The human summary (with a history: the history, and one line on the rest)."""
        if self.history is not None:
            return self._render_history()
        s = self.scope
        total = sum(self.anomalies.values())
        lines = [
            "processor audit: "
            + ("OK, no anomalies" if self.ok else f"FAILED, {_n(total, 'anomaly')}"),
            f"  requests      {s['request_topic']}: {s['range']}",
            f"  replies       {', '.join(s['reply_topics'])}",
            f"  dead letters  {s['dlq_topic']}    ledger {s['ledger']}",
            f"  expected      {self._expected()}",
            "",
            "judged:",
        ]
        lines += [f"  - {line}" for line in self.coverage.get("judged", [])]
        not_judged = self.coverage.get("not_judged", [])
        lines.append("not judged:" + ("" if not_judged else " nothing"))
        lines += [f"  - {line}" for line in not_judged]
        lines += ["", "outcomes (per request record):"]
        width = max((len(k) for k in self.outcomes), default=0)
        lines += [f"  {k.ljust(width)}  {n:,}" for k, n in sorted(self.outcomes.items())]
        if self.fault_codes:
            lines.append("fault codes:")
            lines += [
                f"  {code:>12}  {v['name']:<32} {v['count']:,}"
                for code, v in sorted(self.fault_codes.items())
            ]
        lines.append("")
        lines.append("anomalies:" + ("" if total else " none"))
        for kind in ANOMALIES:
            n = self.anomalies.get(kind, 0)
            if not n:
                continue
            lines.append(f"  {kind}: {n:,}")
            lines += [f"    - {_example(e)}" for e in self.examples.get(kind, [])]
            if n > len(self.examples.get(kind, [])):
                lines.append(f"    ... {n - len(self.examples.get(kind, [])):,} more")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def _expected(self) -> str:
        s = self.scope
        text = f"1 reply per request record (its processing by consumer group {s['group']})"
        if s["replayed_groups"]:
            text += (
                f", + 1 per replay by {', '.join(s['replayed_groups'])} that has passed the "
                "record (a republished copy)"
            )
        if s["accept_republished"]:
            text += "; extra copies identical to another copy are accepted as republished"
        return text

    def _render_history(self) -> str:
        assert self.history is not None
        found = self.history_anomalies
        entries = sum(len(r["entries"]) for r in self.history)
        lines = [
            "processor audit: history: "
            + (f"{_n(len(found), 'anomaly')} in it" if found else "no anomaly in it")
            + f", {_n(len(self.history), 'record')}, {_n(entries, 'entry')}"
        ]
        for record in self.history:
            lines.append(f"  {record['entity']} {record['id']}: version chain {record['chain']}")
            for e in record["entries"]:
                version = ""
                if e.get("prior") is not None or e.get("new") is not None:
                    new = e.get("new")
                    version = f" {e.get('prior')} -> {'deleted' if new is None else new}"
                replies = e.get("replies")
                told = "" if replies is None else f", {_n(replies, 'reply', 'replies')}"
                lines.append(
                    f"    {e.get('at') or '-':32} {e['request_id']} {e.get('type')} "
                    f"{e['outcome']}{version} (source {e.get('source') or '-'}{told})"
                )
        if found:
            lines.append("anomalies in this history:")
            lines += [f"  - {a['kind']}: {_example(a)}" for a in found]
        total = sum(self.anomalies.values())
        elsewhere = total - len(found)
        lines.append(
            f"the audit of {self.scope['request_topic']} ({self.scope['range']}): "
            + (
                f"{_n(elsewhere, 'anomaly')} outside this history (they do not change this "
                "command's exit status; run processor audit without --entity to see them)"
                if elsewhere > 0
                else "no other anomaly"
            )
        )
        return "\n".join(lines)


def _example(example: Mapping[str, Any]) -> str:
    rid = example.get("request_id")
    head = f"request {rid}: " if rid is not None else ""
    if "entity" in example:
        head += f"{example['entity']} {example['id']}: "
    where = f" [{', '.join(example['where'])}]" if example.get("where") else ""
    return f"{head}{example['detail']}{where}"


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
        return _loc(self.topic, self.partition, self.offset)

    @property
    def summary(self) -> str:
        if self.status == "fault":
            return f"fault {_fault_name(self.fault_code)}"
        if self.row_version is None:  # a delete (or a reply without a version)
            return f"{self.status} {self.type}"
        return f"{self.status} {self.type} version {self.row_version}"


def read_reply(topic: str, partition: int, offset: int, value: bytes | None) -> ReplyCopy:
    data = value or b""
    digest = _digest(data)
    try:
        reply = decode_reply(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ReplyCopy(topic, partition, offset, None, digest)
    loose = application = None
    if reply.status == "success" and reply.type in ("update", "delete"):
        application = _application(reply)
    if reply.status == "fault":
        loose = _digest(_encoder.encode(msgspec.structs.replace(reply, processed_at=_EPOCH)))
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


def _application(reply: Reply) -> str:
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
class _LedgerFacts:
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
            return f"fault {_fault_name(self.fault_code)}"
        return f"{self.status} {self.type}"


# -- the pure checks ------------------------------------------------------------------------


def ledger_row_problems(row: LedgerEntry) -> list[str]:
    """What is inconsistent inside one ledger row (its reply bytes vs its columns)."""
    try:
        reply = decode_reply(row.reply)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return [f"reply bytes are not a Reply ({str(exc)[:80]})"]
    problems = []
    code = reply.fault.code if reply.fault else None
    for name, stored, in_reply in (
        ("request_id", row.request_id, reply.request_id),
        ("status", row.status, reply.status),
        ("fault_code", row.fault_code, code),
        ("type", row.type, reply.type),
        # An execute request has neither (its ledger row: ""), retrieve_entity no id.
        ("entity", row.entity, reply.entity or ""),
        ("record_id", row.record_id, "" if reply.id is None else str(reply.id)),
    ):
        if stored != in_reply:
            problems.append(f"{name} is {stored!r} but the reply says {in_reply!r}")
    applies = reply.status == "success" and reply.type in ("update", "delete")
    if row.applied != applies:
        problems.append(f"applied is {row.applied} for a {reply.status} {reply.type} reply")
    if row.writes is None:
        if applies:
            problems.append("an applied request without writes")
        return problems
    try:
        writes = msgspec.json.decode(row.writes)
    except msgspec.DecodeError:
        return [*problems, "writes is not JSON"]
    if not applies:
        return [*problems, "writes on a request that applied nothing"]
    if (
        not isinstance(writes, list)
        or not writes
        or not all(
            isinstance(w, dict) and {"entity", "id", "prior", "new"} <= w.keys() for w in writes
        )
    ):
        return [*problems, "writes is not a list of {entity, id, prior, new}"]
    first = writes[0]
    if (first["entity"], str(first["id"])) != (row.entity, row.record_id):
        problems.append(f"the first write is {first['entity']} {first['id']}, not the request's")
    if reply.type == "delete":
        if len(writes) != 1 or first["new"] is not None:
            problems.append("a delete's writes must be its one record with new = null")
    else:
        if any(w["new"] is None for w in writes):
            problems.append("an update's write has no new version")
        if first["new"] != reply.row_version:
            problems.append(
                f"the reply's row_version {reply.row_version!r} is not the write's new "
                f"version {first['new']!r}"
            )
        related = [(r.entity, str(r.id), r.row_version) for r in reply.related or []]
        written = [(w["entity"], str(w["id"]), w["new"]) for w in writes[1:]]
        if related != written:
            problems.append("the reply's related versions differ from the related writes")
    return problems


def _version(v: str | None) -> str:
    return "deleted" if v is None else v


def _written(row: LedgerEntry) -> list[tuple[str, str]]:
    """The records a consistent applied ledger row wrote (its own first)."""
    writes = msgspec.json.decode(row.writes) if row.writes else []
    return [(str(w["entity"]), str(w["id"])) for w in writes]


def _chain_problems(life: Sequence[Write]) -> list[tuple[tuple[Write, ...], str]]:
    """Why one incarnation's writes are not a single prior -> new path.

    Each problem names the writes involved (the guilty one first) and why; the details
    never repeat the guilty request's id, which the report prints in front of them.
    """
    problems: list[tuple[tuple[Write, ...], str]] = []
    by_prior: dict[str | None, Write] = {}
    for w in life:
        other = by_prior.get(w.prior)
        if other is not None:
            problems.append(
                (
                    (w, other),
                    f"fork: this request and request {other.request_id} both wrote over "
                    f"version {w.prior} (a lost update)",
                )
            )
            continue
        by_prior[w.prior] = w
    produced: dict[str, Write] = {}
    for w in life:
        if w.new is None:
            continue
        other = produced.get(w.new)
        if other is not None:
            problems.append(
                ((w, other), f"version {w.new} produced twice, also by request {other.request_id}")
            )
            continue
        produced[w.new] = w
    starts = [w for w in life if w.prior is None or w.prior not in produced]
    if not starts:
        return [*problems, (tuple(life), "the versions form a cycle")]
    # The first start (in processed_at order) is where the incarnation begins; every other
    # start is a gap.
    previous: Write | None = None
    start_ids = {id(w) for w in starts[1:]}
    for w in life:
        if id(w) in start_ids and previous is not None:
            problems.append(
                (
                    (w,),
                    f"gap: wrote over version {w.prior}, which no write produced (the write "
                    f"before it, by request {previous.request_id}, left "
                    f"{_version(previous.new)})",
                )
            )
        previous = w
    if problems or len(starts) > 1:
        return problems
    seen, current = 0, starts[0]
    while True:
        seen += 1
        if current.new is None or seen > len(life):
            break
        follower = by_prior.get(current.new)
        if follower is None:
            break
        current = follower
    if seen != len(life):
        return [(tuple(life), "the versions form a cycle")]
    return []


def _order_problem(life: Sequence[Write]) -> tuple[str, str] | None:
    """Why a linked incarnation was applied against its requests' offset order, if it was.

    Walks the chain from its start (the order of application) and, per source topic and
    partition, checks that the record's own writes come from increasing offsets. Only a
    pair with an audited write is judged.
    """
    produced = {w.new for w in life if w.new is not None}
    by_prior = {w.prior: w for w in life}
    current: Write | None = next(
        (w for w in life if w.prior is None or w.prior not in produced), None
    )
    last: dict[tuple[str, int], Write] = {}
    steps = 0
    while current is not None and steps < len(life):
        steps += 1
        origin = current.origin
        if current.own and origin is not None:
            before = last.get(origin[:2])
            if (
                before is not None
                and before.origin is not None
                and before.origin[2] > origin[2]
                and (current.audited or before.audited)
            ):
                topic, partition, offset = origin
                return (
                    current.request_id,
                    f"applied after request {before.request_id}, which came later: "
                    f"{_loc(topic, partition, offset)} before "
                    f"{_loc(topic, partition, before.origin[2])}; version {current.prior} -> "
                    f"{_version(current.new)} follows {before.prior} -> "
                    f"{_version(before.new)}",
                )
            last[origin[:2]] = current
        current = by_prior.get(current.new) if current.new is not None else None
    return None


def _judge_life(entity: str, record_id: str, life: Sequence[Write]) -> tuple[list[Anomaly], int]:
    """One incarnation: its anomalies, and how many breaks involve no audited write (those
    are another request topic's business, not judged here)."""
    problems = _chain_problems(life)
    judged = [(ws, why) for ws, why in problems if any(w.audited for w in ws)]
    if judged:
        involved, why = judged[0]
        culprit = next(w for w in involved if w.audited)
        if culprit is not involved[0]:
            why = f"{why} (with request {involved[0].request_id}, of another source)"
        anomaly = Anomaly(BROKEN_VERSION_CHAIN, why, culprit.request_id, entity, record_id)
        return [anomaly], len(problems) - len(judged)
    if problems:
        return [], len(problems)
    order = _order_problem(life)
    if order:
        return [Anomaly(OUT_OF_ORDER_APPLICATION, order[1], order[0], entity, record_id)], 0
    return [], 0


def judge_chain(entity: str, record_id: str, writes: Sequence[Write]) -> tuple[list[Anomaly], int]:
    """One record's writes, in processed_at order: one chain per incarnation, each once,
    applied in the offset order of the record's requests.

    Only what involves an *audited* write (``Write.audited``) is judged: the writes before
    the record's first audited write are dropped (its chain starts there, whatever came
    before: another request topic's traffic, a reset by plain SQL), and a break between
    writes of other requests is counted, not reported. Returns the anomalies and that count.
    """
    first = next((i for i, w in enumerate(writes) if w.audited), None)
    if first is None:
        return [], 0
    anomalies: list[Anomaly] = []
    seen: set[str] = set()
    unique: list[Write] = []
    for w in writes[first:]:
        if w.request_id in seen:
            if w.audited:
                anomalies.append(
                    Anomaly(
                        DOUBLE_APPLICATION,
                        f"the request wrote this record twice (again {w.prior} -> "
                        f"{_version(w.new)})",
                        w.request_id,
                        entity,
                        record_id,
                    )
                )
            continue
        seen.add(w.request_id)
        unique.append(w)
    not_judged = 0
    life: list[Write] = []
    for w in unique:
        life.append(w)
        if w.new is None:
            found, skipped = _judge_life(entity, record_id, life)
            anomalies.extend(found)
            not_judged += skipped
            life = []
    if life:
        found, skipped = _judge_life(entity, record_id, life)
        anomalies.extend(found)
        not_judged += skipped
    return anomalies, not_judged


def check_chain(entity: str, record_id: str, writes: Sequence[Write]) -> list[Anomaly]:
    """The anomalies of :func:`judge_chain`."""
    return judge_chain(entity, record_id, writes)[0]


class Auditor:
    """The pure part of the audit: fed records, dead letters and ledger rows, it judges.

    ``spans`` are the audited offsets of the request topic per partition, [start, end);
    ``complete``: they start at the partitions' first offset 0 (nothing deleted), so a
    reply without a request and without a ledger row cannot belong to an unread request.
    """

    def __init__(
        self,
        request_topic: str,
        spans: Mapping[int, tuple[int, int]],
        *,
        complete: bool,
        accept_republished: bool = False,
        max_examples: int = 20,
        history: tuple[str, str | None] | None = None,
    ) -> None:
        self.request_topic = request_topic
        self.spans = dict(spans)
        self.complete = complete
        self.accept_republished = accept_republished
        self.max_examples = max_examples
        self.history_filter = history
        self.by_source: dict[tuple[int, int], RequestRecord] = {}
        self.by_id: dict[str, list[RequestRecord]] = {}
        self.anonymous: list[RequestRecord] = []
        self.replies: dict[str, list[ReplyCopy]] = {}
        self.dead: Counter[tuple[int, int]] = Counter()
        self.ledger: dict[str, _LedgerFacts] = {}
        self.counts: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.fault_codes: Counter[int] = Counter()
        self.anomaly_counts: Counter[str] = Counter()
        self.examples: dict[str, list[Anomaly]] = defaultdict(list)
        self.notes: list[str] = []
        self.first_timestamp: int | None = None
        self.history_records: list[RequestRecord] = []
        self.broken_records: set[tuple[str, str]] = set()
        #: The records the audited requests wrote: the only version chains judged.
        self.written: set[tuple[str, str]] = set()
        #: With a history filter: the request_ids that touch its records, and the anomalies
        #: that concern them (a history is judged on these alone).
        self.history_ids: set[str] = set()
        self.history_anomalies: list[Anomaly] = []
        self._copy_ratios: Counter[int] = Counter()  # replies per record, -1: not a multiple

    # -- feeding ---------------------------------------------------------------------------

    def report(self, anomaly: Anomaly) -> None:
        self.anomaly_counts[anomaly.kind] += 1
        examples = self.examples[anomaly.kind]
        if len(examples) < self.max_examples:
            examples.append(anomaly)
        if anomaly.kind == BROKEN_VERSION_CHAIN and anomaly.entity is not None:
            self.broken_records.add((anomaly.entity, str(anomaly.record_id)))
        if self._concerns_history(anomaly):
            self.history_anomalies.append(anomaly)

    def _wanted(self, entity: str | None, record_id: str | None) -> bool:
        wanted = self.history_filter
        return wanted is not None and entity == wanted[0] and wanted[1] in (None, record_id)

    def _concerns_history(self, anomaly: Anomaly) -> bool:
        if self.history_filter is None:
            return False
        if anomaly.entity is not None:
            return self._wanted(anomaly.entity, anomaly.record_id)
        return anomaly.request_id is not None and anomaly.request_id in self.history_ids

    def in_scope(self, topic: str | None, partition: int | None, offset: int | None) -> bool:
        if topic != self.request_topic or partition is None or offset is None:
            return False
        span = self.spans.get(partition)
        return span is not None and span[0] <= offset < span[1]

    def add_request(self, rec: RequestRecord) -> None:
        self.counts["request_records"] += 1
        self.counts["requests" if rec.admitted else "rejected"] += 1
        if self.first_timestamp is None or rec.timestamp < self.first_timestamp:
            self.first_timestamp = rec.timestamp
        if self._wanted(rec.entity, rec.record_id):
            self.history_records.append(rec)
            if rec.request_id is not None:
                self.history_ids.add(rec.request_id)
        else:
            rec.entity = rec.record_id = None  # keep memory small
        self.by_source[(rec.partition, rec.offset)] = rec
        if rec.request_id is None:
            self.counts["rejected_without_id"] += 1
            self.anonymous.append(rec)
        else:
            self.by_id.setdefault(rec.request_id, []).append(rec)

    def reply_to_topics(self) -> set[str]:
        return {r.reply_to for recs in self.by_id.values() for r in recs if r.reply_to is not None}

    def add_reply(self, copy: ReplyCopy, *, default_topic: bool = True) -> None:
        rid = copy.request_id
        if rid is None:
            if default_topic:
                self.counts["replies_read"] += 1
                self.report(
                    Anomaly(REPLY_WITHOUT_REQUEST, "the value is not a Reply", where=(copy.where,))
                )
            return
        if not default_topic and rid not in self.by_id:
            self.counts["replies_foreign"] += 1
            return
        self.counts["replies_read"] += 1
        self.replies.setdefault(rid, []).append(copy)

    def add_dead_letter(self, value: bytes | None) -> None:
        try:
            letter = _dead_decoder.decode(value or b"")
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.counts["dead_letters_other"] += 1
            self.counts["dead_letters_undecodable"] += 1
            return
        if not self.in_scope(letter.source_topic, letter.source_partition, letter.source_offset):
            self.counts["dead_letters_other"] += 1
            return
        self.counts["dead_letters"] += 1
        self.dead[(letter.source_partition, letter.source_offset)] += 1

    def ledger_ids(self) -> list[str]:
        """The request_ids whose ledger rows the audit needs."""
        inner = {i for recs in self.by_id.values() for r in recs for i in r.inner_ids}
        return list(self.by_id.keys() | self.replies.keys() | inner)

    def add_ledger_row(self, row: LedgerEntry) -> None:
        source = None
        if row.source_topic is not None and row.source_partition is not None:
            assert row.source_offset is not None
            source = (row.source_topic, row.source_partition, row.source_offset)
        problems = ledger_row_problems(row)
        application = None
        if row.applied and not problems:
            application = _application(decode_reply(row.reply))
        facts = _LedgerFacts(
            row.fingerprint,
            _digest(row.reply),
            row.status,
            row.type,
            row.fault_code,
            row.applied,
            source,
            row.processed_at,
            application,
        )
        self.ledger[row.request_id] = facts
        if row.request_id in self.by_id:
            self.counts["ledger_rows"] += 1
            self.counts["ledger_applied"] += int(row.applied)
        written = _written(row) if row.applied and not problems else []
        if source is not None and self.in_scope(*source):
            self.written.update(written)
        if self._wanted(row.entity, row.record_id) or any(self._wanted(*k) for k in written):
            self.history_ids.add(row.request_id)
        for problem in problems:
            self.report(
                Anomaly(LEDGER_MISMATCH, f"ledger row inconsistent: {problem}", row.request_id)
            )
        if source is not None and self.in_scope(*source):
            self._check_source(row.request_id, source[1], source[2], row.fingerprint)

    def add_ledger_source(self, request_id: str, partition: int, offset: int) -> None:
        """A ledger row citing an audited offset (rows of audited request_ids are checked)."""
        if request_id not in self.ledger:
            self._check_source(request_id, partition, offset, None)

    def _check_source(
        self, request_id: str, partition: int, offset: int, fingerprint: bytes | None
    ) -> None:
        rec = self.by_source.get((partition, offset))
        where = (_loc(self.request_topic, partition, offset),)
        problem = None
        if rec is None:
            problem = "its source offset holds no request record"
        elif rec.request_id != request_id and request_id not in rec.inner_ids:
            problem = f"its source offset holds request {rec.request_id!r}"
        elif not rec.admitted:
            problem = "its source record was rejected at intake"
        elif (
            fingerprint is not None
            and rec.request_id == request_id
            and rec.fingerprint != fingerprint
        ):
            problem = "its fingerprint differs from the request at its source offset"
        if problem:
            self.report(Anomaly(LEDGER_MISMATCH, f"ledger row: {problem}", request_id, where=where))

    def chain_window(self) -> tuple[datetime, datetime] | None:
        """processed_at range of the audited applied rows: where their chains lie."""
        times = [
            f.processed_at
            for f in self.ledger.values()
            if f.applied and f.source is not None and self.in_scope(*f.source)
        ]
        return (min(times), max(times)) if times else None

    def add_chain(self, entity: str, record_id: str, writes: Sequence[Write]) -> None:
        """One record's writes in the chain window (``Write.audited`` set by the caller)."""
        anomalies, not_judged = judge_chain(entity, record_id, writes)
        self.counts["chain_records"] += 1
        self.counts["chain_writes"] += sum(1 for w in writes if w.audited)
        self.counts["chain_writes_other"] += sum(1 for w in writes if not w.audited)
        self.counts["chain_breaks_not_judged"] += not_judged
        for anomaly in anomalies:
            self.report(anomaly)

    # -- judging ---------------------------------------------------------------------------

    def finish(
        self,
        passes: Callable[[RequestRecord], int] = lambda _: 1,
        consumed: Callable[[RequestRecord], str | None] = lambda _: None,
    ) -> None:
        """Judge everything fed so far.

        ``passes(record)``: how many replies the record should have (1 + the replays past
        it); ``consumed(record)``: a note on whether the worker group had consumed it.
        """
        self.counts["request_ids"] = len(self.by_id)
        for rid, recs in self.by_id.items():
            self._check_request(rid, recs, self.replies.get(rid, []), passes, consumed)
        for rid, copies in self.replies.items():
            if rid not in self.by_id:
                self._check_unmatched(rid, copies)
        for rec in self.anonymous:
            self._count_outcome(rec, None, [])
            self._check_dead_letter(rec, True)
        for (partition, offset), _ in self.dead.items():
            if (partition, offset) not in self.by_source:
                self.report(
                    Anomaly(
                        SPURIOUS_DEAD_LETTER,
                        "a dead letter for an offset that holds no request record",
                        where=(_loc(self.request_topic, partition, offset),),
                    )
                )
        ratios = set(self._copy_ratios)
        if self.anomaly_counts[DUPLICATE_REPLY] and len(ratios) == 1 and min(ratios) > 1:
            self.notes.append(
                f"every request record has {min(ratios)} replies: this looks like a "
                "replay through another consumer group; name it with --replayed-groups "
                "(or pass --accept-republished)"
            )

    def _check_request(
        self,
        rid: str,
        recs: list[RequestRecord],
        copies: list[ReplyCopy],
        passes: Callable[[RequestRecord], int],
        consumed: Callable[[RequestRecord], str | None],
    ) -> None:
        ledger = self.ledger.get(rid)
        admitted = [r for r in recs if r.admitted]
        intake_rejects = any(not r.admitted for r in recs)
        names_reply_to = any(r.reply_to or r.reply_partition is not None for r in admitted)
        self.counts["replies"] += len(copies)

        def not_ledgered(c: ReplyCopy) -> bool:
            """A fault reply that is not ledgered by design, and that a record can explain."""
            if c.status != "fault":
                return False
            if c.fault_code == _DUPLICATE:
                return ledger is not None
            if c.fault_code == _UNEXPECTED:
                return bool(admitted)
            if c.fault_code in _INTAKE_CODES:
                routed = c.fault_path in ("reply_to", "reply_partition")
                return names_reply_to if routed else intake_rejects
            return False

        # Two different applications of one request.
        applications = {c.application for c in copies if c.application is not None}
        if ledger is not None and ledger.application is not None:
            applications.add(ledger.application)
        double = len(applications) >= 2
        if double:
            self.report(
                Anomaly(
                    DOUBLE_APPLICATION,
                    f"{len(applications)} different applications: "
                    f"{'; '.join(sorted(applications))} (ledger: "
                    f"{ledger.application if ledger else 'no row'})",
                    rid,
                    where=tuple(c.where for c in copies if c.applying),
                )
            )
        mismatched = [
            c
            for c in copies
            if not (ledger is not None and c.digest == ledger.digest)
            and not not_ledgered(c)
            and not (double and c.applying)
        ]
        if mismatched:
            if ledger is None:
                detail = (
                    f"{_n(len(mismatched), 'reply', 'replies')} ({mismatched[0].summary}) "
                    "with a ledgered outcome but no ledger row"
                )
            else:
                detail = (
                    f"{len(mismatched)} of {_n(len(copies), 'reply', 'replies')} not the "
                    f"ledger's reply bytes (ledger: {ledger.summary}; "
                    f"reply: {mismatched[0].summary})"
                )
            self.report(
                Anomaly(LEDGER_MISMATCH, detail, rid, where=tuple(c.where for c in mismatched))
            )

        expected = sum(passes(r) for r in recs)
        places = tuple(_loc(self.request_topic, r.partition, r.offset) for r in recs)
        if len(copies) < expected:
            state = f"ledger: {ledger.summary}" if ledger else "no ledger row"
            notes = [n for n in (consumed(r) for r in recs) if n]
            detail = f"{len(copies)} of {expected} replies; {state}"
            if notes:
                detail += "; " + "; ".join(sorted(set(notes)))
            self.report(Anomaly(MISSING_REPLY, detail, rid, where=places))
        republished = max(0, min(len(copies), expected) - len(recs))
        if len(copies) > expected:
            extra = len(copies) - expected
            if (
                ledger is not None
                and ledger.source is not None
                and not self.in_scope(*ledger.source)
            ):
                # Its first delivery is outside the audited range: so are some replies.
                self.counts["replies_out_of_scope"] += extra
                extra = 0
            if self.accept_republished:
                keys = Counter(c.loose if c.loose is not None else c.digest for c in copies)
                identical = sum(n - 1 for n in keys.values())
                accepted = min(extra, identical)
                republished += accepted
                extra -= accepted
            if extra:
                self.report(
                    Anomaly(
                        DUPLICATE_REPLY,
                        f"{_n(len(copies), 'reply', 'replies')} for {_n(len(recs), 'record')}, "
                        f"{expected} expected"
                        + (
                            ""
                            if self.complete
                            else " (a partial audit: records of this request_id outside the "
                            "range would explain extra replies)"
                        ),
                        rid,
                        where=tuple(c.where for c in copies),
                    )
                )
        self.counts["republished"] += republished
        ratio, rest = divmod(len(copies), len(recs))
        self._copy_ratios[-1 if rest else ratio] += 1

        for rec in recs:
            need = self._count_outcome(rec, ledger, copies)
            self._check_dead_letter(rec, need)

    def _count_outcome(
        self, rec: RequestRecord, ledger: _LedgerFacts | None, copies: Iterable[ReplyCopy]
    ) -> bool | None:
        """Count the record's outcome; returns whether it needs a dead letter (None: unknown)."""
        code: int | None
        if not rec.admitted:
            key, code, need = f"rejected/{_fault_name(rec.fault_code)}", rec.fault_code, True
        elif ledger is not None and (
            ledger.fingerprint == rec.fingerprint
            or ledger.source == (self.request_topic, rec.partition, rec.offset)
        ):
            code = ledger.fault_code
            if ledger.status == "success":
                key = f"success/{ledger.type}"
            else:
                key = f"fault/{_fault_name(code)}"
            kind = FAULT_TYPES.get(code) if code is not None else None
            need = kind is not None and kind.dead_letter
        elif ledger is not None:
            key, code, need = f"fault/{_fault_name(_DUPLICATE)}", _DUPLICATE, True
        else:
            codes = {c.fault_code for c in copies if c.status == "fault"}
            if _UNEXPECTED in codes:
                key, code, need = f"fault/{_fault_name(_UNEXPECTED)}", _UNEXPECTED, None
            elif InvalidArgument.code in codes:
                key, code, need = f"rejected/{InvalidArgument.name}", InvalidArgument.code, None
            else:
                key, code, need = "unknown", None, None
        self.outcomes[key] += 1
        if code is not None:
            self.fault_codes[code] += 1
        return need

    def _check_dead_letter(self, rec: RequestRecord, need: bool | None) -> None:
        have = self.dead.get((rec.partition, rec.offset), 0)
        where = (_loc(self.request_topic, rec.partition, rec.offset),)
        if need and not have:
            what = (
                f"rejected at intake ({_fault_name(rec.fault_code)})"
                if not rec.admitted
                else "a dead-letter fault"
            )
            self.report(
                Anomaly(
                    UNANSWERED_BAD_INPUT, f"{what}, and no dead letter", rec.request_id, where=where
                )
            )
        elif need is False and have:
            self.report(
                Anomaly(
                    SPURIOUS_DEAD_LETTER,
                    f"{_n(have, 'dead letter')} for a record whose outcome needs none",
                    rec.request_id,
                    where=where,
                )
            )

    def _check_unmatched(self, rid: str, copies: list[ReplyCopy]) -> None:
        ledger = self.ledger.get(rid)
        where = tuple(c.where for c in copies)
        if ledger is not None:
            if ledger.source is None or not self.in_scope(*ledger.source):
                self.counts["replies_out_of_scope"] += len(copies)
                return
            _, partition, offset = ledger.source
            rec = self.by_source.get((partition, offset))
            holds = f"request {rec.request_id!r}" if rec else "no request record"
            detail = (
                f"no request with this id; its ledger row cites "
                f"{_loc(*ledger.source)}, which holds {holds}"
            )
            self.report(Anomaly(REPLY_WITHOUT_REQUEST, detail, rid, where=where))
        elif not self.complete:
            self.counts["replies_unverifiable"] += len(copies)
        else:
            self.report(
                Anomaly(
                    REPLY_WITHOUT_REQUEST,
                    f"{_n(len(copies), 'reply', 'replies')}; no request with this id on "
                    f"{self.request_topic} and no ledger row",
                    rid,
                    where=where,
                )
            )

    def build_report(self, scope: dict[str, Any]) -> AuditReport:
        counts = {
            name: self.counts[name]
            for name in (
                "request_records",
                "requests",
                "rejected",
                "rejected_without_id",
                "request_ids",
                "replies_read",
                "replies",
                "republished",
                "replies_out_of_scope",
                "replies_unverifiable",
                "replies_foreign",
                "dead_letters",
                "dead_letters_other",
                "dead_letters_undecodable",
                "ledger_rows",
                "ledger_applied",
                "chain_records",
                "chain_writes",
                "chain_writes_other",
                "chain_breaks_not_judged",
                "ledger_rows_other_topics",
                "other_topics",
            )
        }
        return AuditReport(
            scope=scope,
            counts=counts,
            outcomes=dict(self.outcomes),
            fault_codes={
                str(code): {"name": _fault_name(code), "count": n}
                for code, n in self.fault_codes.items()
            },
            anomalies={kind: self.anomaly_counts[kind] for kind in ANOMALIES},
            examples={
                kind: [a.to_dict() for a in self.examples[kind]]
                for kind in ANOMALIES
                if self.examples.get(kind)
            },
            notes=list(self.notes),
            history_anomalies=[a.to_dict() for a in self.history_anomalies],
        )


# -- I/O -----------------------------------------------------------------------------------


class _Progress:
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


_STALL_SECONDS: Final = 60.0


async def _call(awaitable: Any) -> Any:
    return await asyncio.wait_for(awaitable, kafka.CALL_TIMEOUT)


async def _partitions(admin: Any, topic: str) -> list[int] | None:
    (described,) = await _call(admin.describe_topics([topic]))
    if described["error_code"] != 0 or not described["partitions"]:
        return None
    return sorted(p["partition"] for p in described["partitions"])


async def _read_topic(
    bootstrap: kafka.KafkaAccess,
    topic: str,
    spans: Mapping[int, tuple[int, int]],
    handle: Callable[[Any], None],
    progress: _Progress,
    label: str,
) -> None:
    """Every committed record of ``topic`` in ``spans`` ([start, end) per partition)."""
    todo = {p: span for p, span in spans.items() if span[0] < span[1]}
    if not todo:
        return
    consumer = kafka.make_consumer(bootstrap, None, max_partition_fetch_bytes=4 * 1_048_576)
    await _call(consumer.start())
    try:
        tps = {p: TopicPartition(topic, p) for p in todo}
        consumer.assign(list(tps.values()))
        for p, tp in tps.items():
            consumer.seek(tp, todo[p][0])
        total = sum(end - start for start, end in todo.values())
        done = 0
        remaining = set(todo)
        stalled_since = time.monotonic()
        while remaining:
            batch = await consumer.getmany(
                *(tps[p] for p in remaining), timeout_ms=500, max_records=5000
            )
            for tp, records in batch.items():
                end = todo[tp.partition][1]
                for record in records:
                    if record.offset >= end:
                        break
                    handle(record)
            moved = False
            done = 0
            for p in list(todo):
                position = await consumer.position(tps[p]) if p in remaining else todo[p][1]
                done += min(position, todo[p][1]) - todo[p][0]
                if p in remaining and position >= todo[p][1]:
                    remaining.discard(p)
                    consumer.pause(tps[p])
                    moved = True
            if batch or moved:
                stalled_since = time.monotonic()
            elif time.monotonic() - stalled_since > _STALL_SECONDS:
                raise ProcessorError(
                    f"reading {topic} stalled: partitions {sorted(remaining)} did not reach "
                    "their end offsets"
                )
            progress.update(label, done, total)
        progress.done(label, done)
    finally:
        await asyncio.wait_for(consumer.stop(), kafka.CALL_TIMEOUT)


async def _group_offsets(
    admin: Any, group: str, topic: str, partitions: list[int]
) -> dict[int, int]:
    tps = [TopicPartition(topic, p) for p in partitions]
    found = await _call(admin.list_consumer_group_offsets(group, partitions=tps))
    return {tp.partition: meta.offset for tp, meta in found.items() if meta.offset >= 0}


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


_LEDGER_COLUMNS: Final = (
    "request_id, fingerprint, type, entity, record_id, status, fault_code, applied, "
    "writes::text AS writes, reply, source_topic, source_partition, source_offset, processed_at"
)


async def _audit_ledger(
    conn: asyncpg.Connection[Any],
    table: str,
    auditor: Auditor,
    options: AuditOptions,
    progress: _Progress,
) -> list[dict[str, Any]] | None:
    ids = auditor.ledger_ids()
    done = 0
    for chunk in _chunks(ids, options.chunk):
        rows = await conn.fetch(
            f"SELECT {_LEDGER_COLUMNS} FROM {table} WHERE request_id = ANY($1::text[])",  # noqa: S608
            list(chunk),
        )
        for row in rows:
            auditor.add_ledger_row(LedgerEntry(**dict(row)))
        done += len(chunk)
        progress.update("ledger rows", done, len(ids))
    progress.done("ledger rows", done)

    spans = sorted(auditor.spans.items())
    sources = (
        f"SELECT l.request_id, l.source_partition, l.source_offset FROM {table} AS l "  # noqa: S608
        "JOIN unnest($2::int[], $3::bigint[], $4::bigint[]) AS r(p, s, e) "
        "ON l.source_partition = r.p AND l.source_offset >= r.s AND l.source_offset < r.e "
        "WHERE l.source_topic = $1"
    )
    done = 0
    async for row in conn.cursor(
        sources,
        auditor.request_topic,
        [p for p, _ in spans],
        [s for _, (s, _) in spans],
        [e for _, (_, e) in spans],
        prefetch=5000,
    ):
        auditor.add_ledger_source(row["request_id"], row["source_partition"], row["source_offset"])
        done += 1
        progress.update("ledger sources", done)
    progress.done("ledger sources", done)

    # Rows of other request topics (or other deployments) sharing the ledger: not judged.
    other = await conn.fetchrow(
        f"SELECT count(*) AS n, count(DISTINCT source_topic) AS topics FROM {table} "  # noqa: S608
        "WHERE source_topic IS DISTINCT FROM $1",
        auditor.request_topic,
    )
    assert other is not None  # an aggregate always has its row
    auditor.counts["ledger_rows_other_topics"] = int(other["n"])
    auditor.counts["other_topics"] = int(other["topics"])

    # The chains of the records the audited requests wrote, over the processed_at window of
    # their writes; other requests' writes in it (another topic sharing the records) link.
    window = auditor.chain_window()
    records = sorted(auditor.written)
    if window is not None and records:
        chain_sql = (
            "SELECT w.value->>'entity' AS entity, w.value->>'id' AS id, "  # noqa: S608
            "w.value->>'prior' AS prior, w.value->>'new' AS new, l.request_id, "
            "l.processed_at, l.source_topic, l.source_partition, l.source_offset, "
            "w.i = 1 AS own "
            f"FROM {table} AS l CROSS JOIN LATERAL jsonb_array_elements("
            "CASE WHEN jsonb_typeof(l.writes) = 'array' THEN l.writes ELSE '[]'::jsonb END"
            ") WITH ORDINALITY AS w(value, i) "
            "WHERE l.applied AND jsonb_typeof(w.value) = 'object' "
            "AND l.processed_at >= $1 AND l.processed_at <= $2 "
            "AND (w.value->>'entity', w.value->>'id') IN "
            "(SELECT * FROM unnest($3::text[], $4::text[])) "
            "ORDER BY 1, 2, l.processed_at, l.source_partition, l.source_offset, l.request_id"
        )
        key: tuple[str, str] | None = None
        writes: list[Write] = []
        done = 0
        async for row in conn.cursor(
            chain_sql,
            window[0],
            window[1],
            [e for e, _ in records],
            [i for _, i in records],
            prefetch=5000,
        ):
            this = (str(row["entity"]), str(row["id"]))
            if this != key:
                if key is not None:
                    auditor.add_chain(key[0], key[1], writes)
                key, writes = this, []
            source = origin = None
            if row["source_partition"] is not None:
                source = f"{row['source_partition']}:{row['source_offset']}"
                if row["source_topic"] is not None and row["source_offset"] is not None:
                    origin = (
                        str(row["source_topic"]),
                        int(row["source_partition"]),
                        int(row["source_offset"]),
                    )
            writes.append(
                Write(
                    row["request_id"],
                    row["prior"],
                    row["new"],
                    row["processed_at"],
                    source,
                    origin,
                    bool(row["own"]),
                    audited=origin is not None and auditor.in_scope(*origin),
                )
            )
            done += 1
            progress.update("version chains (writes)", done)
        if key is not None:
            auditor.add_chain(key[0], key[1], writes)
        progress.done("version chains (writes)", done)

    if options.entity is None:
        return None
    return await _history(conn, table, auditor, options)


async def _history(
    conn: asyncpg.Connection[Any], table: str, auditor: Auditor, options: AuditOptions
) -> list[dict[str, Any]]:
    entity, record_id = options.entity, options.record_id
    assert entity is not None
    window = (options.since, options.until)
    rows = await conn.fetch(
        f"SELECT request_id, type, entity, record_id, status, fault_code, writes::text AS writes, "  # noqa: S608
        f"source_partition, source_offset, processed_at FROM {table} AS l "
        "WHERE ((l.entity = $1 AND ($2::text IS NULL OR l.record_id = $2)) "
        "OR EXISTS (SELECT 1 FROM jsonb_array_elements(CASE WHEN jsonb_typeof(l.writes) = "
        "'array' THEN l.writes ELSE '[]'::jsonb END) AS w(value) "
        "WHERE w.value->>'entity' = $1 AND ($2::text IS NULL OR w.value->>'id' = $2))) "
        "AND ($3::timestamptz IS NULL OR l.processed_at >= $3) "
        "AND ($4::timestamptz IS NULL OR l.processed_at < $4) "
        "ORDER BY l.processed_at, l.source_partition, l.source_offset LIMIT $5",
        entity,
        record_id,
        window[0],
        window[1],
        options.history_limit,
    )
    records: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    ledgered: set[str] = set()
    for row in rows:
        ledgered.add(row["request_id"])
        rid = row["request_id"]
        base: dict[str, Any] = {
            "at": row["processed_at"].isoformat(),
            "request_id": row["request_id"],
            "type": row["type"],
            "outcome": row["status"]
            if row["status"] == "success"
            else f"fault {_fault_name(row['fault_code'])}",
            "source": None
            if row["source_partition"] is None
            else f"{row['source_partition']}:{row['source_offset']}",
            "replies": len(auditor.replies.get(rid, [])) if rid in auditor.by_id else None,
        }
        touched = False
        for w in msgspec.json.decode(row["writes"]) if row["writes"] else []:
            if not isinstance(w, dict):
                continue
            if w.get("entity") == entity and record_id in (None, str(w.get("id"))):
                records[(entity, str(w.get("id")))].append(
                    {**base, "prior": w.get("prior"), "new": w.get("new")}
                )
                touched = True
        if not touched and row["entity"] == entity and record_id in (None, row["record_id"]):
            records[(entity, row["record_id"])].append(base)
    for rec in auditor.history_records:
        if rec.request_id in ledgered or rec.entity is None or rec.record_id is None:
            continue
        copies = auditor.replies.get(rec.request_id or "", [])
        outcome = copies[0].summary if copies else "no reply"
        records[(rec.entity, rec.record_id)].append(
            {
                "at": None,
                "request_id": rec.request_id,
                "type": rec.type,
                "outcome": f"not ledgered: {outcome}",
                "source": f"{rec.partition}:{rec.offset}",
                "replies": len(copies),
            }
        )
    return [
        {
            "entity": e,
            "id": i,
            "chain": "broken"
            if (e, i) in auditor.broken_records
            else "ok"
            if (e, i) in auditor.written
            else "not judged",
            "entries": entries,
        }
        for (e, i), entries in sorted(records.items())
    ]


def _ms(moment: datetime) -> int:
    return max(0, int(moment.timestamp() * 1000))


async def run_audit(
    settings: Settings,
    options: AuditOptions | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> AuditReport:
    """Audit the request, reply and dead-letter topics of ``settings`` against its ledger.

    Needs ``kafka_bootstrap_servers`` and ``database_url``; uses ``request_topic``,
    ``reply_topic``, ``dlq_topic``, ``group_id`` (the original pass), ``ledger_schema``
    and ``max_message_bytes``. ``progress`` gets a line every 2 s during long reads.
    Raises :class:`ConfigError` for bad options or missing topics or ledger, and
    :class:`ProcessorError` when a service fails.
    """
    options = options or AuditOptions()
    options.validate()
    settings.require("kafka_bootstrap_servers", "database_url")
    assert settings.database_url is not None
    bootstrap = settings.kafka_access()
    shown = _Progress(progress)
    ledger = Ledger(settings.ledger_schema)
    conn = await db.connect(settings)  # one line if it cannot: unreachable or refused
    try:
        if await conn.fetchval("SELECT to_regclass($1)", ledger.table) is None:
            raise ConfigError(f"the ledger {ledger.table} does not exist")
        admin = kafka.admin_client(bootstrap)
        meta = kafka.make_consumer(bootstrap, None)
        try:
            await _call(admin.start())
            await _call(meta.start())
            auditor, scope, passes, consumed = await _read_topics(
                settings, options, admin, meta, shown
            )
        finally:
            await asyncio.wait_for(meta.stop(), kafka.CALL_TIMEOUT)
            await admin.close()
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            history = await _audit_ledger(conn, ledger.table, auditor, options, shown)
    except (OSError, asyncpg.PostgresError) as exc:
        raise ProcessorError(f"the database failed during the audit: {exc}") from exc
    finally:
        await conn.close()
    auditor.finish(passes, consumed)
    scope["ledger"] = ledger.table
    report = auditor.build_report(scope)
    report.history = history
    report.coverage = _coverage(report)
    return report


def _coverage(report: AuditReport) -> dict[str, list[str]]:
    """What the audit judged and what it did not, in words (the report's first lines)."""
    c, s = report.counts, report.scope
    rejected = f"{c['rejected']:,} rejected at intake"
    if c["rejected_without_id"]:
        rejected += f" ({c['rejected_without_id']:,} without a request_id)"
    judged = [
        f"{_n(c['request_records'], 'request record')} of {s['request_topic']} "
        f"({s['range']}): {_n(c['requests'], 'request')} "
        f"({_n(c['request_ids'], 'distinct request_id')}), {rejected}",
        f"{_n(c['replies'], 'reply', 'replies')} to them ({c['republished']:,} republished "
        "copies): the expected number, each equal to its ledger row",
        f"{_n(c['dead_letters'], 'dead letter')} for them: one for each bad input",
        f"{_n(c['ledger_rows'], 'ledger row')} of these requests ({c['ledger_applied']:,} "
        "applied), and every row citing these offsets",
    ]
    if c["chain_records"]:
        linking = (
            f"; {_n(c['chain_writes_other'], 'write')} of other requests in between link them"
            if c["chain_writes_other"]
            else ""
        )
        judged.append(
            f"the version chains of the {_n(c['chain_records'], 'record')} these requests "
            f"wrote, from each one's first write by them on ({_n(c['chain_writes'], 'write')}"
            f" of theirs{linking})"
        )
    not_judged = []
    if c["ledger_rows_other_topics"]:
        whose = (
            f"of {_n(c['other_topics'], 'other request topic')}"
            if c["other_topics"]
            else "without a source topic"
        )
        not_judged.append(
            f"{_n(c['ledger_rows_other_topics'], 'ledger row')} {whose} sharing {s['ledger']}: "
            "their requests, replies and version chains (audit each with its own "
            "PROCESSOR_REQUEST_TOPIC)"
        )
    if c["chain_records"]:
        not_judged.append(
            "the writes before each record's first write by these requests (other topics' "
            "traffic, a reset by plain SQL, or an earlier range)"
        )
    if c["chain_breaks_not_judged"]:
        not_judged.append(
            f"{_n(c['chain_breaks_not_judged'], 'break')} in those chains between writes of "
            "other requests only"
        )
    if c["replies_out_of_scope"]:
        not_judged.append(
            f"{_n(c['replies_out_of_scope'], 'reply', 'replies')} to requests outside the range"
        )
    if c["replies_unverifiable"]:
        not_judged.append(
            f"{_n(c['replies_unverifiable'], 'reply', 'replies')} that cannot be placed "
            "(no ledger row, and the range is partial)"
        )
    if c["replies_foreign"]:
        not_judged.append(
            f"{_n(c['replies_foreign'], 'reply', 'replies')} on reply_to topics to other requests"
        )
    if c["dead_letters_other"]:
        not_judged.append(
            f"{_n(c['dead_letters_other'], 'dead letter')} of other records or topics"
        )
    return {"judged": judged, "not_judged": not_judged}


async def _read_topics(
    settings: Settings,
    options: AuditOptions,
    admin: Any,
    meta: Any,
    shown: _Progress,
) -> tuple[
    Auditor,
    dict[str, Any],
    Callable[[RequestRecord], int],
    Callable[[RequestRecord], str | None],
]:
    bootstrap = settings.kafka_access()
    topics = {
        "request": settings.request_topic,
        "reply": settings.reply_topic,
        "dead-letter": settings.dlq_topic,
    }
    parts: dict[str, list[int]] = {}
    for what, topic in topics.items():
        found = await _partitions(admin, topic)
        if found is None:
            raise ConfigError(f"the {what} topic {topic!r} does not exist")
        parts[topic] = found
    req_parts = parts[settings.request_topic]

    # Group offsets first, then the replies' ends, then the requests' ends: every reply
    # read has its request read, and no replay batch is counted without its offsets.
    groups: dict[str, dict[int, int]] = {}
    notes: list[str] = []
    for group in dict.fromkeys((settings.group_id, *options.replayed_groups)):
        try:
            groups[group] = await _group_offsets(admin, group, settings.request_topic, req_parts)
        except Exception as exc:  # an unknown group only loses detail
            groups[group] = {}
            notes.append(f"cannot read the offsets of group {group!r}: {exc!r}")
        if not groups[group]:
            notes.append(f"group {group!r} has no committed offsets on {settings.request_topic}")

    async def ends(topic: str, partitions: list[int]) -> dict[int, int]:
        found = await _call(meta.end_offsets([TopicPartition(topic, p) for p in partitions]))
        return {tp.partition: offset for tp, offset in found.items()}

    async def starts(topic: str, partitions: list[int]) -> dict[int, int]:
        found = await _call(meta.beginning_offsets([TopicPartition(topic, p) for p in partitions]))
        return {tp.partition: offset for tp, offset in found.items()}

    async def at_time(
        topic: str, partitions: list[int], ms: int, fallback: dict[int, int]
    ) -> dict[int, int]:
        found = await _call(
            meta.offsets_for_times({TopicPartition(topic, p): ms for p in partitions})
        )
        return {
            tp.partition: (hit.offset if hit is not None else fallback[tp.partition])
            for tp, hit in found.items()
        }

    reply_end = await ends(settings.reply_topic, parts[settings.reply_topic])
    dlq_end = await ends(settings.dlq_topic, parts[settings.dlq_topic])
    req_end = await ends(settings.request_topic, req_parts)
    req_start = await starts(settings.request_topic, req_parts)
    full = options.since is None and options.until is None and options.offsets is None
    spans: dict[int, tuple[int, int]] = {}
    if options.offsets is not None:
        for p in req_parts:
            wanted = options.offsets.get(p, options.offsets.get(None))
            if wanted is None:
                continue
            first, last = wanted
            end = req_end[p] if last is None else min(last, req_end[p])
            spans[p] = (max(first, req_start[p]), max(end, req_start[p]))
        unknown = {p for p in options.offsets if p is not None and p not in req_parts}
        if unknown:
            raise ConfigError(f"--offsets: no partition {sorted(unknown)} in the request topic")
    else:
        first_at = (
            await at_time(settings.request_topic, req_parts, _ms(options.since), req_end)
            if options.since
            else req_start
        )
        last_at = (
            await at_time(settings.request_topic, req_parts, _ms(options.until), req_end)
            if options.until
            else req_end
        )
        spans = {p: (first_at[p], max(first_at[p], last_at[p])) for p in req_parts}
    complete = full and all(req_start[p] == 0 for p in req_parts)
    auditor = Auditor(
        settings.request_topic,
        spans,
        complete=complete,
        accept_republished=options.accept_republished,
        max_examples=options.max_examples,
        history=(options.entity, options.record_id) if options.entity else None,
    )
    auditor.notes.extend(notes)
    max_bytes = settings.max_message_bytes
    await _read_topic(
        bootstrap,
        settings.request_topic,
        spans,
        lambda r: auditor.add_request(read_request(r, r.timestamp, max_bytes=max_bytes)),
        shown,
        "requests",
    )

    # Replies and dead letters: from the earliest audited request (minus the slack) on.
    async def window(
        topic: str, partitions: list[int], end: dict[int, int]
    ) -> dict[int, tuple[int, int]]:
        begin = await starts(topic, partitions)
        if full:
            return {p: (begin[p], end[p]) for p in partitions}
        if auditor.first_timestamp is None:
            return {}
        ms = auditor.first_timestamp
        if options.since is not None:
            ms = min(ms, _ms(options.since))
        ms = max(0, ms - int(options.reply_slack.total_seconds() * 1000))
        first = await at_time(topic, partitions, ms, end)
        return {p: (max(first[p], begin[p]), end[p]) for p in partitions}

    reply_spans = await window(settings.reply_topic, parts[settings.reply_topic], reply_end)
    await _read_topic(
        bootstrap,
        settings.reply_topic,
        reply_spans,
        lambda r: auditor.add_reply(read_reply(r.topic, r.partition, r.offset, r.value)),
        shown,
        "replies",
    )
    reply_topics = [settings.reply_topic]
    if options.reply_to_topics:
        for topic in sorted(auditor.reply_to_topics() - set(topics.values())):
            found = await _partitions(admin, topic)
            if found is None:
                continue  # the worker answered on the default topic (InvalidArgument)
            reply_topics.append(topic)
            spans_here = await window(topic, found, await ends(topic, found))
            await _read_topic(
                bootstrap,
                topic,
                spans_here,
                lambda r: auditor.add_reply(
                    read_reply(r.topic, r.partition, r.offset, r.value), default_topic=False
                ),
                shown,
                f"replies on {topic}",
            )
    dlq_spans = await window(settings.dlq_topic, parts[settings.dlq_topic], dlq_end)
    await _read_topic(
        bootstrap,
        settings.dlq_topic,
        dlq_spans,
        lambda r: auditor.add_dead_letter(r.value),
        shown,
        "dead letters",
    )
    reply_begin = await starts(settings.reply_topic, parts[settings.reply_topic])
    if full and any(reply_begin.values()):
        auditor.notes.append(
            "the reply topic's first offsets are past 0 (retention): requests whose replies "
            "were deleted show as missing replies"
        )
    if full and not complete:
        auditor.notes.append(
            "the request topic's first offsets are past 0 (retention): replies without a "
            "ledger row cannot be placed and are counted as unverifiable"
        )

    # How far each replay group got: what `kafka-consumer-groups --describe` would say,
    # so that an operator knows whether the replay has caught up before trusting the audit.
    replay_lag: dict[str, int] = {}
    for group in dict.fromkeys(options.replayed_groups):
        if group == settings.group_id or not groups.get(group):
            continue
        committed = groups[group]
        behind = sum(max(0, req_end[p] - committed.get(p, req_start[p])) for p in req_parts)
        replay_lag[group] = behind
        auditor.notes.append(
            f"replay group {group} has caught up (its committed offsets are at the end of "
            f"{settings.request_topic})"
            if behind == 0
            else f"replay group {group} is {_n(behind, 'record')} behind the end of "
            f"{settings.request_topic}: if it is still running, audit again once it has caught "
            "up (records past its committed offsets expect no republished copy)"
        )

    original, replays = (
        groups[settings.group_id],
        [groups[g] for g in dict.fromkeys(options.replayed_groups) if g != settings.group_id],
    )

    def passes(rec: RequestRecord) -> int:
        return 1 + sum(1 for g in replays if g.get(rec.partition, -1) > rec.offset)

    def consumed(rec: RequestRecord) -> str | None:
        committed = original.get(rec.partition)
        if committed is None:
            return (
                f"group {settings.group_id} has no committed offset on partition "
                f"{rec.partition}: not consumed yet"
            )
        if committed > rec.offset:
            return f"group {settings.group_id} consumed it (committed offset {committed}): lost"
        return (
            f"group {settings.group_id} has not consumed it yet (committed offset "
            f"{committed} on partition {rec.partition})"
        )

    def describe(s: Mapping[int, tuple[int, int]]) -> str:
        return ", ".join(f"p{p} {a}-{b}" for p, (a, b) in sorted(s.items())) or "nothing"

    if full:
        how = "everything"
    elif options.offsets is not None:
        how = "offsets"
    else:
        how = (
            f"since {options.since.isoformat() if options.since else '-'} "
            f"until {options.until.isoformat() if options.until else '-'}"
        )
    scope: dict[str, Any] = {
        "request_topic": settings.request_topic,
        "range": f"{how}: {describe(spans)}" + ("" if complete or not full else " (truncated)"),
        "full": full,
        "complete": complete,
        "spans": {str(p): list(s) for p, s in sorted(spans.items())},
        "reply_topics": reply_topics,
        "dlq_topic": settings.dlq_topic,
        "group": settings.group_id,
        "replayed_groups": list(options.replayed_groups),
        "replay_lag": replay_lag,
        "accept_republished": options.accept_republished,
    }
    return auditor, scope, passes, consumed


# -- the command ----------------------------------------------------------------------------


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an RFC 3339 time") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone (e.g. 2026-01-01T00:00:00Z)")
    return moment


def parse_offsets(spec: str) -> dict[int | None, tuple[int, int | None]]:
    """``P:START-END,...`` (one partition) or ``START-END`` (every partition); END exclusive,
    START or END may be empty (the beginning, the end)."""
    out: dict[int | None, tuple[int, int | None]] = {}
    for part in (p.strip() for p in spec.split(",")):
        try:
            partition: int | None = None
            if ":" in part:
                head, part = part.split(":", 1)
                partition = int(head)
            first, dash, last = part.partition("-")
            if not dash:
                raise ValueError("no '-'")
            start = int(first) if first.strip() else 0
            end = int(last) if last.strip() else None
        except ValueError as exc:
            raise ConfigError(
                f"--offsets {spec!r}: {part!r} is not [P:]START-END ({exc})"
            ) from None
        if (
            start < 0
            or (end is not None and end < start)
            or (partition is not None and partition < 0)
        ):
            raise ConfigError(f"--offsets {spec!r}: {part!r} is an empty or negative range")
        out[partition] = (start, end)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Read the request, reply and dead-letter topics (read_committed) and the ledger, and "
        "prove: one reply per request, replies equal to the ledger byte for byte, no request "
        "applied twice, one version chain per record, a dead letter for every bad input. "
        f"Exit status: 0 no anomaly, {EXIT_ANOMALIES} anomalies, 1 failure, 2 usage."
    )
    parser.add_argument("--since", type=_moment, help="RFC 3339: requests from this time")
    parser.add_argument("--until", type=_moment, help="RFC 3339: requests before this time")
    parser.add_argument(
        "--offsets",
        metavar="SPEC",
        help="request offsets instead: P:START-END[,...] or START-END for every partition "
        "(END exclusive; either may be empty)",
    )
    parser.add_argument(
        "--replayed-groups",
        metavar="G1,G2",
        default="",
        help="consumer groups that replayed the request topic: their committed offsets say "
        "which records have a republished copy of their reply",
    )
    parser.add_argument(
        "--accept-republished",
        action="store_true",
        help="lenient: extra reply copies identical to another copy are republished copies",
    )
    parser.add_argument("--entity", help="print the ledger history of this entity's records")
    parser.add_argument("--id", dest="record_id", help="... of this record only (with --entity)")
    parser.add_argument(
        "--history-limit", type=int, default=1000, metavar="N", help="ledger entries shown at most"
    )
    parser.add_argument(
        "--reply-slack",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="in a range, read replies from this long before the first request (clock skew)",
    )
    parser.add_argument(
        "--no-reply-to-topics",
        action="store_true",
        help="do not read the reply_to topics that requests name",
    )
    parser.add_argument(
        "--max-examples", type=int, default=20, metavar="N", help="examples shown per anomaly kind"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--out", type=Path, metavar="FILE", help="also write the JSON report here")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


async def run_from_args(settings: Settings, args: argparse.Namespace) -> int:
    options = AuditOptions(
        since=args.since,
        until=args.until,
        offsets=parse_offsets(args.offsets) if args.offsets else None,
        replayed_groups=tuple(g.strip() for g in args.replayed_groups.split(",") if g.strip()),
        accept_republished=args.accept_republished,
        entity=args.entity,
        record_id=args.record_id,
        history_limit=args.history_limit,
        reply_slack=timedelta(seconds=args.reply_slack),
        reply_to_topics=not args.no_reply_to_topics,
        max_examples=args.max_examples,
    )
    report = await run_audit(
        settings,
        options,
        progress=None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True),
    )
    if args.out is not None:
        args.out.write_bytes(report.to_json() + b"\n")
    if args.json:
        sys.stdout.write(report.to_json().decode() + "\n")
    else:
        print(report.render())
    if options.entity is not None:
        # A history is a query: only anomalies of its records and requests fail it.
        return 0 if report.history_ok else EXIT_ANOMALIES
    return 0 if report.ok else EXIT_ANOMALIES
