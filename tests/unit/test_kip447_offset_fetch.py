"""processor.kip447's OffsetFetch: a group-level error is an error, not "no committed offset";
UNSTABLE_OFFSET_COMMIT is retried; v7 answers are read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aiokafka.errors as errors
import pytest
from aiokafka import TopicPartition

from processor.kafka import kip447

TP = TopicPartition("requests", 3)


@dataclass
class Response:
    """An OffsetFetch v2+ response: group-level error_code, per-partition entries."""

    error_code: int
    topics: list[tuple[str, list[tuple[Any, ...]]]] = field(default_factory=list)


class Coordinator:
    """Just what aiokafka's _do_fetch_commit_offsets touches."""

    group_id = "processor"

    def __init__(self, response: Response) -> None:
        self.response = response
        self.dead = 0

    async def _send_req(self, request: Any) -> Response:
        return self.response

    def coordinator_dead(self) -> None:
        self.dead += 1


async def fetch(coordinator: Coordinator) -> Any:
    return await kip447._do_fetch_commit_offsets(coordinator, [TP])


async def test_a_coordinator_still_loading_raises_a_retriable_error_instead_of_no_offset() -> None:
    """COORDINATOR_LOAD_IN_PROGRESS at group level (what a restarted broker answers while
    it reloads __consumer_offsets): aiokafka's retry loops see a retriable error."""
    with pytest.raises(errors.GroupLoadInProgressError) as caught:
        await fetch(Coordinator(Response(error_code=14)))
    assert caught.value.retriable


@pytest.mark.parametrize("code", [15, 16])
async def test_a_moved_coordinator_is_marked_dead_and_retried(code: int) -> None:
    coordinator = Coordinator(Response(error_code=code))
    with pytest.raises(errors.KafkaError) as caught:
        await fetch(coordinator)
    assert caught.value.retriable
    assert isinstance(caught.value, errors.for_code(code))
    assert coordinator.dead == 1


async def test_offsets_are_read_as_before_when_the_group_level_code_is_zero() -> None:
    offsets = await fetch(Coordinator(Response(0, [("requests", [(3, 1500, "", 0)])])))
    assert offsets[TP].offset == 1500
    none = await fetch(Coordinator(Response(0, [("requests", [(3, -1, "", 0)])])))
    assert TP not in none  # a group that never committed: still "no offset"


async def test_an_unstable_offset_is_a_retriable_error_and_counted() -> None:
    """UNSTABLE_OFFSET_COMMIT (88, v7): a transaction holding the offset is open."""
    before = kip447.counters["unstable_offset_fetch"]
    with pytest.raises(kip447.UnstableOffsetCommit) as caught:
        await fetch(Coordinator(Response(0, [("requests", [(3, -1, -1, None, 88, {})])])))
    assert caught.value.retriable
    assert kip447.counters["unstable_offset_fetch"] == before + 1


async def test_a_v7_answer_is_read() -> None:
    offsets = await fetch(Coordinator(Response(0, [("requests", [(3, 42, 7, None, 0, {})])])))
    assert offsets[TP].offset == 42
    assert offsets[TP].metadata == ""
