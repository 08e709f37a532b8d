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

**Checks** (each anomaly is _n, and the first ``max_examples`` of each kind are kept):

- ``missing-reply`` (Jepsen's *lost*): a request_id has fewer replies than its records
  times their passes (below). The detail says whether the worker group had consumed the
  record (committed offset past it: lost) or not (not processed yet).
- ``duplicate-reply``: more replies than records times passes (Jepsen's *duplicated*).
- ``reply-without-request``: a reply on the reply topic whose request is not on the
  request topic: no record with its request_id and no ledger row, or a ledger row citing a
  source offset (inside the audited range) that holds no such request; also an
  undecodable reply. A reply whose ledger row cites a source outside the audited range (or
  another topic) is _n as out of scope; in a partial audit a reply without a ledger
  row cannot be placed and is _n as unverifiable, not as an anomaly, and extra
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
  and a break that involves none of the audited writes is _n as not judged.
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

**Modules.** :mod:`.model` (the anomaly names, options, what is kept of a record),
:mod:`.checks` (one ledger row, one record's version chain), :mod:`.auditor` (the pure
judge), :mod:`.report` (text and JSON), :mod:`.topics` and :mod:`.ledger` (the reads),
:mod:`.run` (``run_audit``), :mod:`.cli` (``processor audit``).
"""

from processor.audit.auditor import Auditor
from processor.audit.checks import check_chain, judge_chain, ledger_row_problems
from processor.audit.cli import add_arguments, parse_offsets, run_from_args
from processor.audit.model import (
    ANOMALIES,
    BROKEN_VERSION_CHAIN,
    DOUBLE_APPLICATION,
    DUPLICATE_REPLY,
    EXIT_ANOMALIES,
    LEDGER_MISMATCH,
    MISSING_REPLY,
    OUT_OF_ORDER_APPLICATION,
    REPLY_WITHOUT_REQUEST,
    SPURIOUS_DEAD_LETTER,
    UNANSWERED_BAD_INPUT,
    Anomaly,
    AuditOptions,
    ReplyCopy,
    RequestRecord,
    Write,
    read_reply,
    read_request,
)
from processor.audit.report import AuditReport
from processor.audit.run import run_audit

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
