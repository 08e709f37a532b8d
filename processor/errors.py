"""The processor's exceptions, and the fault codes they carry on the wire.

Error tree (every :class:`Fault` becomes a fault reply; the numbers are the contract)::

    ProcessorError
    +-- ConfigError                      bad setting, flag or registry: the process does not start
    +-- ServiceUnreachable               Kafka or PostgreSQL cannot be reached: down, refusing,
                                         closing the connection, not answering in time
    +-- TransientError                   a service hiccup: the batch is retried, nothing is replied
    +-- ReplyTimeout                     client side: no reply in time (resending it is safe)
    +-- Fault                            becomes a fault reply (code, name, retryable)
        +-- ConcurrencyVersionMismatch       -2147088254
        +-- ConcurrencyVersionNotProvided    -2147088253
        +-- OptimisticConcurrencyNotEnabled  -2147088243
        +-- ObjectDoesNotExist               -2147220969
        +-- InvalidArgument                  -2147220989
        +-- EntityNotFound                   -2147217150  (Dataverse: QueryBuilderNoEntity)
        +-- AttributeNotFound                -2147217149  (Dataverse: QueryBuilderNoAttribute)
        +-- DuplicateRequest                 -2147220937  (Dataverse: DuplicateRecord)
        +-- RequestExpired                   -2130771967  (processor-specific)
        +-- RequestTooLarge                  -2130771966  (processor-specific)
        +-- UnexpectedError                  -2147220970  (Dataverse: UnExpected)

Codes that Dataverse defines keep Dataverse's number; the two processor-specific codes
live in 0x80FF0000-0x80FFFFFF, a block Dataverse does not use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Final

if TYPE_CHECKING:
    from processor.context import Change, ChangeResult
    from processor.contract import Reply, Request

__all__ = [
    "FAULT_TYPES",
    "MAX_FAULT_MESSAGE",
    "AttributeNotFound",
    "ConcurrencyVersionMismatch",
    "ConcurrencyVersionNotProvided",
    "ConfigError",
    "DuplicateRequest",
    "EntityNotFound",
    "Fault",
    "InvalidArgument",
    "ObjectDoesNotExist",
    "OptimisticConcurrencyNotEnabled",
    "ProcessorError",
    "ReplyTimeout",
    "RequestExpired",
    "RequestTooLarge",
    "ServiceUnreachable",
    "TransientError",
    "UnexpectedError",
    "bounded",
    "reply_timeout_message",
]


class ProcessorError(Exception):
    """Base class of every exception the processor raises on purpose."""


class ConfigError(ProcessorError):
    """A setting, CLI flag or registry entry is wrong; the message names which."""


class ServiceUnreachable(ProcessorError):
    """Kafka or PostgreSQL cannot be reached (not a setting it refused: that is a
    :class:`ConfigError`); the message names the service, the address and the cause."""


class TransientError(ProcessorError):
    """A service failed in a way that a retry of the whole batch can fix."""


class ReplyTimeout(ProcessorError):
    """:mod:`processor.client`: no reply within the timeout; the outcome is unknown.

    Resending ``request`` as is (the same ``request_id``) is safe: if the first one was
    applied, the worker's ledger answers with the stored reply and applies nothing.
    """

    def __init__(self, request: Request, timeout: float) -> None:
        super().__init__(reply_timeout_message(request.request_id, timeout))
        self.request = request
        self.request_id = request.request_id
        self.timeout = timeout


def reply_timeout_message(request_id: str, timeout: float) -> str:
    return (
        f"no reply to {request_id!r} within {timeout:g} s "
        "(outcome unknown; resending the same request_id is safe)"
    )


#: Longest fault message: replies and dead letters carry it, and it may quote the input.
MAX_FAULT_MESSAGE: Final = 512


def bounded(text: str, limit: int = MAX_FAULT_MESSAGE) -> str:
    """``text`` with control characters escaped (``\\x1b``), cut to ``limit`` characters.

    Fault messages quote what was wrong (an unknown field's name, a bad value): a hostile
    request must not put megabytes, or terminal escapes, into replies, dead letters, logs.
    """
    if text.isprintable() and len(text) <= limit:
        return text
    escaped = "".join(
        c if c.isprintable() else (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")
        for c in text[: limit + 1]
    )
    if len(text) > limit or len(escaped) > limit:
        marker = f"... ({len(text)} characters)"
        return escaped[: limit - len(marker)] + marker
    return escaped


class Fault(ProcessorError):
    """A request's outcome is a fault reply: subclasses fix ``code`` and ``name``."""

    code: ClassVar[int] = -2147220970
    name: ClassVar[str] = "UnExpected"
    retryable: ClassVar[bool] = False
    #: Bad input: besides the fault reply, the message goes to the dead-letter topic.
    dead_letter: ClassVar[bool] = False
    #: What the code means, for the generated fault table.
    summary: ClassVar[str] = ""
    #: Client side (:mod:`processor.client`): the fault reply this was raised for.
    reply: Reply | None = None
    #: Client side, an execute request's fault: the index of the request that failed
    #: (Dataverse's FaultedRequestIndex / RequestIndex).
    request_index: int | None = None
    #: :meth:`processor.context.ServiceContext.save_changes`: the change that failed, and
    #: the result of every change sent (with continue_on_error, some were applied).
    change: Change | None = None
    results: list[ChangeResult] | None = None

    def __init__(
        self,
        message: str,
        *,
        expected_version: str | None = None,
        current_version: str | None = None,
        path: str | None = None,
    ) -> None:
        message = bounded(message)
        super().__init__(message)
        self.message = message
        self.expected_version = expected_version
        self.current_version = current_version
        self.path = path

    def at(self, path: str) -> Fault:
        """Prefix the fault's path (``related[1]`` + ``attributes.x``) and return it."""
        self.path = path if self.path is None else f"{path}.{self.path}"
        return self


class ConcurrencyVersionMismatch(Fault):
    code = -2147088254
    name = "ConcurrencyVersionMismatch"
    retryable = True
    summary = (
        "IfRowVersionMatches and the row's version differs from row_version; the fault "
        "carries expected_version and current_version. Re-read, re-apply, resend."
    )


class ConcurrencyVersionNotProvided(Fault):
    code = -2147088253
    name = "ConcurrencyVersionNotProvided"
    summary = "IfRowVersionMatches without a row_version."


class OptimisticConcurrencyNotEnabled(Fault):
    code = -2147088243
    name = "OptimisticConcurrencyNotEnabled"
    summary = "IfRowVersionMatches on an entity whose optimistic_concurrency is false."


class ObjectDoesNotExist(Fault):
    code = -2147220969
    name = "ObjectDoesNotExist"
    summary = "Update, delete or retrieve of a row that is not there; an update never creates it."


class InvalidArgument(Fault):
    dead_letter = True
    code = -2147220989
    name = "InvalidArgument"
    summary = (
        "The request is malformed: not JSON, a missing or mistyped field, a value the "
        "column's type or constraints reject. Also dead-lettered."
    )


class EntityNotFound(Fault):
    dead_letter = True
    code = -2147217150
    name = "QueryBuilderNoEntity"
    summary = "The entity is not in the registry. Also dead-lettered."


class AttributeNotFound(Fault):
    dead_letter = True
    code = -2147217149
    name = "QueryBuilderNoAttribute"
    summary = "An attribute is not a writable column of the entity. Also dead-lettered."


class DuplicateRequest(Fault):
    dead_letter = True
    code = -2147220937
    name = "DuplicateRecord"
    summary = (
        "The request_id was used before with a different payload; nothing is applied "
        "and the first request's outcome stands. Also dead-lettered."
    )


class RequestExpired(Fault):
    dead_letter = True
    code = -2130771967
    name = "RequestExpired"
    summary = "Processed after its expires_at; not applied. Also dead-lettered."


class RequestTooLarge(Fault):
    dead_letter = True
    code = -2130771966
    name = "RequestTooLarge"
    summary = "The message is over the size limit and was not decoded. Also dead-lettered."


class UnexpectedError(Fault):
    code = -2147220970
    name = "UnExpected"
    retryable = True
    summary = "The processor failed on this request for a reason of its own; safe to resend."


#: Every fault type, by code: the registry behind the reply contract and the fault table.
FAULT_TYPES: dict[int, type[Fault]] = {
    cls.code: cls
    for cls in (
        ConcurrencyVersionMismatch,
        ConcurrencyVersionNotProvided,
        OptimisticConcurrencyNotEnabled,
        ObjectDoesNotExist,
        InvalidArgument,
        EntityNotFound,
        AttributeNotFound,
        DuplicateRequest,
        RequestExpired,
        RequestTooLarge,
        UnexpectedError,
    )
}
