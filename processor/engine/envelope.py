"""What intake and the engine exchange: a request with its source, and what happened to it.

Plain data, no I/O: intake (records -> envelopes, outcomes -> records) and the engine
(envelopes -> outcomes) both import it, neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from processor.contract import ROW_REQUEST_TYPES, Reply, Request, RowRequest, request_fingerprint

__all__ = ["Envelope", "Outcome", "Source"]


@dataclass(frozen=True, slots=True)
class Source:
    """Where a request was read from (recorded in the ledger for audits)."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded request with its canonical fingerprint and its source."""

    request: Request
    fingerprint: bytes
    source: Source | None = None

    @classmethod
    def of(cls, request: Request, source: Source | None = None) -> Envelope:
        return cls(request, request_fingerprint(request), source)

    @property
    def row(self) -> RowRequest:
        """The request, one of the engine's own (update, delete, retrieve)."""
        assert isinstance(self.request, ROW_REQUEST_TYPES)
        return self.request


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one request: the reply (and its exact bytes) and what it did."""

    reply: Reply
    data: bytes
    replayed: bool = False  # the stored reply of an earlier delivery: nothing was applied now
    applied: bool = False  # a row was written or deleted by this delivery
    dead_letter: bool = False  # bad input: the message also goes to the dead-letter topic
