"""The evidence the audit is fed, indexed: the feeding half of the :class:`Auditor`."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Final

import msgspec

from processor.audit.checks import judge_chain, ledger_row_problems, written_records
from processor.audit.model import (
    BROKEN_VERSION_CHAIN,
    LEDGER_MISMATCH,
    REPLY_WITHOUT_REQUEST,
    Anomaly,
    LedgerFacts,
    ReplyCopy,
    RequestRecord,
    Write,
    application_of,
    digest_of,
    loc,
)
from processor.contract import DeadLetter, decode_reply
from processor.db.ledger import LedgerEntry

_dead_decoder: Final = msgspec.json.Decoder(DeadLetter)


class Evidence:
    """What the audit was fed: request records, reply copies, dead letters, ledger facts
    and version chains, indexed for the judge (:class:`~processor.audit.auditor.Auditor`).

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
        self.ledger: dict[str, LedgerFacts] = {}
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
            application = application_of(decode_reply(row.reply))
        facts = LedgerFacts(
            row.fingerprint,
            digest_of(row.reply),
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
        written = written_records(row) if row.applied and not problems else []
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
        where = (loc(self.request_topic, partition, offset),)
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
