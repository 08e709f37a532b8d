"""A unit of work on the client (Dataverse's OrganizationServiceContext).

::

    async with client.context(concurrency_behavior="IfRowVersionMatches") as ctx:
        row = await ctx.retrieve("account", 1)          # tracked, with its version
        ctx.update("account", 1, {"balance": row.attributes["balance"] - 10})
        ctx.delete("account", 2)                       # attach() a row known otherwise
        results = await ctx.save_changes()             # one execute_transaction

``save_changes`` sends every recorded change, in the order first recorded, with the
context's behaviour on every update and delete (as Dataverse's SaveChanges passes
``ConcurrencyBehavior`` to every UpdateRequest and DeleteRequest): one
``execute_transaction`` (all or nothing), or with ``continue_on_error=True`` one
``execute_multiple`` that applies each change on its own (SaveChangesOptions.ContinueOnError).
It refreshes the tracked versions from the replies and returns one :class:`ChangeResult`
per change. A change that failed raises its typed fault (a conflict:
:class:`~processor.errors.ConcurrencyVersionMismatch` with ``expected_version`` and
``current_version``) naming the change (``exc.change``, ``exc.request_index``, and
``exc.results`` for every change sent). Changes that were not applied stay recorded: retrieve
the row again (its version and attributes refresh, the change stays) and save again, or
``discard_changes()``. The context is reusable after a save; ``tracked`` says what it holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

from processor.contract import (
    Behavior,
    DeleteRequest,
    ExecuteMultipleRequest,
    ExecuteTransactionRequest,
    Reply,
    RowRequest,
    UpdateRequest,
)
from processor.errors import Fault

if TYPE_CHECKING:
    from processor.client import Client

__all__ = ["Change", "ChangeResult", "ServiceContext", "Tracked"]

State = Literal["unchanged", "modified", "deleted"]


@dataclass
class Tracked:
    """A row the context tracks: its version, the attributes last read, its pending change."""

    entity: str
    id: str | int
    row_version: str | None
    attributes: dict[str, Any] | None = None
    state: State = "unchanged"
    #: The attributes an update will write (merged over every ``update`` call).
    changes: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.entity} {self.id!r} ({self.state}, version {self.row_version})"


@dataclass(frozen=True)
class Change:
    """One change ``save_changes`` sent: an update or delete of a row, with its version."""

    kind: Literal["update", "delete"]
    entity: str
    id: str | int
    row_version: str | None
    attributes: Mapping[str, Any] | None
    request_id: str

    def __str__(self) -> str:
        return f"{self.kind} of {self.entity} {self.id!r} (version {self.row_version})"


@dataclass(frozen=True)
class ChangeResult:
    """What happened to one change: its reply; ``error`` is its typed fault, if it failed."""

    change: Change
    reply: Reply | None  # None: not applied (a transaction that failed elsewhere)

    @property
    def error(self) -> Fault | None:
        from processor.client import fault_of

        if self.reply is None or self.reply.status == "success":
            return None
        return fault_of(self.reply)


class ServiceContext:
    """Tracks rows and their versions, records changes, saves them in one request."""

    def __init__(
        self,
        client: Client,
        *,
        concurrency_behavior: Behavior = "Default",
        continue_on_error: bool = False,
    ) -> None:
        self.client = client
        self.concurrency_behavior: Behavior = concurrency_behavior
        self.continue_on_error = continue_on_error
        self._rows: dict[tuple[str, str | int], Tracked] = {}
        self._order: list[tuple[str, str | int]] = []  # changed rows, first change first

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Nothing is saved on exit (as in Dataverse): unsaved changes are dropped."""
        self.clear()

    # -- tracking ----------------------------------------------------------------------------

    @property
    def tracked(self) -> list[Tracked]:
        """Every row the context tracks, in the order attached."""
        return list(self._rows.values())

    @property
    def pending(self) -> list[Tracked]:
        """The rows whose change the next ``save_changes`` sends, in that order."""
        return [self._rows[key] for key in self._order]

    def __repr__(self) -> str:
        rows = ", ".join(str(t) for t in self._rows.values())
        return f"<ServiceContext {self.concurrency_behavior}: {rows or 'nothing tracked'}>"

    async def retrieve(
        self, entity: str, id: str | int, *, timeout: float | None = None
    ) -> Tracked:
        """Read the row and track it with its version; a tracked row is refreshed (its
        version and attributes; a recorded change stays)."""
        reply = await self.client.retrieve(entity, id, timeout=timeout)
        tracked = self._rows.get((entity, id))
        if tracked is None:
            return self.attach(entity, id, reply.row_version, reply.attributes)
        tracked.row_version, tracked.attributes = reply.row_version, reply.attributes
        return tracked

    def attach(
        self,
        entity: str,
        id: str | int,
        row_version: str | None,
        attributes: Mapping[str, Any] | None = None,
    ) -> Tracked:
        """Track a row known otherwise (e.g. from an earlier reply), unchanged."""
        tracked = Tracked(entity, id, row_version, dict(attributes) if attributes else None)
        self.detach(entity, id)
        self._rows[(entity, id)] = tracked
        return tracked

    def detach(self, entity: str, id: str | int) -> None:
        """Stop tracking the row (and drop its recorded change)."""
        self._rows.pop((entity, id), None)
        if (entity, id) in self._order:
            self._order.remove((entity, id))

    def clear(self) -> None:
        """Track nothing."""
        self._rows.clear()
        self._order.clear()

    def update(self, entity: str, id: str | int, attributes: Mapping[str, Any]) -> None:
        """Record an update of a tracked row (merged with an update recorded before)."""
        tracked = self._tracked(entity, id)
        if tracked.state == "deleted":
            raise ValueError(f"{tracked} is marked for deletion")
        if not attributes:
            raise ValueError("an update needs at least one attribute")
        tracked.changes.update(attributes)
        tracked.state = "modified"
        self._changed(entity, id)

    def delete(self, entity: str, id: str | int) -> None:
        """Record the deletion of a tracked row (it replaces an update recorded before)."""
        tracked = self._tracked(entity, id)
        tracked.changes.clear()
        tracked.state = "deleted"
        self._changed(entity, id)

    def discard_changes(self) -> None:
        """Forget every recorded change; the rows stay tracked, unchanged."""
        for key in self._order:
            self._rows[key].changes.clear()
            self._rows[key].state = "unchanged"
        self._order.clear()

    def _tracked(self, entity: str, id: str | int) -> Tracked:
        tracked = self._rows.get((entity, id))
        if tracked is None:
            raise KeyError(f"{entity} {id!r} is not tracked: retrieve() or attach() it first")
        return tracked

    def _changed(self, entity: str, id: str | int) -> None:
        if (entity, id) not in self._order:
            self._order.append((entity, id))

    # -- saving ------------------------------------------------------------------------------

    async def save_changes(self, *, timeout: float | None = None) -> list[ChangeResult]:
        """Send the recorded changes in one request; the result of each, in order.

        Raises the first failed change's typed fault (``exc.change``, ``exc.request_index``,
        ``exc.results``); in a transaction nothing was applied then, with
        ``continue_on_error`` the other changes were.
        """
        from processor.client import fault_of, new_request_id

        changes = [self._change(key, new_request_id()) for key in self._order]
        if not changes:
            return []
        requests = [self._request(c) for c in changes]
        if self.continue_on_error:
            outer: ExecuteMultipleRequest | ExecuteTransactionRequest = ExecuteMultipleRequest(
                request_id=new_request_id(), requests=requests, continue_on_error=True
            )
        else:
            outer = ExecuteTransactionRequest(request_id=new_request_id(), requests=requests)
        reply = await self.client.send(outer, timeout=timeout)
        if reply.status == "fault":
            error = fault_of(reply)
            index = reply.faulted_request_index
            results = [ChangeResult(c, None) for c in changes]
            if index is not None:
                self._name(error, changes[index], index)
            error.results = results
            raise error
        results = []
        failed: list[tuple[int, Reply]] = []
        by_index = {r.request_index: r for r in reply.responses or ()}
        for index, change in enumerate(changes):
            inner = by_index.get(index)
            results.append(ChangeResult(change, inner))
            if inner is None:
                continue
            if inner.status == "success":
                self._saved(change, inner)
            else:
                failed.append((index, inner))
        if failed:
            index, inner = failed[0]
            error = fault_of(inner)
            self._name(error, changes[index], index)
            error.results = results
            raise error
        return results

    def _change(self, key: tuple[str, str | int], request_id: str) -> Change:
        tracked = self._rows[key]
        kind: Literal["update", "delete"] = "delete" if tracked.state == "deleted" else "update"
        attributes = dict(tracked.changes) if kind == "update" else None
        return Change(kind, tracked.entity, tracked.id, tracked.row_version, attributes, request_id)

    def _request(self, change: Change) -> RowRequest:
        if change.kind == "delete":
            return DeleteRequest(
                request_id=change.request_id,
                entity=change.entity,
                id=change.id,
                row_version=change.row_version,
                concurrency_behavior=self.concurrency_behavior,
            )
        assert change.attributes is not None
        return UpdateRequest(
            request_id=change.request_id,
            entity=change.entity,
            id=change.id,
            attributes=dict(change.attributes),
            row_version=change.row_version,
            concurrency_behavior=self.concurrency_behavior,
        )

    def _saved(self, change: Change, reply: Reply) -> None:
        key = (change.entity, change.id)
        if change.kind == "delete":
            self.detach(*key)
            return
        tracked = self._rows[key]
        tracked.row_version = reply.row_version
        if tracked.attributes is not None and change.attributes is not None:
            tracked.attributes.update(change.attributes)
        tracked.changes.clear()
        tracked.state = "unchanged"
        self._order.remove(key)

    @staticmethod
    def _name(error: Fault, change: Change, index: int) -> None:
        """Put the change in the fault's message, and on the fault."""
        error.message = f"change {index}, {change}: {error.message}"
        error.args = (error.message,)
        error.change = change
        error.request_index = index
