"""The chaos run's checker is not vacuous: each anomaly, injected in a small history, is named."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from processor.audit import (
    DUPLICATE_REPLY,
    MISSING_REPLY,
    OUT_OF_ORDER_APPLICATION,
    Auditor,
    RequestRecord,
    Write,
    read_reply,
)
from processor.contract import DeadLetter, FaultDetail, Reply, encode_reply
from processor.errors import InvalidArgument, UnexpectedError
from processor.tools.chaos_check import (
    ALL_ANOMALIES,
    COUNTER_MISMATCH,
    DELETE_MISMATCH,
    STALE_ACCEPTED,
    UNANSWERED_HOSTILE,
    UNSETTLED_REQUEST,
    ClientHistory,
    Hostile,
    Observed,
    judge,
    model_anomalies,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TOPIC = "requests"


def clean() -> tuple[ClientHistory, Observed]:
    """Two counters incremented 3 and 0 times, one delete, one hostile record answered."""
    history = ClientHistory(initial={1: 0, 2: 5}, delete_ids=[10, 11])
    history.acked[1] = 3
    history.deleted.add(10)
    history.hostile.append(Hostile("wrong-type", 2, 40, "h1", InvalidArgument.code))
    history.hostile.append(Hostile("garbage", 3, 7, None, None))
    observed = Observed(counters={1: 3, 2: 5}, delete_left={11})
    observed.replies["h1"] = [("fault", InvalidArgument.code)]
    observed.dead_letters[(2, 40)] += 1
    observed.dead_letters[(3, 7)] += 1
    return history, observed


def kinds(history: ClientHistory, observed: Observed) -> list[str]:
    return [f.kind for f in model_anomalies(history, observed)]


def test_a_clean_history_has_no_finding_and_every_name_is_reported_as_zero() -> None:
    history, observed = clean()
    assert kinds(history, observed) == []
    verdict = judge(Auditor(TOPIC, {}, complete=True).build_report({}), [])
    assert verdict.ok
    assert set(verdict.anomalies) == set(ALL_ANOMALIES)
    assert not any(verdict.anomalies.values())


@pytest.mark.parametrize("final", [2, 4, None])
def test_a_lost_or_phantom_increment_or_a_vanished_counter_is_a_counter_mismatch(
    final: int | None,
) -> None:
    history, observed = clean()
    observed.counters[1] = final
    assert kinds(history, observed) == [COUNTER_MISMATCH]


def test_increments_of_unknown_outcome_widen_the_allowed_range_only() -> None:
    history, observed = clean()
    history.unknown[1] = 1
    for final in (3, 4):
        observed.counters[1] = final
        assert kinds(history, observed) == []
    observed.counters[1] = 5
    assert kinds(history, observed) == [COUNTER_MISMATCH]


def test_a_stale_update_accepted_is_named() -> None:
    history, observed = clean()
    history.stale_accepted.append("s1")
    assert kinds(history, observed) == [STALE_ACCEPTED]


def test_deleted_rows_must_be_gone_and_the_others_there() -> None:
    history, observed = clean()
    observed.delete_left = {10, 11}  # deleted with success, still there
    assert kinds(history, observed) == [DELETE_MISMATCH]
    observed.delete_left = set()  # 11 gone without a successful delete
    assert kinds(history, observed) == [DELETE_MISMATCH]
    history.delete_unknown.add(11)  # ... unless its delete's outcome is unknown
    assert kinds(history, observed) == []


def test_a_hostile_record_needs_a_dead_letter_and_its_fault_reply() -> None:
    history, observed = clean()
    del observed.dead_letters[(3, 7)]
    assert kinds(history, observed) == [UNANSWERED_HOSTILE]

    history, observed = clean()
    observed.replies["h1"] = []
    assert kinds(history, observed) == [UNANSWERED_HOSTILE]

    history, observed = clean()
    observed.replies["h1"] = [("fault", UnexpectedError.code)]
    assert kinds(history, observed) == [UNANSWERED_HOSTILE]

    history, observed = clean()
    observed.replies["h1"].append(("success", None))
    assert kinds(history, observed) == [UNANSWERED_HOSTILE]


def test_a_request_never_answered_is_unsettled() -> None:
    history, observed = clean()
    history.unsettled.append("u1")
    assert kinds(history, observed) == [UNSETTLED_REQUEST]


def test_observed_reads_replies_and_dead_letters_of_the_request_topic_only() -> None:
    observed = Observed()
    fault = FaultDetail(
        code=InvalidArgument.code, name="InvalidArgument", message="m", retryable=False
    )
    value = encode_reply(
        Reply(
            request_id="h1",
            type=None,
            entity=None,
            id=None,
            status="fault",
            processed_at=T0,
            fault=fault,
        )
    )
    observed.add_reply(value)
    observed.add_reply(b"not a reply")
    assert observed.replies == {"h1": [("fault", InvalidArgument.code)]}

    def letter(topic: str) -> bytes:
        return msgspec.json.encode(
            DeadLetter(
                error="bad",
                fault_code=InvalidArgument.code,
                request_id=None,
                source_topic=topic,
                source_partition=2,
                source_offset=40,
                key=None,
                headers=[],
                value_prefix=None,
                value_length=0,
                value_sha256="",
                dead_lettered_at=T0,
            )
        )

    observed.add_dead_letter(letter(TOPIC), TOPIC)
    observed.add_dead_letter(letter("other"), TOPIC)
    assert observed.dead_letters == {(2, 40): 1}


def test_the_audits_anomalies_reach_the_verdict_by_name() -> None:
    """A dropped reply, a duplicated reply and an out-of-order chain, fed to the audit."""
    auditor = Auditor(TOPIC, {0: (0, 10)}, complete=True)
    unexpected = encode_reply(
        Reply(
            request_id="dup",
            type="update",
            entity="counter",
            id=1,
            status="fault",
            processed_at=T0,
            fault=FaultDetail(
                code=UnexpectedError.code, name="UnExpected", message="m", retryable=True
            ),
        )
    )
    auditor.add_request(RequestRecord(0, 0, 0, "dup", True, fingerprint=b"f0"))
    auditor.add_request(RequestRecord(0, 1, 0, "dropped", True, fingerprint=b"f1"))
    auditor.add_reply(read_reply("replies", 0, 0, unexpected))
    auditor.add_reply(read_reply("replies", 0, 1, unexpected))
    auditor.add_chain(
        "counter",
        "1",
        [
            Write("a", "1", "2", T0, "0:5", (TOPIC, 0, 5)),
            Write("b", "2", "3", T0 + timedelta(seconds=1), "0:3", (TOPIC, 0, 3)),
        ],
    )
    auditor.finish()
    verdict = judge(auditor.build_report({}), [])
    assert not verdict.ok
    found = {k: n for k, n in verdict.anomalies.items() if n}
    assert found == {DUPLICATE_REPLY: 1, MISSING_REPLY: 1, OUT_OF_ORDER_APPLICATION: 1}
    assert any("applied after request a" in e for e in verdict.examples[OUT_OF_ORDER_APPLICATION])


def test_an_audit_that_could_not_run_fails_the_verdict() -> None:
    verdict = judge(None, [], audit_error="the database failed")
    assert not verdict.ok
    assert "the database failed" in verdict.examples[MISSING_REPLY][0]
