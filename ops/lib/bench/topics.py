"""Kafka helpers: the bench topics, the backlog produced in one transaction, the reply collector."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from array import array
from collections.abc import Sequence
from typing import Any, Final

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from ops.lib.bench.costs import Result
from ops.lib.bench.environment import Env
from ops.lib.bench.workload import MISMATCH, Plan, say


async def create_topics(env: Env, names: Sequence[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=env.bootstrap, request_timeout_ms=30_000)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(n, num_partitions=env.partitions, replication_factor=1) for n in names]
        )
        deadline = time.monotonic() + 30
        while True:
            described = await admin.describe_topics(list(names))
            if all(
                t["error_code"] == 0
                and t["partitions"]
                and all(p["leader"] >= 0 for p in t["partitions"])
                for t in described
            ) and len(described) == len(names):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics without leaders: {names}")
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


async def delete_topics(env: Env, names: Sequence[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=env.bootstrap, request_timeout_ms=30_000)
    with contextlib.suppress(Exception):
        await admin.start()
        await admin.delete_topics(list(names))
    with contextlib.suppress(Exception):
        await admin.close()


async def group_members(env: Env, group: str) -> tuple[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=env.bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        responses = await admin.describe_consumer_groups([group])
        for response in responses:
            for g in response.to_object()["groups"]:
                if g["group"] == group:
                    return str(g["state"]), len(g["members"])
        return "Unknown", 0
    finally:
        await admin.close()


async def wait_group(
    env: Env, group: str, members: int, procs: Sequence[Any], within: float
) -> None:
    deadline = time.monotonic() + within
    while True:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a contender process exited ({proc.returncode}) while starting")
        with contextlib.suppress(Exception):
            state, count = await group_members(env, group)
            if state == "Stable" and count == members:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"group {group} not stable with {members} members in {within}s")
        await asyncio.sleep(0.2)


async def produce_backlog(env: Env, topic: str, plan: Plan) -> AIOKafkaProducer:
    """The whole backlog in one open transaction: invisible to read_committed until commit."""
    producer = AIOKafkaProducer(
        bootstrap_servers=env.bootstrap,
        transactional_id=f"bench-gate-{uuid.uuid4().hex[:8]}",
        enable_idempotence=True,
        linger_ms=5,
        max_batch_size=512 * 1024,
        max_request_size=4 * 1024 * 1024,
        transaction_timeout_ms=900_000,
    )
    await producer.start()
    await producer.begin_transaction()
    started = time.monotonic()
    for seq in range(len(plan)):
        partition, key, value = plan.record(seq)
        await producer.send(topic, value, key=key, partition=partition)
        if seq and seq % 200_000 == 0:
            say(f"  produced {seq:,}/{len(plan):,}")
    await producer.flush()
    say(f"  backlog of {len(plan):,} produced in {time.monotonic() - started:.1f}s (uncommitted)")
    return producer


class _Fault(msgspec.Struct):
    code: int


class _Reply(msgspec.Struct):
    request_id: str
    status: str
    row_version: str | None = None
    fault: _Fault | None = None


_reply_decoder: Final = msgspec.json.Decoder(_Reply)


class Collector:
    """Reads the reply topic from its start (read_committed) and checks every reply."""

    def __init__(
        self, env: Env, topic: str, plan: Plan, *, check_outcomes: bool, warmup: int = 0
    ) -> None:
        self.env, self.topic, self.plan = env, topic, plan
        self.check_outcomes = check_outcomes
        self.seen = bytearray(len(plan))
        self.unique = 0
        self.duplicates = 0
        self.wrong: list[str] = []
        self.wrong_count = 0
        self.foreign = 0
        self.first_ts: int | None = None
        self.last_ts = 0
        self.last_new = time.monotonic()
        self.sent_at = array("d", bytes(8 * len(plan)))  # monotonic send time (load runs)
        self.warmup = warmup
        self.latencies = array("d")
        self.received_at: list[float] = []  # monotonic receipt of each non-warmup reply
        self.arrived = asyncio.Event()  # set on every new reply: the closed loop waits on it
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.env.bootstrap,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=20,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await consumer.start()
        consumer.assign([TopicPartition(self.topic, p) for p in range(self.env.partitions)])
        await consumer.seek_to_beginning()
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(consumer), name="collector")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        plan, seen, ok, carried = self.plan, self.seen, self.plan.ok, self.plan.carried
        while True:
            batch = await consumer.getmany(timeout_ms=100, max_records=10_000)
            now = time.monotonic()
            for records in batch.values():
                for record in records:
                    try:
                        reply = _reply_decoder.decode(record.value)
                    except msgspec.DecodeError:
                        self.foreign += 1
                        continue
                    seq = plan.seq_of(reply.request_id)
                    if seq is None:
                        self.foreign += 1
                        continue
                    if seen[seq]:
                        self.duplicates += 1
                        seen[seq] = min(255, seen[seq] + 1)
                        continue
                    seen[seq] = 1
                    self.unique += 1
                    self.last_new = now
                    self.arrived.set()
                    ts = record.timestamp
                    if self.first_ts is None or ts < self.first_ts:
                        self.first_ts = ts
                    self.last_ts = max(self.last_ts, ts)
                    if seq >= self.warmup and self.sent_at[seq]:
                        self.latencies.append(now - self.sent_at[seq])
                        self.received_at.append(now)
                    if self.check_outcomes:
                        if ok[seq]:
                            good = reply.status == "success" and reply.row_version == str(
                                carried[seq] + 1
                            )
                        else:
                            good = (
                                reply.status == "fault"
                                and reply.fault is not None
                                and reply.fault.code == MISMATCH
                            )
                        if not good:
                            self.wrong_count += 1
                            if len(self.wrong) < 5:
                                self.wrong.append(
                                    f"{reply.request_id}: {reply.status} "
                                    f"v={reply.row_version} fault={reply.fault}, expected "
                                    + (
                                        f"success v={carried[seq] + 1}"
                                        if ok[seq]
                                        else "ConcurrencyVersionMismatch"
                                    )
                                )

    async def wait(self, expected: int, *, stall: float, procs: Sequence[Any]) -> bool:
        """Until ``expected`` distinct replies (True), or none new for ``stall`` s (False)."""
        self.last_new = time.monotonic()
        while self.unique < expected:
            if self._task is not None and self._task.done():
                self._task.result()
            if time.monotonic() - self.last_new > stall:
                return False
            if any(p.poll() is not None for p in procs):
                await asyncio.sleep(1)
                return self.unique >= expected
            await asyncio.sleep(0.05)
        return True

    def check(self, result: Result, expected: int) -> None:
        if self.unique < expected:
            result.fail(f"lost replies: {expected - self.unique} of {expected} have none")
        if self.duplicates:
            result.fail(f"{self.duplicates} duplicate replies")
        if self.foreign:
            result.fail(f"{self.foreign} replies to unknown requests")
        if self.wrong_count:
            result.fail(f"{self.wrong_count} wrong replies, e.g. {self.wrong}")
