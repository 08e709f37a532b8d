"""The typed requests of :class:`~processor.client.Client`: one method per request type,
each built here and sent through the client's ``send``; a fault reply raises its type.

Apart from the client's transport (producer, reply consumer, the futures waiting for
replies) so that adding a request type touches this module and the contract only.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from processor.contract import (
    Behavior,
    DeleteRequest,
    EntityMetadata,
    ExecuteMultipleRequest,
    ExecuteTransactionRequest,
    RelatedEntity,
    Reply,
    Request,
    RetrieveEntityRequest,
    RetrieveRequest,
    RowRequest,
    UpdateRequest,
)
from processor.errors import FAULT_TYPES, ConcurrencyVersionMismatch, Fault, UnexpectedError

__all__ = ["RequestMethods", "fault_of", "new_request_id", "raise_for_fault"]


def new_request_id() -> str:
    return uuid.uuid4().hex


def fault_of(reply: Reply) -> Fault:
    """The typed exception for a fault reply (unknown codes: :class:`UnexpectedError`)."""
    detail = reply.fault
    if detail is None:
        fault: Fault = UnexpectedError(f"fault reply to {reply.request_id!r} without details")
    else:
        cls = FAULT_TYPES.get(detail.code)
        message = detail.message
        if cls is None:
            cls, message = UnexpectedError, f"{detail.name} ({detail.code}): {detail.message}"
        fault = cls(
            message,
            expected_version=detail.expected_version,
            current_version=detail.current_version,
            path=detail.path,
        )
    fault.reply = reply
    fault.request_index = (
        reply.faulted_request_index
        if reply.faulted_request_index is not None
        else reply.request_index
    )
    return fault


def raise_for_fault(reply: Reply) -> Reply:
    """Return a success reply; raise :func:`fault_of` a fault reply."""
    if reply.status != "success":
        raise fault_of(reply)
    return reply


class RequestMethods:
    """The request builders; the class that mixes them in sends (``Client.send``)."""

    async def send(
        self, request: Request, *, timeout: float | None = None, traceparent: str | None = None
    ) -> Reply:
        raise NotImplementedError  # Client.send

    async def update(
        self,
        entity: str,
        id: str | int,
        attributes: Mapping[str, Any],
        *,
        row_version: str | None = None,
        behavior: Behavior = "Default",
        related: Sequence[RelatedEntity] | None = None,
        request_id: str | None = None,
        expires_at: datetime | None = None,
        timeout: float | None = None,
        traceparent: str | None = None,
    ) -> Reply:
        """Update the row's ``attributes`` (never creates it); ``related`` rows with it."""
        request = UpdateRequest(
            request_id=request_id or new_request_id(),
            entity=entity,
            id=id,
            attributes=dict(attributes),
            row_version=row_version,
            concurrency_behavior=behavior,
            related=list(related or ()),
            expires_at=expires_at,
        )
        return raise_for_fault(await self.send(request, timeout=timeout, traceparent=traceparent))

    async def delete(
        self,
        entity: str,
        id: str | int,
        *,
        row_version: str | None = None,
        behavior: Behavior = "Default",
        request_id: str | None = None,
        expires_at: datetime | None = None,
        timeout: float | None = None,
        traceparent: str | None = None,
    ) -> Reply:
        """Delete the row."""
        request = DeleteRequest(
            request_id=request_id or new_request_id(),
            entity=entity,
            id=id,
            row_version=row_version,
            concurrency_behavior=behavior,
            expires_at=expires_at,
        )
        return raise_for_fault(await self.send(request, timeout=timeout, traceparent=traceparent))

    async def retrieve(
        self,
        entity: str,
        id: str | int,
        *,
        request_id: str | None = None,
        expires_at: datetime | None = None,
        timeout: float | None = None,
        traceparent: str | None = None,
    ) -> Reply:
        """The row's attributes (``reply.attributes``) and version (``reply.row_version``)."""
        request = RetrieveRequest(
            request_id=request_id or new_request_id(),
            entity=entity,
            id=id,
            expires_at=expires_at,
        )
        return raise_for_fault(await self.send(request, timeout=timeout, traceparent=traceparent))

    async def read_modify_write(
        self,
        entity: str,
        id: str | int,
        fn: Callable[[dict[str, Any]], Mapping[str, Any]],
        *,
        attempts: int = 10,
        backoff: float = 0.01,
        timeout: float | None = None,
        on_conflict: Callable[[ConcurrencyVersionMismatch], None] | None = None,
    ) -> Reply:
        """Retrieve, ``fn(attributes)`` -> the attributes to write, update IfRowVersionMatches.

        A :class:`ConcurrencyVersionMismatch` (another writer came first) starts over with
        a new request_id after a jittered, exponential pause (``backoff * 2**attempt`` at
        most, capped at 1 s), up to ``attempts`` tries; the last mismatch is raised. Any
        other fault, and :class:`ReplyTimeout`, is raised at once: after a timeout of the
        update its outcome is unknown, so resend ``exc.request`` to learn it.
        """
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        for attempt in range(attempts):
            current = await self.retrieve(entity, id, timeout=timeout)
            attributes = fn(dict(current.attributes or {}))
            try:
                return await self.update(
                    entity,
                    id,
                    attributes,
                    row_version=current.row_version,
                    behavior="IfRowVersionMatches",
                    timeout=timeout,
                )
            except ConcurrencyVersionMismatch as exc:
                if on_conflict is not None:
                    on_conflict(exc)
                if attempt + 1 == attempts:
                    raise
                await asyncio.sleep(random.uniform(0, min(1.0, backoff * 2**attempt)))
        raise AssertionError("unreachable")

    async def entity_metadata(
        self, entity: str, *, request_id: str | None = None, timeout: float | None = None
    ) -> EntityMetadata:
        """Dataverse's RetrieveEntityRequest: the entity as the workers' registry has it
        (is_optimistic_concurrency_enabled, default behaviour, row version, key, attributes).
        An entity the workers do not know raises :class:`~processor.errors.EntityNotFound`."""
        request = RetrieveEntityRequest(request_id=request_id or new_request_id(), entity=entity)
        reply = raise_for_fault(await self.send(request, timeout=timeout))
        assert reply.entity_metadata is not None
        return reply.entity_metadata

    async def execute_transaction(
        self,
        requests: Sequence[RowRequest],
        *,
        return_responses: bool = True,
        request_id: str | None = None,
        expires_at: datetime | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """Dataverse's ExecuteTransactionRequest: ``requests`` in order, all or nothing.

        Returns the success reply (``responses``: each request's reply, in order). A failure
        applied nothing and raises the failing request's own fault, typed, with
        ``request_index`` (Dataverse's FaultedRequestIndex).
        """
        request = ExecuteTransactionRequest(
            request_id=request_id or new_request_id(),
            requests=list(requests),
            return_responses=return_responses,
            expires_at=expires_at,
        )
        return raise_for_fault(await self.send(request, timeout=timeout))

    async def execute_multiple(
        self,
        requests: Sequence[RowRequest],
        *,
        continue_on_error: bool = False,
        return_responses: bool = True,
        request_id: str | None = None,
        expires_at: datetime | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """Dataverse's ExecuteMultipleRequest: each request applied on its own, in order.

        The reply's ``responses`` hold each request's reply (or only the faults, without
        ``return_responses``), each with its ``request_index``; ``is_faulted`` says whether
        any faulted. Faults inside do not raise: :func:`fault_of` a response gives its
        typed exception. A fault of the whole (e.g. too large) raises.
        """
        request = ExecuteMultipleRequest(
            request_id=request_id or new_request_id(),
            requests=list(requests),
            continue_on_error=continue_on_error,
            return_responses=return_responses,
            expires_at=expires_at,
        )
        return raise_for_fault(await self.send(request, timeout=timeout))
