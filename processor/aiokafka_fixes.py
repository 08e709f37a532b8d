"""A fix to aiokafka that exactly-once depends on: group-level OffsetFetch errors.

Since OffsetFetch v2 (KIP-88) the broker reports a group-level error, such as
COORDINATOR_LOAD_IN_PROGRESS while it reloads ``__consumer_offsets`` after a restart, in
the response's top-level ``error_code``, with no per-partition entries. aiokafka 0.14
reads only the per-partition codes, so it takes that answer for "no committed offset":
a consumer assigned a partition right after a broker restart starts it from
``auto_offset_reset`` (the earliest offset) and ``consumer.committed()`` returns None.
For the processor that meant re-reading whole partitions and publishing their replies a
second time (the ledger kept the rows right): the chaos run's first long run found 9,955
such duplicates after a broker kill -9, and ``ops/stack`` reproduces the None answers
for ~0.5 s after each restart.

:func:`install` makes a group-level error raise, as the per-partition ones do, so
aiokafka's own retry loops (``fetch_committed_offsets``, the assignment's offset
refresh) wait for the coordinator instead of resetting the position.
"""

from __future__ import annotations

from typing import Any

import aiokafka.errors as errors
from aiokafka.consumer.group_coordinator import GroupCoordinator

__all__ = ["install"]

#: Group-level errors after which the coordinator must be looked up again.
_COORDINATOR_MOVED = (errors.NotCoordinatorForGroupError, errors.GroupCoordinatorNotAvailableError)


class _GroupErrorsRaise:
    """A coordinator whose requests raise the response's group-level error."""

    def __init__(self, coordinator: GroupCoordinator) -> None:
        self._coordinator = coordinator

    def __getattr__(self, name: str) -> Any:
        return getattr(self._coordinator, name)

    async def _send_req(self, request: Any) -> Any:
        response = await self._coordinator._send_req(request)
        code = getattr(response, "error_code", 0)  # absent before OffsetFetch v2
        if code:
            error_type = errors.for_code(code)
            if issubclass(error_type, _COORDINATOR_MOVED):
                self._coordinator.coordinator_dead()
            raise error_type()
        return response


_original = GroupCoordinator._do_fetch_commit_offsets


async def _do_fetch_commit_offsets(self: GroupCoordinator, partitions: Any) -> Any:
    return await _original(_GroupErrorsRaise(self), partitions)


def install() -> None:
    """Patch aiokafka's GroupCoordinator (idempotent; every consumer of the process)."""
    GroupCoordinator._do_fetch_commit_offsets = _do_fetch_commit_offsets
