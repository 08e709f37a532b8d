"""The chaos run's checker: what the history of a faulted run must satisfy (``ops/chaos``).

The runner (``ops/chaos.py``) drives a contended load through a worker group while it
injects faults, then lets the system go quiet and hands this module two things:

- the **client's history** (:class:`ClientHistory`): per counter row, the increments that
  got a success reply and the ones whose outcome stayed unknown (no reply before the client
  gave up resending); the stale updates accepted; the delete-range rows deleted with success;
  every hostile record produced, with its place on the request topic, its request_id (when
  one can be read from it) and the fault it must get; the requests never answered;
- **what is there now** (:class:`Observed`): the final rows, the reply topic and the
  dead-letter topic as read ``read_committed``.

Two sets of checks, each anomaly counted by name (Jepsen style), with examples:

- the audit (:mod:`processor.audit`, everything from offset 0, after the quiet period):
  ``missing-reply`` (Jepsen's *lost*), ``duplicate-reply``, ``reply-without-request``,
  ``ledger-mismatch``, ``double-application``, ``broken-version-chain``,
  ``out-of-order-application``, ``unanswered-bad-input``, ``spurious-dead-letter``;
- the model (:func:`model_anomalies`):

  - ``counter-mismatch``: a counter's final ``n`` is not its initial value plus the
    increments acknowledged (a lost write or a phantom one); increments of unknown outcome
    widen the allowed range by one each (Jepsen's *info* operations);
  - ``stale-accepted``: an update carrying a version known to be stale succeeded;
  - ``delete-mismatch``: a delete-range row is there although its delete succeeded, or gone
    although no delete of it succeeded (nor stayed of unknown outcome);
  - ``unanswered-hostile``: a hostile record has no dead letter, or (when it had a readable
    request_id) no fault reply with the expected code, or a success reply;
  - ``unsettled-request``: a request the client resent until it gave up, without any reply
    (from the client's side: lost, or never delivered because the broker was down).

``judge`` puts both together; a run is clean when every count is 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from processor.audit import ANOMALIES, AuditReport
from processor.contract import DeadLetter, decode_reply

__all__ = [
    "ALL_ANOMALIES",
    "CLUSTER_FAULT_KINDS",
    "COUNTER_MISMATCH",
    "DELETE_MISMATCH",
    "FAULT_KINDS",
    "MODEL_ANOMALIES",
    "STALE_ACCEPTED",
    "UNANSWERED_HOSTILE",
    "UNSETTLED_REQUEST",
    "ClientHistory",
    "Finding",
    "Hostile",
    "Observed",
    "Verdict",
    "judge",
    "model_anomalies",
    "read_dead_letter",
    "read_reply",
]

COUNTER_MISMATCH: Final = "counter-mismatch"
STALE_ACCEPTED: Final = "stale-accepted"
DELETE_MISMATCH: Final = "delete-mismatch"
UNANSWERED_HOSTILE: Final = "unanswered-hostile"
UNSETTLED_REQUEST: Final = "unsettled-request"
#: The model's anomalies, in the order of the report.
MODEL_ANOMALIES: Final = (
    COUNTER_MISMATCH,
    STALE_ACCEPTED,
    DELETE_MISMATCH,
    UNANSWERED_HOSTILE,
    UNSETTLED_REQUEST,
)
#: Everything a chaos run reports: the audit's anomalies, then the model's.
ALL_ANOMALIES: Final = (*ANOMALIES, *MODEL_ANOMALIES)
#: The faults ``ops/chaos`` injects, in the short form's order.
FAULT_KINDS: Final = (
    "worker-kill9",
    "worker-zombie",
    "worker-add",
    "worker-remove",
    "kafka-kill9",
    "postgres-immediate",
    "postgres-fast",
    "net-latency",
    "net-reset",
    "net-partition",
)

#: The fault kinds of the cluster run (``ops/chaos --cluster``): three brokers, a
#: PostgreSQL primary with a synchronous standby, a proxy between the workers and one broker.
CLUSTER_FAULT_KINDS: Final = (
    "broker-leader-kill9",
    "broker-pause",
    "kafka-net-latency",
    "kafka-net-reset",
    "kafka-net-partition",
    "postgres-failover",
    "overlap",
)

_dead_decoder: Final = msgspec.json.Decoder(DeadLetter)


@dataclass(frozen=True, slots=True)
class Hostile:
    """One hostile record produced straight to the request topic, and where it landed."""

    kind: str
    partition: int
    offset: int
    request_id: str | None  # readable from the record: it must get a fault reply
    fault_code: int | None  # the fault that reply must carry (None: any fault)


@dataclass(slots=True)
class ClientHistory:
    """What the load's clients did and saw."""

    initial: dict[int, int] = field(default_factory=dict)  # counter row -> n at the start
    acked: Counter[int] = field(default_factory=Counter)  # success replies of increments
    unknown: Counter[int] = field(default_factory=Counter)  # increments of unknown outcome
    stale_accepted: list[str] = field(default_factory=list)  # request_ids
    delete_ids: list[int] = field(default_factory=list)
    deleted: set[int] = field(default_factory=set)  # delete succeeded
    delete_unknown: set[int] = field(default_factory=set)  # delete of unknown outcome
    hostile: list[Hostile] = field(default_factory=list)
    unsettled: list[str] = field(default_factory=list)  # request_ids never answered


@dataclass(slots=True)
class Observed:
    """The state after the quiet period: rows, replies and dead letters (read_committed)."""

    counters: dict[int, int | None] = field(default_factory=dict)  # None: the row is gone
    delete_left: set[int] = field(default_factory=set)
    #: request_id -> (status, fault code) of every copy on the reply topic
    replies: dict[str, list[tuple[str, int | None]]] = field(default_factory=dict)
    #: (source_partition, source_offset) of dead letters citing the request topic
    dead_letters: Counter[tuple[int, int]] = field(default_factory=Counter)

    def add_reply(self, value: bytes | None) -> None:
        found = read_reply(value)
        if found is not None:
            rid, status, code = found
            self.replies.setdefault(rid, []).append((status, code))

    def add_dead_letter(self, value: bytes | None, request_topic: str) -> None:
        found = read_dead_letter(value, request_topic)
        if found is not None:
            self.dead_letters[found] += 1


def read_reply(value: bytes | None) -> tuple[str, str, int | None] | None:
    """(request_id, status, fault code) of a reply record; None if it is not a Reply."""
    try:
        reply = decode_reply(value or b"")
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return reply.request_id, reply.status, reply.fault.code if reply.fault else None


def read_dead_letter(value: bytes | None, request_topic: str) -> tuple[int, int] | None:
    """(source partition, source offset) of a dead letter of ``request_topic``."""
    try:
        letter = _dead_decoder.decode(value or b"")
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if letter.source_topic != request_topic:
        return None
    return letter.source_partition, letter.source_offset


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "detail": self.detail}


def model_anomalies(history: ClientHistory, observed: Observed) -> list[Finding]:
    """The model's checks (see the module docstring); one finding per broken item."""
    found: list[Finding] = []
    for row, start in sorted(history.initial.items()):
        final = observed.counters.get(row)
        low = start + history.acked[row]
        high = low + history.unknown[row]
        if final is None or not low <= final <= high:
            allowed = f"{low}" if low == high else f"{low}..{high}"
            found.append(
                Finding(
                    COUNTER_MISMATCH,
                    f"counter {row}: n is {final if final is not None else 'gone'}, expected "
                    f"{allowed} (initial {start} + {history.acked[row]} acknowledged "
                    f"increments, {history.unknown[row]} of unknown outcome)",
                )
            )
    for rid in history.stale_accepted:
        found.append(Finding(STALE_ACCEPTED, f"request {rid}: a stale version was accepted"))
    for row in history.delete_ids:
        there = row in observed.delete_left
        if row in history.delete_unknown:
            continue
        if there and row in history.deleted:
            found.append(Finding(DELETE_MISMATCH, f"row {row}: deleted with success, still there"))
        elif not there and row not in history.deleted:
            found.append(
                Finding(DELETE_MISMATCH, f"row {row}: gone, but no delete of it succeeded")
            )
    for h in history.hostile:
        where = f"{h.kind} record at partition {h.partition} offset {h.offset}"
        if not observed.dead_letters.get((h.partition, h.offset)):
            found.append(Finding(UNANSWERED_HOSTILE, f"{where}: no dead letter"))
        if h.request_id is None:
            continue
        copies = observed.replies.get(h.request_id, [])
        faults = [code for status, code in copies if status == "fault"]
        if not faults:
            found.append(
                Finding(UNANSWERED_HOSTILE, f"{where} (request {h.request_id}): no fault reply")
            )
        elif h.fault_code is not None and h.fault_code not in faults:
            found.append(
                Finding(
                    UNANSWERED_HOSTILE,
                    f"{where} (request {h.request_id}): fault {faults} instead of {h.fault_code}",
                )
            )
        if any(status == "success" for status, _ in copies):
            found.append(
                Finding(UNANSWERED_HOSTILE, f"{where} (request {h.request_id}): a success reply")
            )
    for rid in history.unsettled:
        found.append(
            Finding(UNSETTLED_REQUEST, f"request {rid}: no reply although resent until the end")
        )
    return found


@dataclass(slots=True)
class Verdict:
    """Anomaly counts by name (every name of :data:`ALL_ANOMALIES`, zeros included)."""

    anomalies: dict[str, int]
    examples: dict[str, list[str]]

    @property
    def ok(self) -> bool:
        return not any(self.anomalies.values())

    @property
    def total(self) -> int:
        return sum(self.anomalies.values())

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "anomalies": self.anomalies, "examples": self.examples}


def judge(
    audit: AuditReport | None,
    model: Iterable[Finding],
    *,
    max_examples: int = 10,
    audit_error: str | None = None,
) -> Verdict:
    """The audit's anomaly counts and the model's findings, by name.

    ``audit`` None (the audit could not run: ``audit_error`` says why) counts as one
    ``missing-reply``: nothing was proven, and a run must not pass on that.
    """
    counts: dict[str, int] = dict.fromkeys(ALL_ANOMALIES, 0)
    examples: dict[str, list[str]] = {}
    if audit is None:
        counts[ANOMALIES[0]] += 1
        examples[ANOMALIES[0]] = [f"the audit did not run: {audit_error}"]
    else:
        for kind, n in audit.anomalies.items():
            counts[kind] = counts.get(kind, 0) + n
        for kind, items in audit.examples.items():
            examples[kind] = [_describe(e) for e in items[:max_examples]]
    for finding in model:
        counts[finding.kind] += 1
        shown = examples.setdefault(finding.kind, [])
        if len(shown) < max_examples:
            shown.append(finding.detail)
    return Verdict(counts, examples)


def _describe(example: Mapping[str, Any]) -> str:
    head = f"request {example['request_id']}: " if example.get("request_id") else ""
    if example.get("entity"):
        head += f"{example['entity']} {example.get('id')}: "
    where = f" [{', '.join(example['where'])}]" if example.get("where") else ""
    return f"{head}{example.get('detail')}{where}"
