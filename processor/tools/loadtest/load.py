"""The load itself: virtual clients running increments, stale updates and deletes."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from processor.client import Client
from processor.contract import Reply, Request, UpdateRequest
from processor.db.registry import Entity
from processor.errors import (
    ConcurrencyVersionMismatch,
    Fault,
    ObjectDoesNotExist,
    ProcessorError,
    ReplyTimeout,
)
from processor.tools.loadtest.model import POISON, LoadOptions, Observations
from processor.tools.stats import percentile, zipf_weights


class LoadRun:
    """One load run: the operation mix, its bookkeeping and the progress line."""

    def __init__(self, client: Client, entity: Entity, opts: LoadOptions, stale: dict[int, str]):
        self.client = client
        self.entity = entity
        self.opts = opts
        self.stale = stale
        self.rng = random.Random(opts.seed)
        self.counter_ids = list(range(opts.first_id, opts.first_id + opts.rows))
        start = opts.first_id + opts.rows
        self.delete_ids = list(range(start, start + opts.delete_rows))
        self.cum_weights = list(_accumulate(zipf_weights(opts.rows, opts.skew)))
        self.next_delete = 0
        self.seen = Observations()
        self.outcomes: Counter[str] = Counter()
        self.conflicts = 0
        self.conflict_times: list[float] = []
        self.started_at = datetime.now(UTC)
        self.loadavg = [round(x, 2) for x in os.getloadavg()]
        self.ops: list[tuple[float, float, str, str]] = []  # (end s, latency s, kind, outcome)
        self.requests: list[tuple[float, float]] = []  # (end s, latency s)
        self.recording = False
        self.t0 = time.monotonic()
        self.errors_logged = 0

    def observe(self, request: Request, reply: Reply | None, elapsed: float) -> None:
        if not self.recording:
            return
        rid = request.request_id
        self.seen.sent[rid] += 1
        if reply is not None:
            self.seen.replied.add(rid)
            self.requests.append((time.monotonic() - self.t0, elapsed))

    def _row(self) -> int:
        total = self.cum_weights[-1]
        index = bisect.bisect_right(self.cum_weights, self.rng.random() * total)
        return self.counter_ids[min(index, len(self.counter_ids) - 1)]

    async def op(self, scheduled: float) -> None:
        draw = self.rng.random()
        if draw < self.opts.delete_share:
            kind, work = "delete", self._delete()
        elif draw < self.opts.delete_share + self.opts.stale_share:
            kind, work = "stale", self._stale(self._row())
        else:
            kind, work = "increment", self._increment(self._row())
        try:
            outcome = await work
        except Fault as exc:
            outcome = f"fault.{exc.name}"
        except ProcessorError as exc:
            outcome = f"error.{type(exc).__name__}"
            self._log_error(exc)
        end = time.monotonic()
        self.ops.append((end - self.t0, end - scheduled, kind, outcome))
        self.outcomes[f"{kind}.{outcome}"] += 1

    def _log_error(self, exc: BaseException) -> None:
        self.errors_logged += 1
        if self.errors_logged <= 5:
            print(f"\nloadtest: {exc!r}", file=sys.stderr)

    def _conflict(self, _exc: ConcurrencyVersionMismatch) -> None:
        self.conflicts += 1
        self.conflict_times.append(time.monotonic() - self.t0)

    async def _settle(self, request: Request) -> Reply | None:
        """Resend a timed-out request as is (same request_id): the ledger answers it."""
        for _ in range(3):
            with contextlib.suppress(ReplyTimeout):
                return await self.client.send(request, timeout=max(30.0, self.opts.timeout))
        self.seen.unsettled += 1
        return None

    async def _increment(self, row: int) -> str:
        try:
            await self.client.read_modify_write(
                self.entity.name,
                row,
                _plus_one,
                attempts=self.opts.attempts,
                backoff=self.opts.backoff,
                on_conflict=self._conflict,
            )
        except ConcurrencyVersionMismatch:
            return "gave_up"
        except ReplyTimeout as exc:
            reply = await self._settle(exc.request)  # a retrieve too: every request answered
            if reply is None:
                return "unsettled"
            if not isinstance(exc.request, UpdateRequest) or reply.status != "success":
                return "timeout"  # nothing written (a retrieve, or the update faulted)
            self.seen.increments[row] += 1
            return "ok_after_timeout"
        self.seen.increments[row] += 1
        return "ok"

    async def _stale(self, row: int) -> str:
        try:
            await self.client.update(
                self.entity.name,
                row,
                {"n": POISON},
                row_version=self.stale[row],
                behavior="IfRowVersionMatches",
            )
        except ConcurrencyVersionMismatch:
            return "rejected"
        except ReplyTimeout as exc:
            reply = await self._settle(exc.request)
            if reply is None:
                return "unsettled"
            if reply.fault is not None and reply.fault.code == ConcurrencyVersionMismatch.code:
                return "rejected"
        self.seen.stale_accepted += 1
        return "ACCEPTED"

    async def _delete(self) -> str:
        if self.next_delete < len(self.delete_ids):
            row = self.delete_ids[self.next_delete]
            self.next_delete += 1
        else:  # the range ran out: a row deleted before, expected to be gone
            row = self.rng.choice(self.delete_ids)
        try:
            await self.client.delete(self.entity.name, row, behavior="AlwaysOverwrite")
        except ObjectDoesNotExist:
            return "missing"
        except ReplyTimeout as exc:
            reply = await self._settle(exc.request)
            if reply is None:
                return "unsettled"
            if reply.status != "success":
                return "missing"
        self.seen.deleted.add(row)
        return "ok"

    async def closed_loop(self, deadline: float) -> None:
        async def virtual_client() -> None:
            while time.monotonic() < deadline:
                await self.op(time.monotonic())

        await asyncio.gather(*(virtual_client() for _ in range(self.opts.clients)))

    async def open_loop(self, deadline: float) -> None:
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        i = 0
        while (at := start + i / self.opts.rate) < deadline:
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(tasks) >= self.opts.max_in_flight:
                self.outcomes["dropped"] += 1  # never started: the system is saturated
            else:
                task = asyncio.create_task(self.op(at))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.gather(*tasks)

    async def progress(self, started: float, stop: asyncio.Event) -> None:
        tty = sys.stderr.isatty()
        width = 30
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5 if tty else 5.0)
            elapsed = time.monotonic() - started
            done = min(1.0, elapsed / self.opts.duration)
            recent = [lat for end, lat, _, _ in self.ops[-2000:] if end > elapsed - 5]
            p50 = percentile(recent, 50) * 1000 if recent else math.nan
            bar = "#" * int(done * width) + "." * (width - int(done * width))
            line = (
                f"[{bar}] {elapsed:5.1f}/{self.opts.duration:g}s ops {len(self.ops)} "
                f"({len(self.ops) / max(elapsed, 1e-9):.0f}/s) p50 {p50:.1f}ms "
                f"conflicts {self.conflicts} in-flight {self.client.pending}"
            )
            print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr)
        if tty:
            print(file=sys.stderr)


def _accumulate(weights: Sequence[float]) -> list[float]:
    out, total = [], 0.0
    for w in weights:
        total += w
        out.append(total)
    return out


def _plus_one(attributes: dict[str, Any]) -> dict[str, Any]:
    return {"n": int(attributes["n"]) + 1}
