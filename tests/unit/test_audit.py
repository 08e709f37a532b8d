"""The audit's pure checks: chains, ledger rows, and the per-request judgement."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from processor.audit import (
    BROKEN_VERSION_CHAIN,
    DOUBLE_APPLICATION,
    DUPLICATE_REPLY,
    LEDGER_MISMATCH,
    MISSING_REPLY,
    OUT_OF_ORDER_APPLICATION,
    REPLY_WITHOUT_REQUEST,
    SPURIOUS_DEAD_LETTER,
    UNANSWERED_BAD_INPUT,
    AuditOptions,
    Auditor,
    RequestRecord,
    Write,
    check_chain,
    judge_chain,
    ledger_row_problems,
    parse_offsets,
    read_reply,
    read_request,
)
from processor.audit.report import coverage
from processor.audit.topics import _describe_range
from processor.contract import DeadLetter, FaultDetail, Reply, encode_reply
from processor.db.ledger import LedgerEntry
from processor.errors import (
    ConfigError,
    DuplicateRequest,
    Fault,
    InvalidArgument,
    UnexpectedError,
)
from tests.support import Msg

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TOPIC = "requests"


def w(rid: str, prior: str | None, new: str | None, minute: int = 0) -> Write:
    return Write(rid, prior, new, T0 + timedelta(minutes=minute))


# -- version chains ----------------------------------------------------------------------------


def test_a_linked_chain_passes_even_when_processed_at_disagrees_with_commit_order() -> None:
    writes = [w("a", "1", "2", 0), w("c", "3", "4", 1), w("b", "2", "3", 1)]
    assert check_chain("acct", "1", writes) == []


def test_a_delete_ends_the_chain_and_a_reinsert_may_reuse_versions() -> None:
    writes = [w("a", "1", "2"), w("b", "2", None, 1), w("c", "1", "2", 2), w("d", "2", "3", 3)]
    assert check_chain("item", "x", writes) == []


@pytest.mark.parametrize(
    ("writes", "words"),
    [
        ([w("a", "1", "2"), w("b", "7", "8", 1)], "gap"),
        ([w("a", "1", "2"), w("b", "2", "3", 1), w("c", "2", "4", 2)], "fork"),
        ([w("a", "1", "2"), w("b", "2", "3", 1), w("c", "4", "3", 2)], "produced twice"),
        ([w("a", "1", "2"), w("b", "2", None, 1), w("c", "5", "6", 2), w("d", "9", "7", 3)], "gap"),
    ],
)
def test_a_broken_chain_is_reported_once_with_the_guilty_request(
    writes: list[Write], words: str
) -> None:
    (found,) = check_chain("acct", "1", writes)
    assert found.kind == BROKEN_VERSION_CHAIN
    assert words in found.detail
    assert (found.entity, found.record_id) == ("acct", "1")


def test_a_request_writing_a_record_twice_is_a_double_application() -> None:
    found = check_chain("acct", "1", [w("a", "1", "2"), w("b", "2", "3", 1), w("b", "3", "4", 1)])
    assert [a.kind for a in found] == [DOUBLE_APPLICATION]
    assert found[0].request_id == "b"


def at(
    rid: str,
    prior: str | None,
    new: str | None,
    offset: int,
    *,
    partition: int = 0,
    own: bool = True,
    minute: int = 0,
) -> Write:
    """A write of request ``rid`` from the request topic's ``partition`` at ``offset``."""
    return Write(
        rid,
        prior,
        new,
        T0 + timedelta(minutes=minute),
        f"{partition}:{offset}",
        (TOPIC, partition, offset),
        own,
    )


def test_writes_applied_in_offset_order_pass_whatever_their_processed_at() -> None:
    writes = [at("a", "1", "2", 10), at("c", "3", "4", 30), at("b", "2", "3", 20)]
    assert check_chain("counter", "1", writes) == []


def test_a_request_applied_after_a_later_request_of_its_key_is_out_of_order() -> None:
    """The chain links (a -> b -> c), but c came before b on the partition."""
    writes = [at("a", "1", "2", 10), at("b", "2", "3", 30), at("c", "3", "4", 20)]
    (found,) = check_chain("counter", "1", writes)
    assert found.kind == OUT_OF_ORDER_APPLICATION
    assert found.request_id == "c"
    assert (found.entity, found.record_id) == ("counter", "1")
    assert "requests[0]@20" in found.detail
    assert "requests[0]@30" in found.detail


def test_order_is_checked_per_partition_on_own_writes_within_an_incarnation() -> None:
    # Another partition: no order between them (the key was not on one partition).
    other_partition = [at("a", "1", "2", 50), at("b", "2", "3", 10, partition=1)]
    # A related write (another record's request, another key): may interleave.
    related = [at("a", "1", "2", 50), at("b", "2", "3", 10, own=False)]
    # A delete ends the incarnation; the next one (re-inserted) starts afresh.
    reborn = [at("a", "1", "2", 50), at("b", "2", None, 60), at("c", "7", "8", 5, minute=1)]
    # Without a known source there is nothing to compare.
    unknown = [at("a", "1", "2", 50), w("b", "2", "3")]
    for writes in (other_partition, related, reborn, unknown):
        assert check_chain("counter", "1", writes) == [], writes


def test_a_broken_chain_is_not_also_judged_for_order() -> None:
    writes = [at("a", "1", "2", 50), at("b", "2", "3", 10), at("c", "2", "4", 5)]
    assert [a.kind for a in check_chain("counter", "1", writes)] == [BROKEN_VERSION_CHAIN]


def test_the_auditor_reports_out_of_order_chains_by_name() -> None:
    auditor = Auditor(TOPIC, {0: (0, 100)}, complete=True)
    auditor.add_chain("counter", "1", [at("a", "1", "2", 40), at("b", "2", "3", 30)])
    auditor.finish()
    report = auditor.build_report({})
    assert report.found() == {OUT_OF_ORDER_APPLICATION}
    assert report.count(OUT_OF_ORDER_APPLICATION) == 1
    assert report.examples[OUT_OF_ORDER_APPLICATION][0]["request_id"] == "b"


def other(rid: str, prior: str | None, new: str | None, minute: int = 0) -> Write:
    """A write of a request the audit was not asked about (another request topic)."""
    return Write(rid, prior, new, T0 + timedelta(minutes=minute), audited=False)


def test_the_chain_starts_at_the_first_audited_write_whatever_came_before() -> None:
    # Another topic's traffic, then a reset by plain SQL (7), then the audited requests.
    writes = [
        other("x", "1", "2"),
        other("y", "2", "3", 1),
        w("a", "7", "8", 2),
        w("b", "8", "9", 3),
    ]
    assert judge_chain("counter", "1", writes) == ([], 0)


def test_a_break_between_other_requests_writes_is_counted_not_reported() -> None:
    # a -> (outside write) -> x over an unknown version -> y: the gap is x's.
    writes = [w("a", "1", "2"), other("x", "5", "6", 1), other("y", "6", "7", 2)]
    assert judge_chain("counter", "1", writes) == ([], 1)


def test_a_break_at_an_audited_write_is_reported_whoever_wrote_around_it() -> None:
    gap = [w("a", "1", "2"), other("x", "2", "3", 1), w("b", "5", "6", 2)]
    ((found,), _) = judge_chain("counter", "1", gap)
    assert (found.kind, found.request_id) == (BROKEN_VERSION_CHAIN, "b")
    assert "gap" in found.detail
    # A fork where the other side is another topic's write: a lost update all the same.
    fork = [w("a", "1", "2"), other("x", "2", "3", 1), w("b", "2", "4", 2)]
    ((found,), _) = judge_chain("counter", "1", fork)
    assert (found.kind, found.request_id) == (BROKEN_VERSION_CHAIN, "b")
    assert "request x" in found.detail


def test_a_record_without_an_audited_write_is_not_judged() -> None:
    assert judge_chain("counter", "1", [other("x", "1", "2"), other("y", "7", "8", 1)]) == ([], 0)


def test_chain_details_do_not_repeat_the_guilty_request_and_show_deletes() -> None:
    (found,) = check_chain("acct", "1", [w("a", "1", "2"), w("b", "7", "8", 1)])
    assert found.request_id == "b"
    assert "request b" not in found.detail
    assert "request a" in found.detail
    (found,) = check_chain(
        "acct", "1", [w("a", "1", "2"), w("b", "2", "3", 1), w("c", "2", "4", 2)]
    )
    assert found.request_id == "c"
    assert "request c" not in found.detail
    (found,) = check_chain("acct", "1", [w("a", "1", None), w("a", "1", None)])
    assert "again 1 -> deleted" in found.detail


# -- ledger rows -------------------------------------------------------------------------------


def reply(rid: str, **fields: Any) -> Reply:
    base: dict[str, Any] = {
        "request_id": rid,
        "type": "update",
        "entity": "acct",
        "id": 1,
        "status": "success",
        "processed_at": T0,
        "row_version": "11",
        "behavior_applied": "AlwaysOverwrite",
    }
    base.update(fields)
    return Reply(**base)


def entry(rid: str, data: Reply, **fields: Any) -> LedgerEntry:
    applied = data.status == "success" and data.type in ("update", "delete")
    writes = None
    if applied:
        writes = msgspec.json.encode(
            [{"entity": "acct", "id": 1, "prior": "10", "new": data.row_version}]
        ).decode()
    base: dict[str, Any] = {
        "request_id": rid,
        "fingerprint": b"fp-" + rid.encode(),
        "type": str(data.type),
        "entity": "acct",
        "record_id": "1",
        "status": data.status,
        "fault_code": data.fault.code if data.fault else None,
        "applied": applied,
        "writes": writes,
        "reply": encode_reply(data),
        "source_topic": TOPIC,
        "source_partition": 0,
        "source_offset": 0,
        "processed_at": T0,
    }
    base.update(fields)
    return LedgerEntry(**base)


def test_a_consistent_ledger_row_has_no_problem() -> None:
    assert ledger_row_problems(entry("r", reply("r"))) == []
    fault = reply(
        "f",
        status="fault",
        row_version=None,
        fault=FaultDetail(
            code=-2147220969, name="ObjectDoesNotExist", message="gone", retryable=False
        ),
    )
    assert ledger_row_problems(entry("f", fault)) == []


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"status": "fault"}, "status"),
        ({"applied": False}, "applied"),
        ({"record_id": "2"}, "record_id"),
        ({"writes": None}, "without writes"),
        ({"reply": b"garbage"}, "not a Reply"),
        (
            {"writes": '[{"entity": "acct", "id": 1, "prior": "10", "new": "99"}]'},
            "row_version",
        ),
    ],
)
def test_an_inconsistent_ledger_row_is_named(change: dict[str, Any], words: str) -> None:
    problems = ledger_row_problems(entry("r", reply("r"), **change))
    assert any(words in p for p in problems), problems


# -- the judgement -----------------------------------------------------------------------------


class History:
    """Builds an auditor's input like the topics would give it."""

    def __init__(self, *, complete: bool = True, accept_republished: bool = False) -> None:
        self.auditor = Auditor(
            TOPIC, {0: (0, 1000)}, complete=complete, accept_republished=accept_republished
        )
        self.offset = 0
        self.reply_offset = 0
        self.ledger_rows: list[LedgerEntry] = []

    def request(self, rid: str | None, *, value: bytes | None = None) -> RequestRecord:
        if value is None:
            value = msgspec.json.encode(
                {
                    "type": "update",
                    "request_id": rid,
                    "entity": "acct",
                    "id": 1,
                    "attributes": {"seq": self.offset},
                }
            )
        msg = Msg(value, topic=TOPIC, offset=self.offset)
        rec = read_request(msg, 0, max_bytes=10_000)
        self.offset += 1
        self.auditor.add_request(rec)
        return rec

    def reply(self, data: Reply | bytes) -> None:
        raw = data if isinstance(data, bytes) else encode_reply(data)
        self.auditor.add_reply(read_reply("replies", 0, self.reply_offset, raw))
        self.reply_offset += 1

    def ledger(self, rec: RequestRecord, data: Reply) -> None:
        assert rec.request_id is not None
        assert rec.fingerprint is not None
        self.ledger_rows.append(
            entry(rec.request_id, data, fingerprint=rec.fingerprint, source_offset=rec.offset)
        )

    def dead_letter(self, rec: RequestRecord) -> None:
        letter = DeadLetter(
            error="x",
            fault_code=None,
            request_id=rec.request_id,
            source_topic=TOPIC,
            source_partition=rec.partition,
            source_offset=rec.offset,
            key=None,
            headers=[],
            value_prefix=None,
            value_length=0,
            value_sha256=None,
            dead_lettered_at=T0,
        )
        self.auditor.add_dead_letter(msgspec.json.encode(letter))

    def judge(self, passes: int = 1) -> set[str]:
        for row in self.ledger_rows:
            if row.request_id in self.auditor.ledger_ids():
                self.auditor.add_ledger_row(row)
        self.auditor.finish(lambda _: passes)
        return {k for k, n in self.auditor.anomaly_counts.items() if n}


def fault(rid: str, kind: type[Fault], path: str | None = None) -> Reply:
    return reply(
        rid,
        status="fault",
        row_version=None,
        behavior_applied=None,
        fault=FaultDetail(code=kind.code, name=kind.name, message="m", retryable=False, path=path),
    )


def test_one_request_one_reply_equal_to_the_ledger_is_clean() -> None:
    h = History()
    rec = h.request("r1")
    h.ledger(rec, reply("r1"))
    h.reply(reply("r1"))
    assert h.judge() == set()
    assert h.auditor.outcomes == {"success/update": 1}


def test_missing_duplicate_and_republished_replies_are_counted_per_pass() -> None:
    h = History()
    rec = h.request("r1")
    h.ledger(rec, reply("r1"))
    assert h.judge() == {MISSING_REPLY}

    h = History()
    rec = h.request("r1")
    h.ledger(rec, reply("r1"))
    h.reply(reply("r1"))
    h.reply(reply("r1"))
    assert h.judge() == {DUPLICATE_REPLY}

    h = History()
    rec = h.request("r1")
    h.ledger(rec, reply("r1"))
    h.reply(reply("r1"))
    h.reply(reply("r1"))
    assert h.judge(passes=2) == set()
    assert h.auditor.counts["republished"] == 1


def test_accept_republished_takes_identical_extra_copies_only() -> None:
    h = History(accept_republished=True)
    rec = h.request("r1")
    h.ledger(rec, reply("r1"))
    h.reply(reply("r1"))
    h.reply(reply("r1"))
    assert h.judge() == set()

    h = History(accept_republished=True)
    rec = h.request("bad", value=b'{"request_id": "bad", "type": "update"}')
    h.dead_letter(rec)
    h.reply(fault("bad", InvalidArgument))
    h.reply(fault("bad", InvalidArgument))
    later = msgspec.structs.replace(fault("bad", InvalidArgument), processed_at=T0 + timedelta(1))
    h.reply(later)
    assert h.judge() == set()
    assert h.auditor.counts["republished"] == 2


def test_a_resend_gets_its_own_reply_and_a_different_payload_a_duplicate_record() -> None:
    h = History()
    first = h.request("r1")
    h.request("r1", value=first_value(first))  # the same payload again
    h.ledger(first, reply("r1"))
    h.reply(reply("r1"))
    h.reply(reply("r1"))
    other = h.request("r1")  # another payload: DuplicateRecord, not ledgered, dead-lettered
    h.reply(fault("r1", DuplicateRequest))
    h.dead_letter(other)
    assert h.judge() == set()
    assert h.auditor.outcomes == {"success/update": 2, "fault/DuplicateRecord": 1}


def first_value(rec: RequestRecord) -> bytes:
    return msgspec.json.encode(
        {
            "type": "update",
            "request_id": rec.request_id,
            "entity": "acct",
            "id": 1,
            "attributes": {"seq": rec.offset},
        }
    )


def test_a_reply_differing_from_the_ledger_is_a_mismatch() -> None:
    h = History()
    rec = h.request("r1")
    h.ledger(rec, reply("r1"))
    h.reply(encode_reply(reply("r1")) + b" ")
    assert h.judge() == {LEDGER_MISMATCH}


def test_a_ledgered_outcome_without_a_ledger_row_is_a_mismatch_but_unexpected_is_not() -> None:
    h = History()
    h.request("r1")
    h.reply(reply("r1"))
    assert h.judge() == {LEDGER_MISMATCH}

    h = History()
    h.request("r2")
    h.reply(fault("r2", UnexpectedError))
    assert h.judge() == set()
    assert h.auditor.outcomes == {"fault/UnExpected": 1}


def test_two_different_applications_of_one_request_are_a_double_application() -> None:
    h = History()
    rec = h.request("r1")
    h.ledger(rec, reply("r1", row_version="12", processed_at=T0 + timedelta(hours=1)))
    h.reply(reply("r1", row_version="11"))
    h.reply(reply("r1", row_version="12", processed_at=T0 + timedelta(hours=1)))
    assert h.judge(passes=2) == {DOUBLE_APPLICATION}


def test_replies_without_requests_depend_on_what_the_audit_can_see() -> None:
    h = History()
    h.reply(reply("ghost"))
    h.reply(b"not a reply")
    assert h.judge() == {REPLY_WITHOUT_REQUEST}
    assert h.auditor.anomaly_counts[REPLY_WITHOUT_REQUEST] == 2

    h = History(complete=False)
    h.reply(reply("ghost"))
    assert h.judge() == set()
    assert h.auditor.counts["replies_unverifiable"] == 1

    h = History(complete=False)  # ledgered, its source outside the audited offsets
    h.reply(reply("old"))
    h.ledger_rows.append(entry("old", reply("old"), source_offset=5000))
    assert h.judge() == set()
    assert h.auditor.counts["replies_out_of_scope"] == 1


def test_bad_input_needs_a_dead_letter_and_good_input_must_not_have_one() -> None:
    h = History()
    h.request(None, value=b"not json")
    bad = h.request("bad", value=b'{"request_id": "bad"}')
    h.reply(fault("bad", InvalidArgument))
    assert h.judge() == {UNANSWERED_BAD_INPUT}
    assert h.auditor.anomaly_counts[UNANSWERED_BAD_INPUT] == 2
    assert bad.admitted is False

    h = History()
    rec = h.request("r1")
    h.ledger(rec, reply("r1"))
    h.reply(reply("r1"))
    h.dead_letter(rec)
    assert h.judge() == {SPURIOUS_DEAD_LETTER}


def test_a_ledger_row_must_match_the_request_at_its_source() -> None:
    h = History()
    rec = h.request("r1")
    h.reply(reply("r1"))
    h.ledger_rows.append(entry("r1", reply("r1"), source_offset=rec.offset))  # other fingerprint
    assert h.judge() == {LEDGER_MISMATCH}

    h = History()
    h.request("r1")
    h.auditor.add_ledger_source("phantom", 0, 0)
    h.auditor.add_ledger_source("phantom", 0, 77)
    assert h.auditor.anomaly_counts[LEDGER_MISMATCH] == 2


def test_offsets_specs() -> None:
    assert parse_offsets("0:10-20,1:5-") == {0: (10, 20), 1: (5, None)}
    assert parse_offsets("-100") == {None: (0, 100)}
    for bad in ("x", "0:20-10", "5", "-1:0-1"):
        with pytest.raises(ConfigError):
            parse_offsets(bad)


def _report(**changes: Any) -> Any:
    from processor.audit import AuditReport

    base: dict[str, Any] = {
        "scope": {
            "request_topic": "requests",
            "range": "everything: p0 0-1",
            "reply_topics": ["replies"],
            "dlq_topic": "requests.dlq",
            "ledger": "processor.request_ledger",
            "group": "processor",
            "replayed_groups": ["replay-1"],
            "accept_republished": False,
        },
        "counts": {},
        "outcomes": {"success/delete": 1},
        "fault_codes": {},
        "anomalies": {MISSING_REPLY: 1},
        "examples": {
            MISSING_REPLY: [{"kind": MISSING_REPLY, "detail": "0 of 1 replies", "request_id": "r1"}]
        },
        "coverage": {"judged": ["1 request record of requests"], "not_judged": []},
    }
    base.update(changes)
    return AuditReport(**base)


def test_the_summary_spells_out_what_is_expected_and_counts_in_words() -> None:
    text = _report().render()
    assert text.startswith("processor audit: FAILED, 1 anomaly\n")
    assert (
        "expected      1 reply per request record (its processing by consumer group processor), "
        "+ 1 per replay by replay-1 that has passed the record (a republished copy)"
    ) in text
    assert "\njudged:\n  - 1 request record of requests\nnot judged: nothing\n" in text
    assert "    - request r1: 0 of 1 replies" in text
    assert "passes" not in text


def test_a_history_renders_deletes_and_reply_counts_and_only_its_own_anomalies() -> None:
    entry = {"at": "t1", "request_id": "d1", "type": "delete", "outcome": "success"}
    history = [
        {
            "entity": "acct",
            "id": "1",
            "chain": "ok",
            "entries": [
                {**entry, "prior": "5", "new": None, "source": "0:3", "replies": 1},
                {**entry, "request_id": "u1", "type": "update", "replies": 2, "source": "0:1"},
            ],
        }
    ]
    report = _report(history=history)
    assert report.history_ok
    assert not report.ok
    text = report.render()
    assert text.startswith("processor audit: history: no anomaly in it, 1 record, 2 entries\n")
    assert "d1 delete success 5 -> deleted (source 0:3, 1 reply)" in text
    assert "(source 0:1, 2 replies)" in text
    assert "1 anomaly outside this history" in text
    mine = {"kind": MISSING_REPLY, "detail": "0 of 1 replies", "request_id": "u1"}
    report = _report(history=history, history_anomalies=[mine])
    assert not report.history_ok
    assert "history: 1 anomaly in it" in report.render()
    assert "no other anomaly" in report.render()


def test_an_empty_partition_in_the_range_reads_as_empty() -> None:
    spans = {0: (0, 0), 1: (0, 3), 2: (5, 5)}
    assert (
        _describe_range(AuditOptions(), spans, full=True, complete=True)
        == "everything: p0 empty, p1 0-3, p2 empty"
    )


def test_the_first_judged_line_splits_the_records_before_counting_their_ids() -> None:
    counts: defaultdict[str, int] = defaultdict(int)
    counts.update(request_records=5, requests=4, rejected=1, request_ids=5)
    judged = coverage(_report(counts=counts))["judged"]
    assert judged[0] == (
        "5 request records of requests (everything: p0 0-1): 4 requests, 1 rejected at intake "
        "(5 distinct request_ids)"
    )
