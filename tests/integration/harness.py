"""A worker harness for integration tests: real `processor run` processes, real topics.

Each scenario gets its own topics, consumer group and schema (table + ledger), so tests
never see each other's data. Workers are subprocesses, so they can be killed for real.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from processor.contract import DeadLetter, Reply, decode_reply, record_key

DEAD = msgspec.json.Decoder(DeadLetter)

TABLE_SQL = """
CREATE TABLE {schema}.acct (
    id           integer PRIMARY KEY,
    seq          bigint NOT NULL DEFAULT -1,
    last_request text,
    balance      integer NOT NULL DEFAULT 0 CHECK (balance >= 0)
);
CREATE TABLE {schema}.item (
    sku     text PRIMARY KEY,
    qty     integer NOT NULL DEFAULT 0,
    version bigint NOT NULL DEFAULT 1
);
CREATE TABLE {schema}.note (id integer PRIMARY KEY, body text);
CREATE TABLE {schema}.counter (id integer PRIMARY KEY, n bigint NOT NULL DEFAULT 0);
-- Every write to acct, in commit order per row: proves "applied at most once, in order".
CREATE TABLE {schema}.acct_log (
    n            bigserial PRIMARY KEY,
    id           integer NOT NULL,
    seq          bigint NOT NULL,
    last_request text
);
CREATE FUNCTION {schema}.log_acct() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {schema}.acct_log (id, seq, last_request)
    VALUES (NEW.id, NEW.seq, NEW.last_request);
    RETURN NEW;
END $$;
CREATE TRIGGER acct_log AFTER UPDATE ON {schema}.acct
    FOR EACH ROW EXECUTE FUNCTION {schema}.log_acct();
"""

REGISTRY = """
[entities.acct]
table = "{schema}.acct"
key = "id"
default_behavior = "AlwaysOverwrite"
attributes = ["seq", "last_request", "balance"]

[entities.item]
table = "{schema}.item"
key = "sku"
row_version = "version"

[entities.note]
table = "{schema}.note"
key = "id"
optimistic_concurrency = false

[entities.counter]
table = "{schema}.counter"
key = "id"
default_behavior = "IfRowVersionMatches"
"""


@dataclass
class Raw:
    """A message sent as is (poison, oversize, tombstone)."""

    value: bytes | None
    key: bytes | None = b"raw"
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    partition: int | None = None  # None: the producer's partitioner picks by key


@dataclass
class Scenario:
    """Topics, group, schema and registry of one test, and the workers it runs."""

    kafka: str
    database_url: str
    schema: str
    tmp: Path
    partitions: int = 4
    replication: int = 1  # 3 on a cluster stack
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def request_topic(self) -> str:
        return f"req-{self.run}"

    @property
    def reply_topic(self) -> str:
        return f"rep-{self.run}"

    @property
    def dlq_topic(self) -> str:
        return f"dlq-{self.run}"

    @property
    def group(self) -> str:
        return f"grp-{self.run}"

    async def setup(self, conn: asyncpg.Connection) -> None:
        await conn.execute(TABLE_SQL.format(schema=self.schema))
        await self._topics_and_ledger()

    async def sharing(self) -> Scenario:
        """Another deployment on this one's schema (tables and ledger), with its own topics,
        group and registry file: what a shared ledger sees."""
        tmp = self.tmp / f"sharing-{uuid.uuid4().hex[:6]}"
        tmp.mkdir()
        other = Scenario(self.kafka, self.database_url, self.schema, tmp, self.partitions)
        await other._topics_and_ledger()
        return other

    async def _topics_and_ledger(self) -> None:
        (self.tmp / "entities.toml").write_text(REGISTRY.format(schema=self.schema))
        admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka)
        await admin.start()
        try:
            await admin.create_topics(
                [
                    NewTopic(
                        t,
                        num_partitions=self.partitions,
                        replication_factor=self.replication,
                        topic_configs={"min.insync.replicas": str(min(2, self.replication))},
                    )
                    for t in (self.request_topic, self.reply_topic, self.dlq_topic)
                ]
            )
        finally:
            await admin.close()
        await wait_for_leaders(
            self.kafka, [self.request_topic, self.reply_topic, self.dlq_topic], self.partitions
        )
        migrate = subprocess.run(
            [sys.executable, "-m", "processor", "migrate"], env=self.env(), capture_output=True
        )
        assert migrate.returncode == 0, migrate.stderr.decode()

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=self.kafka,
            DATABASE_URL=self.database_url,
            PROCESSOR_REQUEST_TOPIC=self.request_topic,
            PROCESSOR_REPLY_TOPIC=self.reply_topic,
            PROCESSOR_DLQ_TOPIC=self.dlq_topic,
            PROCESSOR_GROUP_ID=self.group,
            PROCESSOR_ENTITIES=str(self.tmp / "entities.toml"),
            PROCESSOR_LEDGER_SCHEMA=self.schema,
            PROCESSOR_METRICS_PORT="0",
            PROCESSOR_MAX_BATCH="200",
        )
        env.update(extra)
        return env

    def start_worker(self, worker_id: str | None = None, **extra: str) -> subprocess.Popen[bytes]:
        """A `processor run` process; ``worker_id`` defaults to a new one (``w<n>``): pass a
        dead worker's id to restart it as its supervisor would."""
        number = len(self.workers)
        extra.setdefault("PROCESSOR_WORKER_ID", worker_id or f"w{number}")
        with open(self.tmp / f"worker-{number}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "processor", "run"],
                env=self.env(**extra),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.workers.append(proc)
        return proc

    def stop_all(self, sig: int = signal.SIGKILL) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(sig)
        for proc in self.workers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-4000:] for p in sorted(self.tmp.glob("worker-*.log"))
        )

    async def send(
        self,
        requests: Iterable[dict[str, Any] | Raw],
        *,
        rate: float | None = None,
    ) -> int:
        """Produce requests (dicts are JSON-encoded and keyed ``entity:id``)."""
        producer = AIOKafkaProducer(bootstrap_servers=self.kafka, enable_idempotence=True)
        await producer.start()
        count = 0
        try:
            for item in requests:
                headers: list[tuple[str, bytes]] = []
                partition: int | None = None
                if isinstance(item, dict):
                    key = record_key(item.get("entity"), item.get("id"))
                    value: bytes | None = msgspec.json.encode(item)
                else:
                    key, value, headers = item.key, item.value, item.headers
                    partition = item.partition
                await producer.send(
                    self.request_topic, value, key=key, headers=headers, partition=partition
                )
                count += 1
                if rate:
                    await asyncio.sleep(1 / rate)
            await producer.flush()
        finally:
            await producer.stop()
        return count

    async def read_all(
        self, topic: str, *, expect: int, timeout: float = 120.0, settle: float = 2.0
    ) -> list[Any]:
        """Read a topic read_committed from the start until ``expect`` records and quiet."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        records: list[Any] = []
        try:
            consumer.assign([TopicPartition(topic, p) for p in range(self.partitions)])
            await consumer.seek_to_beginning()
            deadline = time.monotonic() + timeout
            quiet_since = time.monotonic()
            while time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=300)
                fresh = [r for rs in batch.values() for r in rs]
                if fresh:
                    records.extend(fresh)
                    quiet_since = time.monotonic()
                elif len(records) >= expect and time.monotonic() - quiet_since > settle:
                    break
        finally:
            await consumer.stop()
        return records

    async def replies(self, *, expect: int, timeout: float = 120.0) -> list[Reply]:
        return [
            decode_reply(r.value)
            for r in await self.read_all(self.reply_topic, expect=expect, timeout=timeout)
        ]


async def wait_for_leaders(bootstrap: str, topics: Sequence[str], partitions: int) -> None:
    """A topic created a moment ago has no leaders yet; clients started then can stall."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            await producer.client.force_metadata_update()
            cluster = producer.client.cluster
            if all(
                (cluster.leader_for_partition(TopicPartition(t, p)) or -1) >= 0
                for t in topics
                for p in range(partitions)
            ):
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"topics {topics} have no leaders after 30 s")
    finally:
        await producer.stop()


def updates(keys: Sequence[int], seqs: int | Sequence[int], run: str) -> list[dict[str, Any]]:
    """Interleaved updates: request i of key k sets seq=i; order per key is the order of
    ``seqs`` (a number n: 0..n-1)."""
    return [
        {
            "type": "update",
            "request_id": f"{run}-{k}-{i}",
            "entity": "acct",
            "id": k,
            "attributes": {"seq": i, "last_request": f"{run}-{k}-{i}"},
        }
        for i in (range(seqs) if isinstance(seqs, int) else seqs)
        for k in keys
    ]


async def check_exactly_once(
    conn: asyncpg.Connection,
    schema: str,
    replies: Sequence[Reply],
    requests: Sequence[dict[str, Any]],
) -> None:
    """Every request: one reply, applied once (trigger log), in per-key order."""
    ids = [r["request_id"] for r in requests]
    counts: dict[str, int] = {}
    for reply in replies:
        counts[reply.request_id] = counts.get(reply.request_id, 0) + 1
    missing = [i for i in ids if i not in counts]
    duplicated = {i: n for i, n in counts.items() if n > 1}
    assert not missing, f"{len(missing)} requests without a reply, e.g. {missing[:5]}"
    assert not duplicated, f"duplicate replies: {list(duplicated.items())[:5]}"
    assert all(r.status == "success" for r in replies), [r for r in replies if r.fault][:3]
    log = await conn.fetch(f"SELECT id, seq, last_request FROM {schema}.acct_log ORDER BY n")
    applied = [r["last_request"] for r in log]
    assert len(applied) == len(set(applied)), "a request was applied twice"
    assert sorted(applied) == sorted(ids), "applied set differs from the request set"
    per_key: dict[int, list[int]] = {}
    for row in log:
        per_key.setdefault(row["id"], []).append(row["seq"])
    for key, seqs in per_key.items():
        assert seqs == sorted(seqs), f"key {key} applied out of order: {seqs[:20]}"
    ledger = await conn.fetchval(f"SELECT count(*) FROM {schema}.request_ledger WHERE applied")
    assert ledger == len(ids)


async def answered_once(s: Scenario, requests: list[dict[str, Any]]) -> None:
    """Every request answered once and applied once (``check_exactly_once``); the workers
    still running."""
    replies = await s.replies(expect=len(requests), timeout=240)
    conn = await asyncpg.connect(s.database_url)
    try:
        await check_exactly_once(conn, s.schema, replies, requests)
    finally:
        await conn.close()
    assert all(w.poll() is None for w in s.workers), "the worker must survive:\n" + s.logs()


def json_log_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a worker's output, each a JSON log object (the test fails on any other)."""
    text = path.read_text(errors="replace")
    parsed: list[dict[str, Any]] = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            value = None
        keys = value.keys() if isinstance(value, dict) else set()
        if not {"event", "level", "timestamp"} <= keys:
            raise AssertionError(f"{path.name}: not a JSON log line: {line!r}\n\n{text[-5000:]}")
        parsed.append(value)
    return parsed
