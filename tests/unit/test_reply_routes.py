"""processor.reply_routes.check_routes: where each reply may go, without a broker."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Final

from hypothesis import given, settings
from hypothesis import strategies as st

from processor.contract import Reply, encode_reply
from processor.engine.envelope import Envelope, Outcome
from processor.errors import InvalidArgument
from processor.worker.intake import Rejected, admit, outcome_records, rejected_records
from processor.worker.reply_routes import check_routes
from tests.fuzzing import examples
from tests.support import Msg

NOW: Final = datetime(2030, 1, 1, tzinfo=UTC)
TOPICS: Final = {"replies": 4, "mine": 1, "requests.dlq": 1}


def _admitted(**fields: Any) -> tuple[Msg, Envelope | Rejected]:
    doc = {"type": "delete", "request_id": "r-1", "entity": "item", "id": "k1", **fields}
    msg = Msg(json.dumps(doc).encode())
    return msg, admit(msg, max_bytes=10_000, now=NOW)


def test_routes_that_exist_pass_unchanged() -> None:
    admitted = [_admitted(), _admitted(reply_partition=3), _admitted(reply_to="mine")]
    assert check_routes(admitted, TOPICS, "replies", NOW) == admitted


def test_a_partition_the_topic_lacks_is_rejected_with_a_reply_on_the_default_topic() -> None:
    for fields, path in (
        ({"reply_partition": 4}, "reply_partition"),
        ({"reply_to": "mine", "reply_partition": 1}, "reply_partition"),
        ({"reply_to": "nowhere"}, "reply_to"),
        ({"reply_to": "nowhere", "reply_partition": 0}, "reply_to"),
    ):
        ((_, item),) = check_routes([_admitted(**fields)], TOPICS, "replies", NOW)
        assert isinstance(item, Rejected), fields
        assert isinstance(item.fault, InvalidArgument)
        assert item.fault.path == path
        records = rejected_records(item, reply_topic="replies", dlq_topic="requests.dlq", now=NOW)
        assert [(r.topic, r.partition) for r in records] == [
            ("replies", None),
            ("requests.dlq", None),
        ]
    ((_, item),) = check_routes([_admitted(reply_partition=9)], TOPICS, "replies", NOW)
    assert isinstance(item, Rejected)
    assert "topic 'replies' has 4 partitions (0-3)" in item.fault.message


def test_a_rejected_message_with_a_bad_route_falls_back_to_the_default() -> None:
    msg, item = _admitted(reply_partition=7, id=1.5)  # does not decode: salvaged route
    assert isinstance(item, Rejected)
    assert item.reply_partition == 7
    ((_, checked),) = check_routes([(msg, item)], TOPICS, "replies", NOW)
    assert isinstance(checked, Rejected)
    assert (checked.reply_to, checked.reply_partition) == (None, None)


def test_the_reply_record_carries_the_requested_partition() -> None:
    msg, item = _admitted(reply_partition=2)
    assert isinstance(item, Envelope)
    reply = Reply(
        request_id="r-1", type="delete", entity="item", id="k1", status="success", processed_at=NOW
    )
    (record,) = outcome_records(
        item,
        msg,
        Outcome(reply, encode_reply(reply)),
        reply_topic="replies",
        dlq_topic="requests.dlq",
        now=NOW,
    )
    assert (record.topic, record.partition) == ("replies", 2)


@settings(deadline=None, max_examples=examples(200))
@given(
    routes=st.lists(
        st.tuples(
            st.one_of(st.none(), st.sampled_from(["replies", "mine", "gone"])),
            st.one_of(st.none(), st.integers(0, 6)),
        ),
        min_size=1,
        max_size=8,
    ),
    partitions=st.dictionaries(st.sampled_from(["replies", "mine"]), st.integers(1, 5), min_size=1),
)
def test_every_route_is_kept_or_refused_with_a_reason(
    routes: list[tuple[str | None, int | None]], partitions: dict[str, int]
) -> None:
    admitted = []
    for topic, partition in routes:
        fields: dict[str, Any] = {}
        if topic is not None:
            fields["reply_to"] = topic
        if partition is not None:
            fields["reply_partition"] = partition
        admitted.append(_admitted(**fields))
    checked = check_routes(admitted, partitions, "replies", NOW)
    assert len(checked) == len(admitted)
    for (topic, partition), (msg, item) in zip(routes, checked, strict=True):
        target = topic or "replies"
        ok = target in partitions and (partition is None or partition < partitions[target])
        if ok:
            assert isinstance(item, Envelope)
            (record,) = outcome_records(
                item,
                msg,
                Outcome(_REPLY, encode_reply(_REPLY)),
                reply_topic="replies",
                dlq_topic="requests.dlq",
                now=NOW,
            )
            assert (record.topic, record.partition) == (target, partition)
        else:
            assert isinstance(item, Rejected)
            assert item.fault.path == (
                "reply_to" if target not in partitions else "reply_partition"
            )
            reply, letter = rejected_records(
                item, reply_topic="replies", dlq_topic="requests.dlq", now=NOW
            )
            assert (reply.topic, reply.partition, letter.topic) == ("replies", None, "requests.dlq")


_REPLY: Final = Reply(
    request_id="r-1", type="delete", entity="item", id="k1", status="success", processed_at=NOW
)
