"""The compare-and-set engine: a batch of requests in one transaction, one outcome each.

How a batch runs (``Engine.process``):

1. The ledger is read for every request_id at once. A request seen before gets its stored
   reply and applies nothing; the same id with another payload faults (DuplicateRecord).
2. Every new request is checked without the database: expiry, entity, attributes and
   their types, then Dataverse's order: IfRowVersionMatches needs optimistic concurrency
   on the entity, then a row_version.
3. Requests are put in *rounds*: a round touches each row at most once, and a row's
   requests keep their order across rounds. Round k > 0 runs inside its own savepoint, so
   its writes carry their own (sub)transaction id: no two writes ever hand out the same
   xmin token (the xmin hazard), while the batch still commits once.
4. Per round and entity: one ``SELECT ... FOR UPDATE`` reads the current versions, the
   checks (exists, version matches) run in Python, one ``UPDATE ... FROM unnest`` and
   one ``DELETE`` apply the winners. All-or-nothing for related rows falls out: a request
   is applied only if all its rows pass.
5. One INSERT writes every outcome to the ledger, in the same transaction.

If any statement fails on a value (a constraint, an overflow), the transaction is rolled
back and the batch redone with each request in its own savepoint, so only the guilty
request faults. Service failures raise :class:`TransientError`: the caller retries the
whole batch, which is safe because nothing of it committed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Final

import asyncpg

from processor.contract import ROW_REQUEST_TYPES, Behavior, Request, decode_reply
from processor.db import Connection, is_data_error, is_transient
from processor.db.errors import as_transient
from processor.db.ledger import Ledger
from processor.db.registry import Registry
from processor.db.statements import EntityStatements
from processor.engine.checks import (
    Row,
    _Batch,
    _check_versions,
    _DataError,
    _Job,
    _json_encoder,
    _rounds,
    _Target,
    prepare,
    resolved_behavior,
    round_numbers,
    rows_of,
)
from processor.engine.envelope import Envelope, Outcome, Source
from processor.engine.outcomes import (
    duplicate,
    fault_outcome,
    fault_reply,
    replayed,
    success_outcome,
)
from processor.errors import Fault, InvalidArgument, UnexpectedError

__all__ = [
    "Engine",
    "Envelope",
    "Outcome",
    "Row",
    "Source",
    "is_transient",
    "round_numbers",
    "rows_of",
]

#: Rounds per transaction: each round after the first is a subtransaction, and
#: PostgreSQL caches only 64 subtransaction ids per backend before snapshots get slow.
MAX_ROUNDS: Final = 32


class Engine:
    """Applies batches of requests with Dataverse's optimistic-concurrency semantics."""

    def __init__(
        self,
        registry: Registry,
        ledger: Ledger,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        max_rounds: int = MAX_ROUNDS,
    ) -> None:
        self.registry = registry
        self.ledger = ledger
        self._clock = clock
        self._max_rounds = max_rounds
        self._sql = {name: EntityStatements.build(e) for name, e in registry.entities.items()}

    async def process(self, conn: Connection, envelopes: Sequence[Envelope]) -> list[Outcome]:
        """Apply ``envelopes`` in order; one outcome per envelope, in the same order.

        Commits once per chunk of at most ``max_rounds`` rounds (usually once). Raises
        :class:`TransientError` when the database fails; nothing of the failed chunk
        is committed then, and calling again with the same envelopes is safe.
        """
        if not all(isinstance(e.request, ROW_REQUEST_TYPES) for e in envelopes):
            from processor.engine.batches import process_mixed  # built on this module's steps

            return await process_mixed(self, conn, envelopes)
        outcomes: list[Outcome] = []
        for chunk in self._chunks(envelopes):
            with as_transient():
                outcomes.extend(await self._process_chunk(conn, chunk))
        return outcomes

    def _chunks(self, envelopes: Sequence[Envelope]) -> list[Sequence[Envelope]]:
        """Split where a row would need more than ``max_rounds`` rounds in one transaction."""
        chunks: list[Sequence[Envelope]] = []
        start = 0
        while start < len(envelopes):
            rest = envelopes[start:]
            numbers = round_numbers([rows_of(self.registry, e.request) for e in rest])
            end = next((i for i, n in enumerate(numbers) if n >= self._max_rounds), len(rest))
            chunks.append(rest[:end])
            start += end
        return chunks

    async def _process_chunk(
        self, conn: Connection, envelopes: Sequence[Envelope]
    ) -> list[Outcome]:
        try:
            async with conn.transaction():
                return await self._run(conn, envelopes, isolate=False)
        except _DataError:
            async with conn.transaction():
                return await self._run(conn, envelopes, isolate=True)

    async def _run(
        self, conn: Connection, envelopes: Sequence[Envelope], *, isolate: bool
    ) -> list[Outcome]:
        batch = _Batch(now=self._clock(), outcomes=[None] * len(envelopes))
        stored = await self.ledger.lookup(conn, list({e.request.request_id for e in envelopes}))
        first_seen: dict[str, int] = {}
        for i, env in enumerate(envelopes):
            rid = env.request.request_id
            previous = stored.get(rid)
            if previous is not None:
                if previous.fingerprint == env.fingerprint:
                    batch.outcomes[i] = replayed(decode_reply(previous.reply), previous.reply)
                else:
                    batch.outcomes[i] = duplicate(env, batch.now)
                continue
            if rid in first_seen:
                j = first_seen[rid]
                if envelopes[j].fingerprint == env.fingerprint:
                    batch.echoes[i] = j
                else:
                    batch.outcomes[i] = duplicate(env, batch.now)
                continue
            first_seen[rid] = i
            try:
                batch.jobs.append(self._prepare(i, env, batch.now))
            except Fault as fault:
                behavior = self._resolved_behavior(env.request)
                batch.outcomes[i] = fault_outcome(env, fault, batch, behavior)

        if isolate:
            for job in batch.jobs:
                await self._run_isolated(conn, job, batch)
        else:
            for number, round_jobs in enumerate(_rounds(batch.jobs)):
                if number == 0:
                    await self._run_round(conn, round_jobs, batch)
                else:
                    # Its own subtransaction: its writes get their own xmin.
                    async with conn.transaction():
                        await self._run_round(conn, round_jobs, batch)

        for job in batch.jobs:
            assert job.outcome is not None
            batch.outcomes[job.index] = job.outcome
        for i, j in batch.echoes.items():
            first = batch.outcomes[j]
            assert first is not None
            batch.outcomes[i] = replayed(first.reply, first.data)
        await self.ledger.insert(conn, batch.entries)
        return [o for o in batch.outcomes if o is not None]

    # -- checks without the database (checks.py) ------------------------------------------

    def _prepare(self, index: int, env: Envelope, now: datetime) -> _Job:
        return prepare(self.registry, index, env, now)

    def _resolved_behavior(self, req: Request) -> Behavior | None:
        return resolved_behavior(self.registry, req)

    # -- rounds ---------------------------------------------------------------------------

    async def _run_round(self, conn: Connection, jobs: list[_Job], batch: _Batch) -> None:
        try:
            await self._check_and_apply(conn, jobs, batch)
        except asyncpg.PostgresError as exc:
            if is_data_error(exc):
                raise _DataError() from exc
            if is_transient(exc):
                raise
            raise _DataError() from exc

    async def _run_isolated(self, conn: Connection, job: _Job, batch: _Batch) -> None:
        mark = len(batch.entries)
        try:
            async with conn.transaction():
                await self._check_and_apply(conn, [job], batch)
        except asyncpg.PostgresError as exc:
            if is_transient(exc):
                raise
            del batch.entries[mark:]
            message = (exc.message if hasattr(exc, "message") else str(exc))[:300]
            fault: Fault
            if is_data_error(exc):
                fault = InvalidArgument(f"the database rejected a value: {message}")
                column = getattr(exc, "column_name", None)
                if isinstance(column, str):
                    fault.path = f"attributes.{column}"
            else:
                fault = UnexpectedError(f"the database failed on this request: {message}")
            job.outcome = fault_outcome(job.envelope, fault, batch, behavior=job.behavior)

    async def _check_and_apply(self, conn: Connection, jobs: list[_Job], batch: _Batch) -> None:
        locks: dict[str, list[object]] = defaultdict(list)
        reads: dict[str, list[object]] = defaultdict(list)
        for job in jobs:
            for t in job.targets:
                (reads if job.kind == "retrieve" else locks)[t.entity.name].append(t.key)
        current: dict[tuple[str, object], str] = {}
        attributes: dict[tuple[str, object], str] = {}
        for name, keys in locks.items():
            for row in await conn.fetch(self._sql[name].lock, keys):
                current[(name, row["k"])] = row["v"]
        for name, keys in reads.items():
            for row in await conn.fetch(self._sql[name].read, keys):
                current[(name, row["k"])] = row["v"]
                attributes[(name, row["k"])] = row["a"]

        updates: dict[str, list[_Target]] = defaultdict(list)
        deletes: dict[str, list[_Target]] = defaultdict(list)
        winners: list[_Job] = []
        for job in jobs:
            fault = _check_versions(job, current)
            if fault is not None:
                job.outcome = fault_outcome(job.envelope, fault, batch, job.behavior)
                continue
            if job.kind == "retrieve":
                job.attributes_json = attributes[job.targets[0].touch]
            for t in job.targets:
                t.prior = current[t.touch]
                if job.kind == "update":
                    updates[t.entity.name].append(t)
                elif job.kind == "delete":
                    deletes[t.entity.name].append(t)
            winners.append(job)

        for name, targets in updates.items():
            new = {
                row["k"]: row["v"]
                for row in await conn.fetch(
                    self._sql[name].update,
                    [t.key for t in targets],
                    [_json_encoder.encode(t.attributes).decode() for t in targets],
                )
            }
            for t in targets:
                t.new = new[t.key]  # the row is locked by us: it is there
        for name, targets in deletes.items():
            gone = {
                row["k"]
                for row in await conn.fetch(self._sql[name].delete, [t.key for t in targets])
            }
            assert all(t.key in gone for t in targets)
        for job in winners:
            job.outcome = success_outcome(job, batch)

    def unexpected(self, env: Envelope, exc: BaseException) -> Outcome:
        """The outcome for a request the processor failed on: retryable, not ledgered."""
        fault = UnexpectedError(f"internal error: {type(exc).__name__}")
        return fault_reply(env, fault, self._clock(), self._resolved_behavior(env.request))
