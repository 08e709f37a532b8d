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

from collections.abc import Hashable, Sequence
from typing import TypeVar

__all__ = ["split"]

T = TypeVar("T")


def split(items: Sequence[T], rows: Sequence[Sequence[Hashable]], count: int) -> list[list[T]]:
    """``items`` in at most ``count`` lanes; ``rows[i]`` are the rows ``items[i]`` touches.

    Connected groups of items (linked by shared rows) are never split. Groups go, largest
    first, to the lane with the fewest items so far; inside a lane items keep their order.
    Empty lanes are left out.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    parent = list(range(len(items)))

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
    groups: dict[int, list[int]] = {}
    for i in range(len(items)):
        groups.setdefault(root(i), []).append(i)
    loads = [0] * count
    members: list[list[int]] = [[] for _ in range(count)]
    # Largest first, ties by first position: deterministic for a given batch.
    for group in sorted(groups.values(), key=lambda g: (-len(g), g[0])):
        lane = loads.index(min(loads))
        loads[lane] += len(group)
        members[lane].extend(group)
    return [[items[i] for i in sorted(m)] for m in members if m]
