"""A producer's `request_id` header addresses the fault reply of a message whose body has none.

The README lets producers set the header, and promises a fault reply to every bad message
a request_id can be read from. A worker on the real broker answers each of these on the
reply topic, and its dead letter names the id.
"""

from __future__ import annotations

from typing import Any

import pytest

from processor.contract import decode_reply
from processor.errors import InvalidArgument, RequestTooLarge
from tests.integration.harness import DEAD, Raw, Scenario

pytestmark = pytest.mark.timeout(300)


async def test_a_malformed_message_with_a_request_id_header_gets_its_fault_reply(
    scenario: Scenario,
) -> None:
    run = scenario.run
    trace = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

    def raw(value: bytes | None, name: str | None) -> Raw:
        headers = [("traceparent", trace)]
        if name is not None:
            headers.append(("request_id", f"{run}-{name}".encode()))
        return Raw(value, key=f"k-{name}".encode(), headers=headers)

    sent: list[dict[str, Any] | Raw] = [
        raw(b"not json", "notjson"),
        raw(b'{"type":"update","entity":"acct"}', "noid"),  # JSON without a request_id
        raw(None, "tombstone"),
        raw(b"x" * 2_000, "huge"),  # over the limit below: not decoded at all
        raw(b"not json either", None),  # no header: a dead letter only
        Raw(b"not json", headers=[("request_id", b"bad\x00id")]),  # one the contract refuses
    ]
    scenario.start_worker(PROCESSOR_MAX_MESSAGE_BYTES="1000")
    await scenario.send(sent)

    records = await scenario.read_all(scenario.reply_topic, expect=4)
    replies = {decode_reply(r.value).request_id: (r, decode_reply(r.value)) for r in records}
    assert len(records) == 4, scenario.logs()
    expected = {
        f"{run}-notjson": InvalidArgument.code,
        f"{run}-noid": InvalidArgument.code,
        f"{run}-tombstone": InvalidArgument.code,
        f"{run}-huge": RequestTooLarge.code,
    }
    assert set(replies) == set(expected), scenario.logs()
    for request_id, (record, reply) in replies.items():
        assert reply.status == "fault"
        assert reply.fault is not None
        assert reply.fault.code == expected[request_id]
        headers = dict(record.headers)
        assert headers["request_id"] == request_id.encode()
        assert headers["traceparent"] == trace

    letters = [DEAD.decode(r.value) for r in await scenario.read_all(scenario.dlq_topic, expect=6)]
    assert len(letters) == 6
    assert sorted(str(letter.request_id) for letter in letters) == sorted(
        [*expected, "None", "None"]
    )
    for letter in letters:
        if letter.request_id is not None:
            assert letter.fault_code == expected[letter.request_id]
    assert scenario.workers[0].poll() is None, "the worker must survive bad input"
