"""The load: virtual clients sharing one Client, and the hostile records beside them."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
import uuid
from collections import Counter
from itertools import accumulate
from typing import Any

import msgspec
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

from ops.lib.chaos.config import MAX_MESSAGE_BYTES, MISMATCH, POISON, Config
from processor.client import Client, new_request_id
from processor.contract import (
    DeleteRequest,
    Reply,
    Request,
    RetrieveRequest,
    UpdateRequest,
    record_key,
    request_key,
)
from processor.errors import (
    EntityNotFound,
    InvalidArgument,
    ObjectDoesNotExist,
    ProcessorError,
    ReplyTimeout,
    RequestTooLarge,
    TransientError,
)
from processor.tools.chaos_check import (
    ClientHistory,
    Hostile,
)
from processor.tools.stats import zipf_weights

#: A hostile record: (kind, value, key, headers, readable request_id, expected fault code).
HostileRecord = tuple[
    str, bytes | None, bytes | None, list[tuple[str, bytes]], str | None, int | None
]


def hostile_record(rng: random.Random, row: int) -> HostileRecord:
    """One record a careless or hostile producer might send about ``row``, drawn from
    ``rng``: garbage, a tombstone, a wrong type, a bad id, an oversize value, an unknown
    entity or attribute."""
    rid = f"hostile-{uuid.uuid4().hex}"
    kind = rng.choice(
        (
            "garbage",
            "tombstone",
            "wrong-type",
            "bad-id",
            "oversize",
            "unknown-entity",
            "unknown-attribute",
        )
    )
    key = record_key("counter", row)
    if kind == "garbage":
        return kind, bytes(rng.randrange(256) for _ in range(64)), key, [], None, None
    if kind == "tombstone":
        return kind, None, key, [], None, None
    if kind == "oversize":
        value = b"x" * (MAX_MESSAGE_BYTES + 1000)
        return kind, value, key, [("request_id", rid.encode())], rid, RequestTooLarge.code
    body: dict[str, Any] = {
        "type": "update",
        "request_id": rid,
        "entity": "counter",
        "id": row,
        "attributes": {"n": 1},
    }
    code = InvalidArgument.code
    if kind == "wrong-type":
        body["attributes"] = {"n": "lots"}
    elif kind == "bad-id":
        body["id"] = 1.5
    elif kind == "unknown-entity":
        body["entity"] = "no_such_entity"
        key = record_key("no_such_entity", row)
        code = EntityNotFound.code
    else:
        body["attributes"] = {"no_such_column": 1}
        code = -2147217149  # QueryBuilderNoAttribute
    return kind, msgspec.json.encode(body), key, [], rid, code


class Load:
    """Virtual clients sharing one Client; everything they did goes to ``history``."""

    def __init__(
        self,
        cfg: Config,
        client: Client,
        hostile_producer: Any,
        request_topic: str,
        stale: dict[int, str],
        history: ClientHistory,
    ) -> None:
        self.cfg = cfg
        self.client = client
        self.producer = hostile_producer
        self.request_topic = request_topic
        self.stale = stale
        self.history = history
        self.rng = random.Random(cfg.seed)
        self.rows = sorted(history.initial)
        self.weights = list(accumulate(zipf_weights(len(self.rows), cfg.skew)))
        self.delete_queue = list(history.delete_ids)
        self.rng.shuffle(self.delete_queue)
        self.running = True
        self.give_up_at = math.inf
        self.t0 = time.monotonic()
        self.ops: Counter[str] = Counter()
        self.sends = 0
        self.resends = 0
        self.replies = 0
        self.conflicts = 0
        self.hostile_unknown = 0
        self.client_errors: Counter[str] = Counter()
        self.request_ids: set[str] = set()
        self.per_second: Counter[int] = Counter()  # replies per second since t0
        self._watch: dict[int, float] | None = None
        self._watch_since = 0.0
        self._complete = asyncio.Event()
        client.observer = self._observe

    # -- bookkeeping ---------------------------------------------------------------------

    def _observe(self, request: Request, reply: Reply | None, _elapsed: float) -> None:
        self.sends += 1
        self.request_ids.add(request.request_id)
        if reply is None:
            return
        now = time.monotonic()
        self.replies += 1
        self.per_second[int(now - self.t0)] += 1
        if self._watch is not None and now >= self._watch_since:
            partition = self.partition_of(request_key(request))
            self._watch.setdefault(partition, now)
            if len(self._watch) >= self.cfg.partitions:
                self._complete.set()

    def partition_of(self, key: bytes) -> int:
        return int(murmur2(key) & 0x7FFFFFFF) % self.cfg.partitions

    def watch(self, since: float) -> None:
        """Start noting the first reply per partition at or after ``since``."""
        self._watch, self._watch_since = {}, since
        self._complete = asyncio.Event()

    def recovered_at(self) -> float | None:
        """When every partition had delivered a reply since ``watch`` (None: not yet)."""
        if self._watch is None or len(self._watch) < self.cfg.partitions:
            return None
        return max(self._watch.values())

    async def wait_recovered(self, limit: float) -> float | None:
        """``recovered_at``, once known, or None after ``limit`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._complete.wait(), limit)
        return self.recovered_at()

    def rate(self, start: float, end: float) -> float:
        """Replies per second between two monotonic times (whole seconds)."""
        first, last = int(start - self.t0), int(end - self.t0)
        if last <= first:
            return 0.0
        return sum(self.per_second[s] for s in range(first, last)) / (last - first)

    # -- requests --------------------------------------------------------------------------

    async def send(self, request: Request) -> Reply | None:
        """Send until a reply comes (the same request_id each time), or the run gives up."""
        first = True
        while True:
            if not first:
                self.resends += 1
            first = False
            try:
                return await self.client.send(request, timeout=self.cfg.reply_timeout)
            except ReplyTimeout:
                pass
            except (TransientError, KafkaError):
                await asyncio.sleep(1.0)  # Kafka refused it (down?): the same again soon
            except ProcessorError as exc:  # the client broke: the outcome is unknown
                self.client_errors[type(exc).__name__] += 1
                await asyncio.sleep(1.0)
            if time.monotonic() > self.give_up_at:
                self.history.unsettled.append(request.request_id)
                return None

    def _row(self) -> int:
        import bisect

        at = bisect.bisect_right(self.weights, self.rng.random() * self.weights[-1])
        return self.rows[min(at, len(self.rows) - 1)]

    async def increment(self, row: int) -> str:
        for attempt in range(20):
            current = await self.send(
                RetrieveRequest(request_id=new_request_id(), entity="counter", id=row)
            )
            if current is None:
                return "unsettled-retrieve"
            if current.status != "success" or current.attributes is None:
                return f"retrieve-fault-{current.fault.name if current.fault else '?'}"
            update = UpdateRequest(
                request_id=new_request_id(),
                entity="counter",
                id=row,
                attributes={"n": int(current.attributes["n"]) + 1},
                row_version=current.row_version,
                concurrency_behavior="IfRowVersionMatches",
            )
            reply = await self.send(update)
            if reply is None:
                self.history.unknown[row] += 1
                return "unknown"
            if reply.status == "success":
                self.history.acked[row] += 1
                return "ok"
            if reply.fault is None or reply.fault.code != MISMATCH:
                return f"fault-{reply.fault.name if reply.fault else '?'}"
            self.conflicts += 1
            await asyncio.sleep(self.rng.uniform(0, min(1.0, 0.01 * 2**attempt)))
        return "gave-up"

    async def stale_update(self, row: int) -> str:
        request = UpdateRequest(
            request_id=new_request_id(),
            entity="counter",
            id=row,
            attributes={"n": POISON},
            row_version=self.stale[row],
            concurrency_behavior="IfRowVersionMatches",
        )
        reply = await self.send(request)
        if reply is None:
            return "unsettled"
        if reply.status == "success":
            self.history.stale_accepted.append(request.request_id)
            return "ACCEPTED"
        return "rejected" if reply.fault and reply.fault.code == MISMATCH else "other-fault"

    async def delete(self) -> str:
        if self.delete_queue:
            row = self.delete_queue.pop()
        else:
            row = self.rng.choice(self.history.delete_ids)  # gone already: ObjectDoesNotExist
        reply = await self.send(
            DeleteRequest(
                request_id=new_request_id(),
                entity="counter",
                id=row,
                concurrency_behavior="AlwaysOverwrite",
            )
        )
        if reply is None:
            self.history.delete_unknown.add(row)
            return "unknown"
        if reply.status == "success":
            self.history.deleted.add(row)
            return "ok"
        code = reply.fault.code if reply.fault else None
        return "missing" if code == ObjectDoesNotExist.code else "other-fault"

    async def hostile(self) -> str:
        kind, value, key, headers, rid, code = hostile_record(self.rng, self._row())
        try:
            meta = await asyncio.wait_for(
                self.producer.send_and_wait(self.request_topic, value, key=key, headers=headers),
                self.cfg.reply_timeout,
            )
        except (KafkaError, TimeoutError):
            self.hostile_unknown += 1  # maybe written, maybe not: the audit still covers it
            return "unknown"
        self.history.hostile.append(Hostile(kind, meta.partition, meta.offset, rid, code))
        return kind

    async def virtual_client(self) -> None:
        cfg = self.cfg
        while self.running:
            draw = self.rng.random()
            if draw < cfg.hostile_share:
                kind, work = "hostile", self.hostile()
            elif draw < cfg.hostile_share + cfg.delete_share:
                kind, work = "delete", self.delete()
            elif draw < cfg.hostile_share + cfg.delete_share + cfg.stale_share:
                kind, work = "stale", self.stale_update(self._row())
            else:
                kind, work = "increment", self.increment(self._row())
            try:
                outcome = await work
            except ProcessorError as exc:  # the client itself broke: count it, go on
                outcome = f"error-{type(exc).__name__}"
                await asyncio.sleep(1.0)
            self.ops[f"{kind}.{outcome}"] += 1
