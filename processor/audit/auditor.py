"""The :class:`Auditor`: fed records, dead letters and ledger rows, it judges (pure)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Final

from processor.audit.evidence import Evidence
from processor.audit.model import (
    ANOMALIES,
    DOUBLE_APPLICATION,
    DUPLICATE_REPLY,
    LEDGER_MISMATCH,
    MISSING_REPLY,
    REPLY_WITHOUT_REQUEST,
    SPURIOUS_DEAD_LETTER,
    UNANSWERED_BAD_INPUT,
    Anomaly,
    LedgerFacts,
    ReplyCopy,
    RequestRecord,
    fault_name,
    loc,
)
from processor.audit.report import AuditReport
from processor.errors import (
    FAULT_TYPES,
    DuplicateRequest,
    InvalidArgument,
    RequestTooLarge,
    UnexpectedError,
)
from processor.tools.text import counted as _n

_DUPLICATE: Final = DuplicateRequest.code
_UNEXPECTED: Final = UnexpectedError.code
_INTAKE_CODES: Final = frozenset({InvalidArgument.code, RequestTooLarge.code})
#: The counts of the report, in its order.
REPORT_COUNTS: Final = (
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


class Auditor(Evidence):
    """The pure part of the audit: fed records, dead letters and ledger rows (the
    :class:`Evidence` methods ``add_*``), it judges (:meth:`finish`) and reports."""

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
                        where=(loc(self.request_topic, partition, offset),),
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
        self.counts["replies"] += len(copies)
        self._check_ledgered(rid, recs, copies, ledger)
        self._check_count(rid, recs, copies, ledger, passes, consumed)
        ratio, rest = divmod(len(copies), len(recs))
        self._copy_ratios[-1 if rest else ratio] += 1
        for rec in recs:
            need = self._count_outcome(rec, ledger, copies)
            self._check_dead_letter(rec, need)

    def _check_ledgered(
        self,
        rid: str,
        recs: list[RequestRecord],
        copies: list[ReplyCopy],
        ledger: LedgerFacts | None,
    ) -> None:
        """Double applications, and replies that are not the ledger's bytes."""
        not_ledgered = _not_ledgered(recs, ledger)
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

    def _check_count(
        self,
        rid: str,
        recs: list[RequestRecord],
        copies: list[ReplyCopy],
        ledger: LedgerFacts | None,
        passes: Callable[[RequestRecord], int],
        consumed: Callable[[RequestRecord], str | None],
    ) -> None:
        """Missing and duplicate replies: as many copies as the records' passes."""
        expected = sum(passes(r) for r in recs)
        places = tuple(loc(self.request_topic, r.partition, r.offset) for r in recs)
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

    def _count_outcome(
        self, rec: RequestRecord, ledger: LedgerFacts | None, copies: Iterable[ReplyCopy]
    ) -> bool | None:
        """Count the record's outcome; returns whether it needs a dead letter (None: unknown)."""
        key, code, need = _outcome(self.request_topic, rec, ledger, copies)
        self.outcomes[key] += 1
        if code is not None:
            self.fault_codes[code] += 1
        return need

    def _check_dead_letter(self, rec: RequestRecord, need: bool | None) -> None:
        have = self.dead.get((rec.partition, rec.offset), 0)
        where = (loc(self.request_topic, rec.partition, rec.offset),)
        if need and not have:
            what = (
                f"rejected at intake ({fault_name(rec.fault_code)})"
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
                f"{loc(*ledger.source)}, which holds {holds}"
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
        counts = {name: self.counts[name] for name in REPORT_COUNTS}
        return AuditReport(
            scope=scope,
            counts=counts,
            outcomes=dict(self.outcomes),
            fault_codes={
                str(code): {"name": fault_name(code), "count": n}
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


def _not_ledgered(
    recs: list[RequestRecord], ledger: LedgerFacts | None
) -> Callable[[ReplyCopy], bool]:
    """Whether a copy is a fault reply not ledgered by design, that a record can explain."""
    admitted = [r for r in recs if r.admitted]
    intake_rejects = any(not r.admitted for r in recs)
    names_reply_to = any(r.reply_to or r.reply_partition is not None for r in admitted)

    def not_ledgered(c: ReplyCopy) -> bool:
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

    return not_ledgered


def _outcome(
    request_topic: str,
    rec: RequestRecord,
    ledger: LedgerFacts | None,
    copies: Iterable[ReplyCopy],
) -> tuple[str, int | None, bool | None]:
    """A record's outcome (its report key and fault code), and whether it needs a dead
    letter (None: unknown)."""
    if not rec.admitted:
        return f"rejected/{fault_name(rec.fault_code)}", rec.fault_code, True
    if ledger is not None and (
        ledger.fingerprint == rec.fingerprint
        or ledger.source == (request_topic, rec.partition, rec.offset)
    ):
        code = ledger.fault_code
        key = (
            f"success/{ledger.type}" if ledger.status == "success" else f"fault/{fault_name(code)}"
        )
        kind = FAULT_TYPES.get(code) if code is not None else None
        return key, code, kind is not None and kind.dead_letter
    if ledger is not None:
        return f"fault/{fault_name(_DUPLICATE)}", _DUPLICATE, True
    codes = {c.fault_code for c in copies if c.status == "fault"}
    if _UNEXPECTED in codes:
        return f"fault/{fault_name(_UNEXPECTED)}", _UNEXPECTED, None
    if InvalidArgument.code in codes:
        return f"rejected/{InvalidArgument.name}", InvalidArgument.code, None
    return "unknown", None, None
