"""processor.context.ServiceContext's bookkeeping, on a stand-in for the client's two calls
(retrieve and send); the real thing runs in tests/integration/test_producer_services.py."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal, cast

import msgspec
import pytest

from processor.client import Client
from processor.context import ServiceContext
from processor.contract import (
    DeleteRequest,
    ExecuteMultipleRequest,
    ExecuteTransactionRequest,
    FaultDetail,
    Reply,
    Request,
    UpdateRequest,
)
from processor.errors import ConcurrencyVersionMismatch

NOW = datetime(2030, 1, 1, tzinfo=UTC)


class Rows:
    """Answers retrieve and execute requests from a dict, versions counting up."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, Any], tuple[int, dict[str, Any]]] = {
            ("item", "a"): (1, {"qty": 1}),
            ("item", "b"): (1, {"qty": 2}),
        }
        self.sent: list[Request] = []

    async def retrieve(self, entity: str, id: Any, **_: Any) -> Reply:
        version, attributes = self.rows[(entity, id)]
        return Reply(
            request_id="r",
            type="retrieve",
            entity=entity,
            id=id,
            status="success",
            processed_at=NOW,
            row_version=str(version),
            attributes=dict(attributes),
        )

    async def send(self, request: Request, **_: Any) -> Reply:
        self.sent.append(request)
        assert isinstance(request, ExecuteTransactionRequest | ExecuteMultipleRequest)
        responses = []
        for i, inner in enumerate(request.requests):
            assert isinstance(inner, UpdateRequest | DeleteRequest)
            version, attributes = self.rows[(inner.entity, inner.id)]
            if inner.behavior == "IfRowVersionMatches" and inner.row_version != str(version):
                fault: dict[str, Any] = {
                    "code": -2147088254,
                    "name": "ConcurrencyVersionMismatch",
                    "message": "stale",
                    "retryable": True,
                    "expected_version": inner.row_version,
                    "current_version": str(version),
                }
                return _fault(request, i, fault)
            if isinstance(inner, DeleteRequest):
                del self.rows[(inner.entity, inner.id)]
                new = None
            else:
                self.rows[(inner.entity, inner.id)] = (version + 1, attributes | inner.attributes)
                new = str(version + 1)
            responses.append(
                Reply(
                    request_id=inner.request_id,
                    type=inner.__struct_config__.tag,  # type: ignore[arg-type]
                    entity=inner.entity,
                    id=inner.id,
                    status="success",
                    processed_at=NOW,
                    row_version=new,
                    request_index=i,
                )
            )
        return _batch_reply(request, "success", responses=responses)


def _fault(request: Request, index: int, fault: dict[str, Any]) -> Reply:
    return _batch_reply(
        request,
        "fault",
        fault=msgspec.convert(fault, FaultDetail),
        faulted_request_index=index,
    )


def _batch_reply(request: Request, status: Literal["success", "fault"], **fields: Any) -> Reply:
    """The reply to an execute request (no entity or id of its own)."""
    return Reply(
        request_id=request.request_id,
        type=request.__struct_config__.tag,  # type: ignore[arg-type]
        entity=None,
        id=None,
        status=status,
        processed_at=NOW,
        **fields,
    )


def _ctx(rows: Rows, **options: Any) -> ServiceContext:
    return ServiceContext(cast(Client, rows), **options)


async def test_changes_merge_per_row_and_save_in_the_order_first_recorded() -> None:
    rows = Rows()
    ctx = _ctx(rows, concurrency_behavior="IfRowVersionMatches")
    await ctx.retrieve("item", "b")
    await ctx.retrieve("item", "a")
    ctx.update("item", "a", {"qty": 5})
    ctx.update("item", "b", {"qty": 6})
    ctx.update("item", "a", {"label": "x"})  # merged into a's update
    assert [(t.id, t.state) for t in ctx.pending] == [("a", "modified"), ("b", "modified")]
    results = await ctx.save_changes()
    (sent,) = rows.sent
    assert isinstance(sent, ExecuteTransactionRequest)
    assert [(r.id, r.behavior) for r in sent.requests] == [
        ("a", "IfRowVersionMatches"),
        ("b", "IfRowVersionMatches"),
    ]
    first = sent.requests[0]
    assert isinstance(first, UpdateRequest)
    assert first.attributes == {"qty": 5, "label": "x"}
    assert [r.change.id for r in results] == ["a", "b"]
    assert {t.id: (t.row_version, t.state) for t in ctx.tracked} == {
        "a": ("2", "unchanged"),
        "b": ("2", "unchanged"),
    }
    assert ctx.pending == []
    assert await ctx.save_changes() == []  # nothing recorded: nothing sent
    assert len(rows.sent) == 1


async def test_a_delete_replaces_an_update_and_untracks_the_row_once_saved() -> None:
    rows = Rows()
    ctx = _ctx(rows)
    await ctx.retrieve("item", "a")
    ctx.update("item", "a", {"qty": 5})
    ctx.delete("item", "a")
    with pytest.raises(ValueError, match="marked for deletion"):
        ctx.update("item", "a", {"qty": 1})
    await ctx.save_changes()
    (sent,) = rows.sent
    assert isinstance(sent, ExecuteTransactionRequest)
    assert [type(r) for r in sent.requests] == [DeleteRequest]
    assert ctx.tracked == []


async def test_untracked_rows_and_empty_updates_are_refused() -> None:
    ctx = _ctx(Rows())
    with pytest.raises(KeyError, match="not tracked"):
        ctx.update("item", "a", {"qty": 1})
    with pytest.raises(KeyError, match="not tracked"):
        ctx.delete("item", "a")
    ctx.attach("item", "a", "1")
    with pytest.raises(ValueError, match="at least one attribute"):
        ctx.update("item", "a", {})


async def test_a_conflict_names_the_change_and_keeps_every_change_recorded() -> None:
    rows = Rows()
    ctx = _ctx(rows, concurrency_behavior="IfRowVersionMatches")
    await ctx.retrieve("item", "a")
    await ctx.retrieve("item", "b")
    rows.rows[("item", "b")] = (7, {"qty": 0})
    ctx.update("item", "a", {"qty": 5})
    ctx.update("item", "b", {"qty": 6})
    with pytest.raises(ConcurrencyVersionMismatch) as info:
        await ctx.save_changes()
    exc = info.value
    assert exc.request_index == 1
    assert exc.change is not None
    assert (exc.change.id, exc.expected_version, exc.current_version) == ("b", "1", "7")
    assert str(exc).startswith("change 1, update of item 'b' (version 1): ")
    assert [t.id for t in ctx.pending] == ["a", "b"]
    ctx.discard_changes()
    assert ctx.pending == []
    assert "item 'a' (unchanged, version 1)" in repr(ctx)


async def test_continue_on_error_sends_one_execute_multiple() -> None:
    rows = Rows()
    ctx = _ctx(rows, continue_on_error=True)
    await ctx.retrieve("item", "a")
    ctx.update("item", "a", {"qty": 5})
    await ctx.save_changes()
    (sent,) = rows.sent
    assert isinstance(sent, ExecuteMultipleRequest)
    assert sent.continue_on_error
