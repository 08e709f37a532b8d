"""Lanes: a batch split into groups that can be applied concurrently, each in offset order.

Two requests that touch a common row, directly or through a chain of requests (A touches
rows x and y, B touches y and z: A, B and every request on x, y or z), land in one lane,
in the batch's order. Lanes therefore touch disjoint rows: they never wait on each
other's row locks, cannot deadlock each other, and a row's requests are applied in the
order they were read, whatever Kafka keys the producers chose.

Pure computation, no I/O: the worker runs each lane as one database transaction on its
own connection.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import TypeVar

__all__ = ["LANE_MIN_REQUESTS", "lane_count", "split"]

T = TypeVar("T")

#: Requests a lane should have before the batch is spread over one more lane. A lane costs
#: its database transaction's round trips (BEGIN, the statements of each round, COMMIT,
#: the pool's reset) whatever its size; at low load a batch holds a request or two and
#: those fixed costs, paid twice, were what saturated the CPU (ops/bench's load curve).
LANE_MIN_REQUESTS = 16


def lane_count(requests: int, configured: int) -> int:
    """How many lanes a batch of ``requests`` is worth: at most ``configured``, at least 1."""
    return max(1, min(configured, requests // LANE_MIN_REQUESTS))


def split(items: Sequence[T], rows: Sequence[Sequence[Hashable]], count: int) -> list[list[T]]:
    """``items`` in at most ``count`` lanes; ``rows[i]`` are the rows ``items[i]`` touches.

    Connected groups of items (linked by shared rows) are never split. Each group, in the
    order of its first item, goes to the lane with the fewest items so far (lanes differ
    by at most the largest group); inside a lane items keep their order. Empty lanes are
    left out. Linear in the batch: it runs on every batch of the worker's hot loop.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    groups: Iterable[list[int]]
    if all(len(touched) == 1 for touched in rows):
        # The common case (no related rows): a group is a row's requests.
        by_row: dict[Hashable, list[int]] = {}
        for i, (row,) in enumerate(rows):
            by_row.setdefault(row, []).append(i)
        groups = by_row.values()
    else:
        groups = _linked(rows)
    loads = [0] * count
    lane_of = [0] * len(items)
    for group in groups:
        lane = loads.index(min(loads))
        loads[lane] += len(group)
        for i in group:
            lane_of[i] = lane
    lanes: list[list[T]] = [[] for _ in range(count)]
    for item, lane in zip(items, lane_of, strict=True):
        lanes[lane].append(item)
    return [lane for lane in lanes if lane]


def _linked(rows: Sequence[Sequence[Hashable]]) -> list[list[int]]:
    """Indices grouped by shared rows, transitively (union-find over the rows)."""
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[Hashable, int] = {}
    for i, touched in enumerate(rows):
        for row in touched:
            j = owner.setdefault(row, i)
            a, b = root(i), root(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}  # by root, the group's first index: in order
    for i in range(len(rows)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())
