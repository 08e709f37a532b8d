"""processor.client without services: fault mapping, the error tree, `processor send` usage."""

from __future__ import annotations

import inspect
from datetime import UTC, datetime

import pytest

import processor.errors as errors
from processor.cli import main
from processor.client import Client, fault_of, raise_for_fault
from processor.contract import FaultDetail, Reply, RetrieveRequest
from processor.errors import FAULT_TYPES, ProcessorError, ReplyTimeout, UnexpectedError


def fault_reply(code: int, name: str = "X", **extra: str) -> Reply:
    return Reply(
        request_id="r1",
        type="update",
        entity="counter",
        id=1,
        status="fault",
        processed_at=datetime.now(UTC),
        fault=FaultDetail(code=code, name=name, message="why", retryable=False, **extra),
    )


@pytest.mark.parametrize("code", sorted(FAULT_TYPES))
def test_every_fault_code_raises_its_own_type_with_its_fields(code: int) -> None:
    reply = fault_reply(code, expected_version="1", current_version="2", path="attributes.n")
    with pytest.raises(FAULT_TYPES[code]) as caught:
        raise_for_fault(reply)
    exc = caught.value
    assert type(exc) is FAULT_TYPES[code]
    assert (exc.message, exc.expected_version, exc.current_version, exc.path) == (
        "why",
        "1",
        "2",
        "attributes.n",
    )
    assert exc.reply is reply


def test_an_unknown_code_falls_back_to_unexpected_error_naming_it() -> None:
    reply = fault_reply(-1, "SomethingNew")
    exc = fault_of(reply)
    assert type(exc) is UnexpectedError
    assert "SomethingNew (-1): why" in exc.message
    assert exc.reply is reply


def test_a_success_reply_is_returned() -> None:
    ok = Reply(
        request_id="r", type="retrieve", entity="e", id=1, status="success",
        processed_at=datetime.now(UTC),
    )  # fmt: skip
    assert raise_for_fault(ok) is ok


def test_reply_timeout_is_a_processor_error_but_not_a_fault() -> None:
    request = RetrieveRequest(request_id="r9", entity="e", id=1)
    exc = ReplyTimeout(request, 2.5)
    assert isinstance(exc, ProcessorError)
    assert not isinstance(exc, errors.Fault)
    assert (exc.request, exc.request_id, exc.timeout) == (request, "r9", 2.5)
    assert "'r9'" in str(exc)
    assert "2.5 s" in str(exc)


def test_the_error_tree_docstring_names_every_processor_error() -> None:
    doc = errors.__doc__ or ""
    classes = [
        c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, ProcessorError)
    ]
    for cls in classes:
        assert f"+-- {cls.__name__} " in doc or cls is ProcessorError, cls.__name__


async def test_a_client_must_be_started_and_needs_a_positive_timeout() -> None:
    with pytest.raises(ValueError, match="timeout"):
        Client("127.0.0.1:1", timeout=0)
    client = Client("127.0.0.1:1")
    with pytest.raises(RuntimeError, match="not started"):
        await client.retrieve("e", 1)
    assert client.pending == 0


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{", "the request is not JSON"),
        ("[1]", "must be a JSON object, not list"),
        ('{"type": "retrieve", "entity": "e", "id": 1.5}', "field `id`: Expected `int | str`"),
        ('{"type": "merge", "entity": "e", "id": 1}', "field `type`: Invalid value 'merge'"),
        ('{"type": "retrieve", "entity": "e", "id": 1, "foo": 2}', "unknown field `foo`"),
        ('{"type": "update", "entity": "e", "id": 1}', "missing field `attributes`"),
        (
            '{"type": "update", "entity": "e", "id": 1, "attributes": {"a": 1}, '
            '"related": [{"entity": "f", "id": 2, "colour": "red"}]}',
            "unknown field `related[0].colour`",
        ),
        ('{"type": "retrieve", "entity": "e", "id": 1, "reply_to": "elsewhere"}', "reply_to"),
        ("", "the request is empty"),
        (" \n", "the request is empty"),
    ],
)
def test_processor_send_rejects_a_bad_request_with_exit_2(
    text: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad request is a request problem, named with its field, on one line; exit 2."""
    # an unreachable broker: the request is refused before any connection
    assert main(["--kafka-bootstrap-servers", "127.0.0.1:1", "send", text]) == 2
    err = capsys.readouterr().err
    assert err.startswith("processor: bad request: "), err
    assert needle in err
    assert "configuration error" not in err
    assert len(err.splitlines()) == 1, err


def test_processor_send_needs_kafka(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    assert main(["send", '{"type": "retrieve", "entity": "e", "id": 1}']) == 2
