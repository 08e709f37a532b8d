"""The load test's options, what it observed, and the invariants it checks (pure)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from processor.contract import decode_reply
from processor.errors import (
    ConfigError,
    UnexpectedError,
)
from processor.tools.stats import percentile
from processor.tools.text import counted as _n

#: What a stale update writes: any acceptance shows in the counter check too.
POISON: Final = -(10**12)
#: At most this many (time, latency) samples go to the result (and the plot's scatter).
MAX_SAMPLES: Final = 5000


@dataclass(frozen=True, slots=True)
class LoadOptions:
    duration: float = 30.0
    mode: str = "closed"  # closed | open
    clients: int = 32
    rate: float = 200.0
    max_in_flight: int = 2000
    rows: int = 100
    skew: float = 0.0  # math.inf: one row
    delete_share: float = 0.05
    stale_share: float = 0.05
    delete_rows: int = 5000
    first_id: int = 1
    entity: str = "counter"
    attempts: int = 20
    backoff: float = 0.01
    timeout: float = 30.0
    ready_timeout: float = 120.0
    with_worker: int = 0
    seed: int | None = None
    #: Where the result JSON and the plot go: nowhere unless asked.
    json_path: Path | None = None
    plot_path: Path | None = None
    progress: bool = True
    #: ``--with-worker``'s logs: this directory (kept), else a temporary one, removed after
    #: a clean run and kept (and named) when a worker or an invariant failed.
    worker_logs: Path | None = None
    #: Leave the seeded rows in the table after the run (else they are deleted at the end).
    keep_rows: bool = False

    def validate(self) -> None:
        problems = [
            (self.duration <= 0, "--duration must be > 0"),
            (self.mode not in ("closed", "open"), "--mode must be closed or open"),
            (self.clients < 1, "--clients must be >= 1"),
            (self.rate <= 0, "--rate must be > 0"),
            (self.max_in_flight < 1, "--max-in-flight must be >= 1"),
            (self.rows < 1, "--rows must be >= 1"),
            (not self.skew >= 0, "--skew must be >= 0 or max"),
            (not 0 <= self.delete_share <= 1, "--delete-share must be in [0, 1]"),
            (not 0 <= self.stale_share <= 1, "--stale-share must be in [0, 1]"),
            (self.delete_share + self.stale_share > 1, "delete + stale shares exceed 1"),
            (self.delete_rows < 0, "--delete-rows must be >= 0"),
            (self.delete_share > 0 and self.delete_rows == 0, "deletes need --delete-rows > 0"),
            (self.attempts < 1, "--attempts must be >= 1"),
            (self.timeout <= 0, "--timeout must be > 0"),
            (self.with_worker < 0, "--with-worker must be >= 0"),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigError(message)


def latency_ms(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "p50": round(percentile(ordered, 50) * 1000, 2),
        "p90": round(percentile(ordered, 90) * 1000, 2),
        "p99": round(percentile(ordered, 99) * 1000, 2),
        "max": round(ordered[-1] * 1000, 2),
        "mean": round(sum(ordered) / len(ordered) * 1000, 2),
    }


@dataclass
class Observations:
    """Everything the run saw, from the client side and the reply topic."""

    increments: Counter[int] = field(default_factory=Counter)  # success replies per row
    deleted: set[int] = field(default_factory=set)  # delete rows deleted with success
    stale_accepted: int = 0
    unsettled: int = 0  # timeouts whose resends got no reply either
    sent: Counter[str] = field(default_factory=Counter)  # sends per request_id
    replied: set[str] = field(default_factory=set)  # request_ids with a reply at the client
    topic: dict[str, list[bytes]] = field(default_factory=dict)  # replies on the topic
    topic_read: bool = False


@dataclass(frozen=True, slots=True)
class Invariant:
    name: str
    ok: bool
    detail: str


def check_invariants(
    seen: Observations,
    counters: dict[int, int],
    delete_ids: Sequence[int],
    delete_left: set[int],
) -> list[Invariant]:
    """The run's invariants, from what the client saw and the rows as they are now."""
    out: list[Invariant] = []
    wrong = {i: (n, seen.increments.get(i, 0)) for i, n in counters.items()}
    wrong = {i: v for i, v in wrong.items() if v[0] != v[1]}
    out.append(
        Invariant(
            "counters == successful increments",
            not wrong,
            f"{_n(len(counters), 'row')}, {_n(sum(seen.increments.values()), 'increment')}"
            if not wrong
            else f"{_n(len(wrong), 'row')} {'differs' if len(wrong) == 1 else 'differ'} "
            "(id: db, increments): "
            f"{sorted(wrong.items())[:10]}",
        )
    )
    out.append(
        Invariant(
            "no stale update accepted",
            seen.stale_accepted == 0,
            f"{seen.stale_accepted:,} accepted",
        )
    )
    expected_left = set(delete_ids) - seen.deleted
    out.append(
        Invariant(
            "deleted rows == successful deletes",
            delete_left == expected_left,
            f"{len(seen.deleted):,} deleted, {len(delete_left):,} left"
            if delete_left == expected_left
            else f"still there but deleted: {sorted(delete_left - expected_left)[:10]}, "
            f"gone but never deleted: {sorted(expected_left - delete_left)[:10]}",
        )
    )
    missing = [r for r in seen.sent if r not in seen.replied]
    out.append(
        Invariant(
            "replies == requests",
            not missing and seen.unsettled == 0,
            f"{_n(len(seen.sent), 'request_id')}, {len(seen.replied):,} answered"
            + (f"; without reply: {missing[:5]}" if missing else "")
            + (f"; {_n(seen.unsettled, 'unsettled timeout')}" if seen.unsettled else ""),
        )
    )
    if seen.topic_read:
        absent = [r for r in seen.sent if r not in seen.topic]
        dupes = {r: len(v) for r, v in seen.topic.items() if len(v) > seen.sent.get(r, 0)}
        differ = [
            r
            for r, v in seen.topic.items()
            if len(set(v)) > 1 and not _unexpected(v)  # UnExpected is not ledgered
        ]
        copies = sum(len(v) for v in seen.topic.values())
        out.append(
            Invariant(
                "reply topic: one reply per send, none missing, copies identical",
                not absent and not dupes and not differ,
                f"{copies:,} replies for {_n(len(seen.topic), 'request_id')}"
                + (f"; missing: {absent[:5]}" if absent else "")
                + (f"; more replies than sends: {list(dupes.items())[:5]}" if dupes else "")
                + (f"; copies differ: {differ[:5]}" if differ else ""),
            )
        )
    return out


def _unexpected(values: list[bytes]) -> bool:
    for value in values:
        fault = decode_reply(value).fault
        if fault is not None and fault.code == UnexpectedError.code:
            return True
    return False
