"""The faults: what each one does, and the record of when it struck and healed."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
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
from processor import kafka


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


class Chaos:
    """Injects the faults and waits for the recovery of each."""

    def __init__(
        self,
        cfg: Config,
        stack: PrivateStack,
        workers: Workers,
        proxy: Proxy,
        load: Load,
    ) -> None:
        self.cfg = cfg
        self.stack = stack
        self.workers = workers
        self.proxy = proxy
        self.load = load
        self.rng = random.Random(cfg.seed + 1)
        self.records: list[FaultRecord] = []
        self.current = "warm-up"
        self.remove_codes: list[int] = []
        self._zombie: tuple[int, float, float] | None = None  # (worker, fenced, assignments)
        self.overlaps = 0

    def now(self) -> float:
        return time.monotonic() - self.load.t0

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

    async def _act(self, kind: str) -> str:
        """Inject one fault and heal it; what was done, in words."""
        detail = ""
        if kind == "worker-kill9":
            n = self._pick()
            self.workers.kill9(n)
            m = self.workers.start(self.workers.ids[n])
            detail = (
                f"worker {n} killed -9, restarted as worker {m} (same id)" + await self._joined(m)
            )
        elif kind == "worker-zombie":
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
            detail = f"worker {n} SIGSTOP for {pause:.1f}s, then SIGCONT"
        elif kind == "worker-add":
            m = self.workers.start()
            detail = f"worker {m} started ({len(self.workers.live())} live)" + await self._joined(m)
        elif kind == "worker-remove":
            if len(self.workers.live()) <= 1:
                m = self.workers.start()
                detail = f"only one worker: worker {m} started first; "
                await asyncio.sleep(5)
            n = self._pick()
            code = await self._blocking(lambda: self.workers.terminate(n))
            self.remove_codes.append(code)
            detail += f"worker {n} SIGTERM, exited {code}"
        elif kind == "kafka-kill9":
            down = self._hold(2.0, 1.0, 8.0)
            await self._blocking(lambda: self.stack.stop("kafka", immediate=True))
            await asyncio.sleep(down)
            await self._blocking(self.stack.up)
            detail = f"broker SIGKILL, restarted after {down:.1f}s"
        elif kind in ("postgres-immediate", "postgres-fast"):
            immediate = kind == "postgres-immediate"
            down = self._hold(2.0, 1.0, 8.0)
            await self._blocking(lambda: self.stack.stop("postgres", immediate=immediate))
            await asyncio.sleep(down)
            await self._blocking(self.stack.up)
            detail = (
                f"pg_ctl stop -m {'immediate' if immediate else 'fast'}, started after {down:.1f}s"
            )
        elif kind == "net-latency":
            delay = self._hold(0.1, 0.02, 0.3)
            hold = self._hold(6.0, 4.0, 15.0)
            self.proxy.set_latency(delay)
            await asyncio.sleep(hold)
            self.proxy.set_latency(0.0)
            detail = f"{delay * 1000:.0f} ms per chunk for {hold:.1f}s"
        elif kind == "net-reset":
            share = self._hold(0.3, 0.1, 0.5)
            hold = self._hold(6.0, 4.0, 15.0)
            before = self.proxy.resets
            self.proxy.set_reset(share)
            await asyncio.sleep(hold)
            self.proxy.set_reset(0.0)
            detail = f"{share:.0%} per second for {hold:.1f}s: {self.proxy.resets - before} resets"
        elif kind == "net-partition":
            hold = self._hold(6.0, 3.0, 20.0)
            self.proxy.set_partition(True)
            await asyncio.sleep(hold)
            self.proxy.set_partition(False)
            detail = f"workers <-/-> database for {hold:.1f}s"
        elif kind == "broker-leader-kill9":
            node, led = await self._busiest_leader()
            down = self._hold(2.0, 1.0, 8.0)
            await self._blocking(lambda: self.stack.stop(f"kafka-{node}", immediate=True))
            await asyncio.sleep(down)
            await self._blocking(self.stack.up)
            detail = f"kafka-{node} (leader of {led}) SIGKILL, restarted after {down:.1f}s"
        elif kind == "broker-pause":
            node, led = await self._busiest_leader()
            hold = self._hold(6.0, 4.0, 15.0)
            pid = int(self.stack.status()["nodes"][f"kafka-{node}"]["pid"])
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(hold)
            finally:
                os.kill(pid, signal.SIGCONT)
            detail = f"kafka-{node} (leader of {led}) SIGSTOP for {hold:.1f}s, then SIGCONT"
        elif kind == "kafka-net-latency":
            delay = self._hold(0.1, 0.02, 0.3)
            hold = self._hold(6.0, 4.0, 15.0)
            self.proxy.set_latency(delay)
            await asyncio.sleep(hold)
            self.proxy.set_latency(0.0)
            detail = (
                f"workers <-> kafka-{ROUTED_NODE}: {delay * 1000:.0f} ms per chunk for {hold:.1f}s"
            )
        elif kind == "kafka-net-reset":
            share = self._hold(0.3, 0.1, 0.5)
            hold = self._hold(6.0, 4.0, 15.0)
            before = self.proxy.resets
            self.proxy.set_reset(share)
            await asyncio.sleep(hold)
            self.proxy.set_reset(0.0)
            detail = (
                f"workers <-> kafka-{ROUTED_NODE}: {share:.0%} per second for {hold:.1f}s: "
                f"{self.proxy.resets - before} resets"
            )
        elif kind == "kafka-net-partition":
            hold = self._hold(6.0, 3.0, 20.0)
            self.proxy.set_partition(True)
            await asyncio.sleep(hold)
            self.proxy.set_partition(False)
            detail = f"workers <-/-> kafka-{ROUTED_NODE} for {hold:.1f}s"
        elif kind == "postgres-failover":
            before = self.stack.status()["primary"]
            took = time.monotonic()
            await self._blocking(lambda: self.stack.run("failover"))
            took = time.monotonic() - took
            after = self.stack.status()["primary"]
            detail = (
                f"{before} (primary) SIGKILL, {after} promoted, {before} rebuilt as the "
                f"standby (pg_basebackup), {took:.1f}s"
            )
        elif kind == "overlap":
            first, second = (
                OVERLAPS[self.overlaps % len(OVERLAPS)]
                if self.cfg.short
                else self.rng.choice(OVERLAPS)
            )
            self.overlaps += 1
            lag = self._hold(1.0, 0.5, 4.0)

            async def later() -> str:
                await asyncio.sleep(lag)
                return await self._act(second)

            one, two = await asyncio.gather(self._act(first), later())
            detail = f"{first} [{one}] and, {lag:.1f}s later, {second} [{two}]"
        else:
            raise AssertionError(kind)
        return detail

    def _take_zombie(self) -> tuple[int, float, float] | None:
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
                    admin.describe_topics([self.load.request_topic]), kafka.CALL_TIMEOUT
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

    async def inject(self, kind: str) -> FaultRecord:
        self.current = kind
        started = self.now()
        detail = await self._act(kind)
        zombie_seen = self._take_zombie()
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
