"""The commit pipeline's decisions, through its seam (a fake Transactions and clock)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, ProducerFenced

from processor.kafka import kip447
from processor.metrics import Metrics
from processor.worker.commit import (
    FENCING_WINDOW,
    Batch,
    CommitPipeline,
    TransactionTimedOut,
    WorkerIdInUse,
)
from processor.worker.intake import OutRecord
from processor.worker.retry import GaveUp, Retry

TP = TopicPartition("requests", 0)
GROUP = kip447.GroupMetadata("g", 3, "member-1")
BATCH = Batch(records=[], first={TP: 10}, next={TP: 20}, group=GROUP)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTransactions:
    """Raises the queued errors, one per commit, then commits."""

    transactional_id = "g-w0"

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.commits: list[Mapping[TopicPartition, int]] = []
        self.resets = 0

    async def start(self) -> None:
        pass

    async def commit(
        self,
        records: Sequence[OutRecord],
        offsets: Mapping[TopicPartition, int],
        group: kip447.GroupMetadata,
    ) -> None:
        if self.errors:
            raise self.errors.pop(0)
        self.commits.append(dict(offsets))

    async def reset(self) -> None:
        self.resets += 1

    async def close(self) -> None:
        pass


def pipeline(
    txns: FakeTransactions,
    clock: Clock,
    seconds: float = 0.0,
    committed: dict[TopicPartition, int | None] | None = None,
) -> CommitPipeline:
    """A pipeline over ``txns``; ``committed``: what the group's offsets read as."""
    offsets = committed if committed is not None else {TP: 10}

    async def read(partitions: Sequence[TopicPartition]) -> Mapping[TopicPartition, int | None]:
        return {tp: offsets.get(tp) for tp in partitions}

    return CommitPipeline(
        txns,
        Metrics(),
        committed=read,
        stop=asyncio.Event(),
        retry_seconds=seconds,
        clock=clock,
    )


def fenced(p: CommitPipeline, reason: str) -> float:
    return p._metrics.registry.get_sample_value("processor_fenced_total", {"reason": reason}) or 0


async def test_a_commit_commits_the_batch_offsets_with_its_group() -> None:
    txns = FakeTransactions()
    assert await pipeline(txns, Clock()).commit(BATCH)
    assert txns.commits == [{TP: 20}]


async def test_a_refusal_by_the_group_is_not_retried_and_counted() -> None:
    txns = FakeTransactions(kip447.GroupFenced("ILLEGAL_GENERATION"))
    p = pipeline(txns, Clock(), seconds=60)
    assert not await p.commit(BATCH)
    assert txns.commits == []
    assert fenced(p, "generation") == 1


async def test_three_producer_fencings_within_the_window_stop_the_worker() -> None:
    clock = Clock()
    txns = FakeTransactions(ProducerFenced(), ProducerFenced(), ProducerFenced())
    p = pipeline(txns, clock)
    assert not await p.commit(BATCH)
    clock.now += 30
    assert not await p.commit(BATCH)
    clock.now += 30
    with pytest.raises(WorkerIdInUse, match="PROCESSOR_WORKER_ID"):
        await p.commit(BATCH)
    assert txns.resets == 2  # replaced after each of the first two


async def test_fencings_further_apart_than_the_window_are_forgiven() -> None:
    clock = Clock()
    txns = FakeTransactions(*(ProducerFenced() for _ in range(5)))
    p = pipeline(txns, clock)
    for _ in range(5):
        assert not await p.commit(BATCH)
        clock.now += FENCING_WINDOW / 2 + 1
    assert fenced(p, "producer") == 5


async def test_a_transaction_the_broker_timed_out_does_not_count_towards_another_worker() -> None:
    txns = FakeTransactions(*(TransactionTimedOut("open 14 s") for _ in range(4)))
    p = pipeline(txns, Clock())
    for _ in range(4):
        assert not await p.commit(BATCH)
    assert fenced(p, "timeout") == 4
    assert fenced(p, "producer") == 0


async def test_transient_failures_are_retried_with_a_new_producer_within_the_budget() -> None:
    txns = FakeTransactions(KafkaConnectionError(), KafkaConnectionError())
    p = pipeline(txns, Clock(), seconds=60)
    assert await p.commit(BATCH)
    assert txns.resets == 2
    assert txns.commits == [{TP: 20}]


async def test_a_failed_attempt_that_landed_after_all_is_not_sent_again() -> None:
    """The commit timed out after the broker took it (EndTxn written, answer lost): the
    committed offset is the batch's end, so the retry does not publish it twice."""
    txns = FakeTransactions(TimeoutError())
    p = pipeline(txns, Clock(), seconds=60, committed={TP: 20})
    assert await p.commit(BATCH)
    assert txns.commits == []


async def test_a_batch_another_worker_committed_past_is_abandoned() -> None:
    txns = FakeTransactions(KafkaConnectionError())
    p = pipeline(txns, Clock(), seconds=60, committed={TP: 35})
    assert not await p.commit(BATCH)
    assert txns.commits == []


async def test_a_spent_budget_leaves_the_batch_to_be_read_again() -> None:
    txns = FakeTransactions(KafkaConnectionError())
    p = pipeline(txns, Clock(), seconds=0)
    assert not await p.commit(BATCH)
    assert txns.resets == 1  # the producer is replaced for the next batch


async def test_retry_raises_what_is_not_transient_and_gives_up_with_the_cause() -> None:
    retry = Retry(lambda e: isinstance(e, OSError), seconds=60, attempts=3)
    calls = 0

    async def failing() -> None:
        nonlocal calls
        calls += 1
        raise OSError("down")

    with pytest.raises(GaveUp) as gave_up:
        await retry.run(failing)
    assert calls == 3
    assert isinstance(gave_up.value.__cause__, OSError)

    async def wrong() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        await retry.run(wrong)
