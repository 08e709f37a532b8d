"""Per-row order whatever the Kafka key: lanes follow the rows a request touches.

Producers may key by tenant or customer rather than ``<entity>:<id>``. Inside one
partition every row's requests must still be applied in offset order, including when a
row is reached as another request's related row. Each scenario runs several rounds: a race
that passes once proves nothing.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import msgspec
import pytest

from tests.integration.harness import Raw, Scenario

pytestmark = pytest.mark.timeout(600)

ROUNDS = 5


def _raw(request: dict[str, Any]) -> Raw:
    """The request under a key of its own, in partition 0."""
    return Raw(msgspec.json.encode(request), key=uuid.uuid4().bytes, partition=0)


async def _log(pg: asyncpg.Connection, schema: str, row: int) -> list[int]:
    """The seq of every write to acct ``row``, in commit order (the trigger's log)."""
    rows = await pg.fetch(f"SELECT seq FROM {schema}.acct_log WHERE id = $1 ORDER BY n", row)
    return [r["seq"] for r in rows]


async def test_one_rows_updates_under_many_keys_in_one_partition_apply_in_order(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    """3 rows x 150 updates a round, every request under its own random key, 5 rounds:
    each row's writes are in offset order and it ends with its last value."""
    schema = scenario.schema
    await pg.execute(f"INSERT INTO {schema}.acct (id) VALUES (1), (2), (3)")
    scenario.start_worker(PROCESSOR_LANES="4")
    per_row, sent = 150, 0
    for round_ in range(ROUNDS):
        requests = [
            {
                "type": "update",
                "request_id": f"{scenario.run}-{round_}-{row}-{i}",
                "entity": "acct",
                "id": row,
                "attributes": {"seq": round_ * per_row + i},
            }
            for i in range(per_row)
            for row in (1, 2, 3)
        ]
        sent += await scenario.send([_raw(r) for r in requests])
        replies = await scenario.replies(expect=sent, timeout=120)
        assert len({r.request_id for r in replies}) == sent
        assert all(r.status == "success" for r in replies), [r.fault for r in replies if r.fault]
        last = round_ * per_row + per_row - 1
        for row in (1, 2, 3):
            seqs = await _log(pg, schema, row)
            assert len(seqs) == (round_ + 1) * per_row, f"row {row}: a write lost or doubled"
            assert seqs == sorted(seqs), f"round {round_}, row {row} out of order: {seqs[-40:]}"
            value = await pg.fetchval(f"SELECT seq FROM {schema}.acct WHERE id = $1", row)
            assert value == last, f"round {round_}: row {row} ended at {value}, not {last}"


async def test_a_rows_writes_as_target_and_as_related_row_apply_in_offset_order(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    """Request A targets row 1 with row 2 as its related row, request B targets row 2,
    under different keys in one partition: row 2's writes follow the offsets, 5 rounds."""
    schema = scenario.schema
    await pg.execute(f"INSERT INTO {schema}.acct (id) SELECT generate_series(1, 12)")
    scenario.start_worker(PROCESSOR_LANES="4")
    per_round, sent = 200, 0
    for round_ in range(ROUNDS):
        stream: list[Raw] = []
        for i in range(per_round):
            seq = round_ * per_round + i
            rid = f"{scenario.run}-{round_}-{i}"
            if i % 2:
                request: dict[str, Any] = {
                    "type": "update",
                    "request_id": rid,
                    "entity": "acct",
                    "id": 2,
                    "attributes": {"seq": seq},
                }
            else:
                request = {
                    "type": "update",
                    "request_id": rid,
                    "entity": "acct",
                    "id": 1,
                    "attributes": {"seq": seq},
                    "related": [{"entity": "acct", "id": 2, "attributes": {"seq": seq}}],
                }
            stream.append(_raw(request))
            # Unrelated rows in between: lanes have other work to run in parallel.
            stream.append(
                _raw(
                    {
                        "type": "update",
                        "request_id": f"{rid}-other",
                        "entity": "acct",
                        "id": 3 + i % 10,
                        "attributes": {"seq": seq},
                    }
                )
            )
        sent += await scenario.send(stream)
        replies = await scenario.replies(expect=sent, timeout=120)
        assert len({r.request_id for r in replies}) == sent
        assert all(r.status == "success" for r in replies), [r.fault for r in replies if r.fault]
        for row in (1, 2):
            seqs = await _log(pg, schema, row)
            assert seqs == sorted(seqs), f"round {round_}, row {row} out of order: {seqs[-40:]}"
        last = round_ * per_round + per_round - 1
        assert await pg.fetchval(f"SELECT seq FROM {schema}.acct WHERE id = 2") == last


async def test_batches_keep_per_row_order_with_single_requests_and_each_other(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    """Single updates, execute_transaction and execute_multiple on the same 4 rows, every
    record under its own random key in one partition, 5 rounds: each row's writes (inside
    and across batches) are applied in offset order and it ends with its last value."""
    schema = scenario.schema
    await pg.execute(f"INSERT INTO {schema}.acct (id) VALUES (1), (2), (3), (4)")
    scenario.start_worker(PROCESSOR_LANES="4")
    seq = 0
    sent = 0
    last: dict[int, int] = {}

    def upd(row: int) -> dict[str, Any]:
        nonlocal seq
        seq += 1
        last[row] = seq
        return {
            "type": "update",
            "request_id": f"{scenario.run}-u-{seq}",
            "entity": "acct",
            "id": row,
            "attributes": {"seq": seq},
        }

    for round_ in range(ROUNDS):
        records: list[dict[str, Any]] = []
        for i in range(40):
            kind = i % 4
            if kind == 0:
                records.append(upd(1 + i % 4))
            elif kind == 1:
                records.append(
                    {
                        "type": "execute_transaction",
                        "request_id": f"{scenario.run}-t-{round_}-{i}",
                        "requests": [upd(1), upd(2), upd(1)],
                    }
                )
            elif kind == 2:
                records.append(
                    {
                        "type": "execute_multiple",
                        "request_id": f"{scenario.run}-m-{round_}-{i}",
                        "requests": [upd(3), upd(2), upd(4)],
                    }
                )
            else:
                records.append(upd(4 - i % 4))
        sent += await scenario.send([_raw(r) for r in records])
        replies = await scenario.replies(expect=sent, timeout=120)
        assert len({r.request_id for r in replies}) == sent
        assert all(r.status == "success" for r in replies), [r.fault for r in replies if r.fault]
        assert not any(r.is_faulted for r in replies)
        for row in (1, 2, 3, 4):
            log = await _log(pg, schema, row)
            assert log == sorted(log), f"row {row} applied out of order: {log}"
            assert log[-1] == last[row]
