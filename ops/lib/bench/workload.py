"""The benchmark's workload: its schema, registry and pgbench scripts, and the plan of one run."""

from __future__ import annotations

import logging
import os
import zlib
from array import array
from dataclasses import dataclass
from typing import Final

from ops.lib.common import ROOT, progress

CONTENDERS: Final = ROOT / "ops" / "bench_contenders.py"


MISMATCH: Final = -2147088254  # ConcurrencyVersionMismatch


LEDGER_SCHEMA: Final = "bench_ledger"


CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


SCHEMA_SQL: Final = """
CREATE SCHEMA IF NOT EXISTS bench;
CREATE TABLE IF NOT EXISTS bench.counter (
    id      integer PRIMARY KEY,
    n       bigint NOT NULL DEFAULT 0,
    version bigint NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS bench.app_ledger (
    request_id   text PRIMARY KEY,
    status       text NOT NULL,
    reply        bytea NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now()
);
"""


REGISTRY_TOML: Final = """\
# written by ops/bench.py
[entities.counter]
table = "bench.counter"
key = "id"
row_version = "version"
optimistic_concurrency = true
default_behavior = "IfRowVersionMatches"
attributes = ["n"]
"""


# The compare-and-set as pgbench runs it. pgbench keeps no state between transactions, so
# the expected version comes from a subquery (what the client read); :stale = 1 makes it a
# stale one, as often as the backlog has conflicts.
PGBENCH_CAS: Final = """\
\\set id CASE WHEN random(1, 1000000) <= :hot_ppm THEN 1 ELSE random(1, :keys) END
\\set stale CASE WHEN random(1, 1000000) <= :conflict_ppm THEN 1 ELSE 0 END
UPDATE bench.counter SET n = n + 1, version = version + 1
    WHERE id = :id AND version = (SELECT version FROM bench.counter WHERE id = :id) - :stale;
"""


# The batched form: :batch distinct keys of this client's lane (key % clients = client_id,
# so concurrent batches never overlap or deadlock) in one UPDATE over unnest arrays.
PGBENCH_BATCH: Final = """\
\\set start random(0, :lane_keys - 1)
WITH ids AS (
    SELECT ((:start + g) % :lane_keys) * :clients + :client_id + 1 AS id
    FROM generate_series(0, :batch - 1) AS g
), want AS (
    SELECT array_agg(c.id ORDER BY c.id) AS k,
           array_agg(c.version - (random() * 1000000 < :conflict_ppm)::int ORDER BY c.id) AS v
    FROM bench.counter AS c JOIN ids USING (id)
)
UPDATE bench.counter AS t SET n = t.n + 1, version = t.version + 1
    FROM want, unnest(want.k, want.v) AS u(k, v)
    WHERE t.id = u.k AND t.version = u.v;
"""


def say(message: str) -> None:
    progress("bench", message)


@dataclass(frozen=True, slots=True)
class Workload:
    requests: int
    keys: int
    hot: float = 0.0  # share of the requests on key 1 (1.0: one single row)
    conflict: float = 0.1  # share of the requests carrying a stale version
    seed: int = 1
    #: Every request under a Kafka key of its own (a producer keying by something else
    #: than the row), still partitioned by its row: per-row order must hold regardless.
    random_keys: bool = False

    def describe(self) -> str:
        skew = "uniform" if self.hot == 0 else f"{self.hot:.0%} on one key, rest uniform"
        keys = ", every request under a key of its own" if self.random_keys else ""
        return (
            f"{self.requests:,} updates over {self.keys:,} keys ({skew}), "
            f"{self.conflict:.0%} with a stale version{keys}"
        )


class Plan:
    """The requests of a workload and every outcome they must have, computed in advance."""

    def __init__(self, workload: Workload, partitions: int) -> None:
        import random

        self.workload = workload
        self.partitions = partitions
        self.prefix = f"b{workload.seed}"
        n, keys = workload.requests, workload.keys
        rng = random.Random(workload.seed)
        self.key = array("l", bytes(8 * n))
        self.carried = array("q", bytes(8 * n))
        self.ok = bytearray(n)
        version = array("q", [1]) * (keys + 1)
        for seq in range(n):
            k = 1 if rng.random() < workload.hot else rng.randint(1, keys)
            v = version[k]
            self.key[seq] = k
            if rng.random() < workload.conflict:
                self.carried[seq] = v - 1
            else:
                self.carried[seq] = v
                self.ok[seq] = 1
                version[k] = v + 1
        self.final_version = version
        self.successes = sum(self.ok)

    def __len__(self) -> int:
        return len(self.ok)

    def record(self, seq: int) -> tuple[int, bytes, bytes]:
        """(partition, key, value) of request ``seq``."""
        k, v = self.key[seq], self.carried[seq]
        row_key = b"counter:%d" % k
        key = b"req-%d" % seq if self.workload.random_keys else row_key
        value = (
            b'{"type":"update","request_id":"%s-%d","entity":"counter","id":%d,'
            b'"concurrency_behavior":"IfRowVersionMatches","row_version":"%d",'
            b'"attributes":{"n":%d}}' % (self.prefix.encode(), seq, k, v, v)
        )
        return zlib.crc32(row_key) % self.partitions, key, value

    def seq_of(self, request_id: str) -> int | None:
        head, _, tail = request_id.rpartition("-")
        if head != self.prefix or not tail.isdigit():
            return None
        seq = int(tail)
        return seq if seq < len(self.ok) else None
