"""The faults: what each one does, and the record of when it struck and healed."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiokafka.errors import KafkaError

from ops.lib.chaos.config import (
    CLUSTER_SHORT_ORDER,
    OVERLAPS,
    ROUTED_NODE,
    SESSION_TIMEOUT,
    SHORT_ORDER,
    Config,
    SetupError,
    say,
)
from ops.lib.chaos.load import Load
from ops.lib.chaos.private_stack import PrivateStack
from ops.lib.chaos.proxy import Proxy
from ops.lib.chaos.workers import Workers
from processor.kafka import clients as kafka


@dataclass(slots=True)
class FaultRecord:
    kind: str
    started: float  # seconds since the load started
    healed: float
    recovered: float | None = None  # None: not within the recovery limit
    detail: str = ""

    @property
    def recovery(self) -> float | None:
        return None if self.recovered is None else max(0.0, self.recovered - self.healed)

    @property
    def disruption(self) -> float | None:
        return None if self.recovered is None else max(0.0, self.recovered - self.started)


class Faults:
    """What each fault does: inject it, heal it, and say what was done.

    Every draw (which worker, how long) comes from ``rng``, the run's seeded generator of
    faults, in the order the faults happen: a seed replays the same faults.
    """

    def __init__(
        self,
        cfg: Config,
        stack: PrivateStack,
        workers: Workers,
        proxy: Proxy,
        request_topic: str,
    ) -> None:
        self.cfg = cfg
        self.stack = stack
        self.workers = workers
        self.proxy = proxy
        self.request_topic = request_topic
        self.rng = random.Random(cfg.seed + 1)
        self.remove_codes: list[int] = []
        self._zombie: tuple[int, float, float] | None = None  # (worker, fenced, assignments)
        self.overlaps = 0
        kafka_link = f"workers <-> kafka-{ROUTED_NODE}: "
        self._acts: dict[str, Callable[[], Awaitable[str]]] = {
            "worker-kill9": self._worker_kill9,
            "worker-zombie": self._worker_zombie,
            "worker-add": self._worker_add,
            "worker-remove": self._worker_remove,
            "kafka-kill9": self._kafka_kill9,
            "postgres-immediate": lambda: self._postgres_stop(immediate=True),
            "postgres-fast": lambda: self._postgres_stop(immediate=False),
            "net-latency": lambda: self._latency(""),
            "net-reset": lambda: self._resets(""),
            "net-partition": lambda: self._partition("database"),
            "broker-leader-kill9": self._broker_leader_kill9,
            "broker-pause": self._broker_pause,
            "kafka-net-latency": lambda: self._latency(kafka_link),
            "kafka-net-reset": lambda: self._resets(kafka_link),
            "kafka-net-partition": lambda: self._partition(f"kafka-{ROUTED_NODE}"),
            "postgres-failover": self._postgres_failover,
            "overlap": self._overlap,
        }

    async def act(self, kind: str) -> str:
        """Inject one fault and heal it; what was done, in words."""
        act = self._acts.get(kind)
        if act is None:
            raise AssertionError(kind)
        return await act()

    async def _blocking(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.to_thread(fn)

    def _pick(self) -> int:
        live = self.workers.live()
        if not live:
            raise SetupError("no live worker left to inject a fault into")
        return self.rng.choice(live)

    async def _joined(self, number: int, limit: float = 90.0) -> str:
        """Wait until a new worker got its partitions (the rebalance it caused is done)."""
        started = time.monotonic()
        for _ in range(int(limit / 0.2)):
            if self.workers.assigned(number):
                return f", assigned after {time.monotonic() - started:.1f}s"
            await asyncio.sleep(0.2)
        return f", NOT assigned within {limit:.0f}s"

    def _hold(self, short: float, low: float, high: float) -> float:
        return short if self.cfg.short else self.rng.uniform(low, high)

    async def _worker_kill9(self) -> str:
        n = self._pick()
        self.workers.kill9(n)
        m = self.workers.start(self.workers.ids[n])
        return f"worker {n} killed -9, restarted as worker {m} (same id)" + await self._joined(m)

    async def _worker_zombie(self) -> str:
        n = self._pick()
        pause = self._hold(SESSION_TIMEOUT + 3, SESSION_TIMEOUT + 2, SESSION_TIMEOUT + 10)
        self._zombie = (
            n,
            self.workers.metric(n, "processor_fenced_total") or 0.0,
            self.workers.metric(n, "processor_assignments_total") or 0.0,
        )
        self.workers.pause(n)
        await asyncio.sleep(pause)
        self.workers.resume(n)
        return f"worker {n} SIGSTOP for {pause:.1f}s, then SIGCONT"

    async def _worker_add(self) -> str:
        m = self.workers.start()
        return f"worker {m} started ({len(self.workers.live())} live)" + await self._joined(m)

    async def _worker_remove(self) -> str:
        detail = ""
        if len(self.workers.live()) <= 1:
            m = self.workers.start()
            detail = f"only one worker: worker {m} started first; "
            await asyncio.sleep(5)
        n = self._pick()
        code = await self._blocking(lambda: self.workers.terminate(n))
        self.remove_codes.append(code)
        return detail + f"worker {n} SIGTERM, exited {code}"

    async def _down_a_while(self, service: str, *, immediate: bool) -> float:
        """Stop ``service`` of the stack, and ``ops/stack up`` after a drawn while; the while."""
        down = self._hold(2.0, 1.0, 8.0)
        await self._blocking(lambda: self.stack.stop(service, immediate=immediate))
        await asyncio.sleep(down)
        await self._blocking(self.stack.up)
        return down

    async def _kafka_kill9(self) -> str:
        down = await self._down_a_while("kafka", immediate=True)
        return f"broker SIGKILL, restarted after {down:.1f}s"

    async def _postgres_stop(self, *, immediate: bool) -> str:
        down = await self._down_a_while("postgres", immediate=immediate)
        return f"pg_ctl stop -m {'immediate' if immediate else 'fast'}, started after {down:.1f}s"

    async def _broker_leader_kill9(self) -> str:
        node, led = await self._busiest_leader()
        down = await self._down_a_while(f"kafka-{node}", immediate=True)
        return f"kafka-{node} (leader of {led}) SIGKILL, restarted after {down:.1f}s"

    async def _broker_pause(self) -> str:
        node, led = await self._busiest_leader()
        hold = self._hold(6.0, 4.0, 15.0)
        pid = int(self.stack.status()["nodes"][f"kafka-{node}"]["pid"])
        await self._held(hold, lambda: os.kill(pid, signal.SIGSTOP), os.kill, pid, signal.SIGCONT)
        return f"kafka-{node} (leader of {led}) SIGSTOP for {hold:.1f}s, then SIGCONT"

    async def _held(
        self, hold: float, strike: Callable[[], object], heal: Callable[..., object], *args: Any
    ) -> None:
        """``strike()``, ``hold`` seconds, then ``heal(*args)`` (also when cancelled: a run
        that stops mid-fault leaves no proxy cut and no broker stopped)."""
        strike()
        try:
            await asyncio.sleep(hold)
        finally:
            heal(*args)

    # The proxy's faults: the one proxy stands in front of PostgreSQL, or of a Kafka node in
    # the cluster form; ``link`` says which in the detail.

    async def _latency(self, link: str) -> str:
        delay = self._hold(0.1, 0.02, 0.3)
        hold = self._hold(6.0, 4.0, 15.0)
        await self._held(hold, lambda: self.proxy.set_latency(delay), self.proxy.set_latency, 0.0)
        return f"{link}{delay * 1000:.0f} ms per chunk for {hold:.1f}s"

    async def _resets(self, link: str) -> str:
        share = self._hold(0.3, 0.1, 0.5)
        hold = self._hold(6.0, 4.0, 15.0)
        before = self.proxy.resets
        await self._held(hold, lambda: self.proxy.set_reset(share), self.proxy.set_reset, 0.0)
        return f"{link}{share:.0%} per second for {hold:.1f}s: {self.proxy.resets - before} resets"

    async def _partition(self, peer: str) -> str:
        hold = self._hold(6.0, 3.0, 20.0)
        await self._held(
            hold, lambda: self.proxy.set_partition(True), self.proxy.set_partition, False
        )
        return f"workers <-/-> {peer} for {hold:.1f}s"

    async def _postgres_failover(self) -> str:
        before = self.stack.status()["primary"]
        took = time.monotonic()
        await self._blocking(lambda: self.stack.run("failover"))
        took = time.monotonic() - took
        after = self.stack.status()["primary"]
        return (
            f"{before} (primary) SIGKILL, {after} promoted, {before} rebuilt as the "
            f"standby (pg_basebackup), {took:.1f}s"
        )

    async def _overlap(self) -> str:
        first, second = (
            OVERLAPS[self.overlaps % len(OVERLAPS)] if self.cfg.short else self.rng.choice(OVERLAPS)
        )
        self.overlaps += 1
        lag = self._hold(1.0, 0.5, 4.0)

        async def later() -> str:
            await asyncio.sleep(lag)
            return await self.act(second)

        one, two = await asyncio.gather(self.act(first), later())
        return f"{first} [{one}] and, {lag:.1f}s later, {second} [{two}]"

    def take_zombie(self) -> tuple[int, float, float] | None:
        """The zombie the last fault made (worker, fenced and assignments before), once."""
        zombie, self._zombie = self._zombie, None
        return zombie

    async def _busiest_leader(self) -> tuple[int, str]:
        """The broker leading the most partitions of the request topic (ties: drawn), and
        what it leads; a drawn broker if the metadata cannot be read."""
        admin = kafka.admin_client(kafka.KafkaAccess(self.stack.bootstrap))
        try:
            await asyncio.wait_for(admin.start(), kafka.CALL_TIMEOUT)
            try:
                topics = await asyncio.wait_for(
                    admin.describe_topics([self.request_topic]), kafka.CALL_TIMEOUT
                )
            finally:
                await admin.close()
            leaders = Counter(p["leader"] for p in topics[0]["partitions"] if p["leader"] > 0)
        except (KafkaError, OSError, TimeoutError, LookupError):
            leaders = Counter()
        if not leaders:
            return self.rng.randint(1, 3), "unknown partitions"
        most = max(leaders.values())
        node = self.rng.choice(sorted(n for n, c in leaders.items() if c == most))
        return int(node), f"{most} request partition{'s' if most > 1 else ''}"


class Chaos:
    """Injects the faults in their order and waits for the recovery of each."""

    def __init__(self, faults: Faults, load: Load) -> None:
        self.faults = faults
        self.cfg = faults.cfg
        self.workers = faults.workers
        self.rng = faults.rng  # the schedule draws from the faults' generator, as they do
        self.load = load
        self.records: list[FaultRecord] = []
        self.current = "warm-up"

    def now(self) -> float:
        return time.monotonic() - self.load.t0

    async def inject(self, kind: str) -> FaultRecord:
        self.current = kind
        started = self.now()
        detail = await self.faults.act(kind)
        zombie_seen = self.faults.take_zombie()
        healed = self.now()
        record = FaultRecord(kind, started, healed, detail=detail)
        self.records.append(record)
        self.load.watch(self.load.t0 + healed)
        at = await self.load.wait_recovered(self.cfg.recovery_limit)
        record.recovered = None if at is None else at - self.load.t0
        if zombie_seen is not None:  # what the woken zombie met: fencing, a rebalance
            zombie, fenced, assignments = zombie_seen
            fenced_after = self.workers.metric(zombie, "processor_fenced_total")
            assignments_after = self.workers.metric(zombie, "processor_assignments_total")
            if fenced_after is not None and assignments_after is not None:
                record.detail += (
                    f"; the zombie then counted {fenced_after - fenced:.0f} fenced batch(es) "
                    f"and {assignments_after - assignments:.0f} new assignment(s)"
                )
        rec = (
            f"recovered in {record.recovery:.1f}s"
            if record.recovery is not None
            else (f"NOT recovered within {self.cfg.recovery_limit:.0f}s")
        )
        say(f"fault {len(self.records)} {kind}: {record.detail}; {rec}")
        self.current = "-"
        return record

    async def run(self, until: float) -> None:
        if self.cfg.short:
            for kind in CLUSTER_SHORT_ORDER if self.cfg.cluster else SHORT_ORDER:
                await self.inject(kind)
                await asyncio.sleep(2.0)
            return
        while True:
            order = list(self.cfg.kinds)
            self.rng.shuffle(order)
            for kind in order:
                if time.monotonic() >= until:
                    return
                await self.inject(kind)
                await asyncio.sleep(self.rng.uniform(3.0, 10.0))
