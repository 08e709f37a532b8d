"""Database errors by SQLSTATE class, psycopg-style: what a retry of the whole transaction
can cure (transient) and what is a value the database refused (data: the request faults).

The worker's retries (``worker/applier.py``, ``worker/retry.py``) and the engine's
per-request redo (``engine/engine.py``) both ask here, so they agree on every state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Final

import asyncpg

from processor.errors import TransientError

__all__ = [
    "DATA_CLASSES",
    "DATA_STATES",
    "TRANSIENT_CLASSES",
    "TRANSIENT_STATES",
    "as_transient",
    "is_data_error",
    "is_transient",
]

#: SQLSTATE classes (the first two characters) a retry of the whole transaction can cure.
TRANSIENT_CLASSES: Final = {
    "08": "connection exception",
    "40": "transaction rollback (serialization failure, deadlock)",
    "53": "insufficient resources",
    "57": "operator intervention (shutdown, cancel; 57014 statement_timeout)",
    "58": "system error",
}
#: Single states of other classes that are transient too: the worker's timeouts.
TRANSIENT_STATES: Final = {
    "55P03": "lock_not_available (lock_timeout)",
    "25P03": "idle_in_transaction_session_timeout",
    "25P04": "transaction_timeout",
}
#: A value was rejected: the request faults, the batch is redone without it.
DATA_CLASSES: Final = {"22": "data exception", "23": "integrity constraint violation"}
DATA_STATES: Final = {"42804": "datatype_mismatch"}


def is_transient(exc: BaseException) -> bool:
    """True for failures a retry of the whole transaction can cure."""
    if isinstance(exc, TransientError | asyncio.TimeoutError | OSError):
        return True
    if isinstance(
        exc,
        asyncpg.InterfaceError
        | asyncpg.InternalClientError  # a connection left mid-operation ("cannot switch to state")
        | asyncpg.InvalidCachedStatementError
        | asyncpg.exceptions.PostgresConnectionError,
    ):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        return state[:2] in TRANSIENT_CLASSES or state in TRANSIENT_STATES
    return False


def is_data_error(exc: BaseException) -> bool:
    """A value was rejected (class 22 data exception, 23 integrity, 42804 type mismatch)."""
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        return state[:2] in DATA_CLASSES or state in DATA_STATES
    return False


@contextlib.contextmanager
def as_transient() -> Iterator[None]:
    """Raise a failure a retry can cure (:func:`is_transient`) as :class:`TransientError`,
    the one type the worker retries; anything else propagates as it is."""
    try:
        yield
    except TransientError:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise TransientError(f"{type(exc).__name__}: {exc}") from exc
        raise
