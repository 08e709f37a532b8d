"""Database types and connections shared by the modules that talk to PostgreSQL.

``DATABASE_URL`` goes to asyncpg unchanged, so every libpq parameter asyncpg implements
works as is: ``sslmode`` (``verify-full`` checks the server's certificate against
``sslrootcert`` *and* the host name against its names), ``sslrootcert``, ``sslcert``,
``sslkey``, ``sslpassword``, ``sslcrl``, and the ``PGSSL*`` environment variables; and
several hosts with ``target_session_attrs`` (``postgresql://u@h1:5432,h2:5432/db?
target_session_attrs=read-write``): each connection goes to the first host that accepts
writes, so after a standby's promotion the pool's new connections find it. The URL
may hold a password: it is never logged, and errors show it redacted.
"""

from __future__ import annotations

import ssl
from typing import Any, Final, TypeAlias
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from processor.config import Settings, redact_url
from processor.errors import ConfigError, ProcessorError, ServiceUnreachable

__all__ = [
    "APPLICATION_NAME",
    "Connection",
    "connect",
    "connect_error",
    "create_pool",
    "session_settings",
]

#: Connection: a connection of its own or one lent by a pool.
Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

#: Seconds a connection attempt may take (the server may be slow to accept, never silent).
CONNECT_TIMEOUT: Final = 30.0

#: ``application_name`` of the processor's sessions (pg_stat_activity).
APPLICATION_NAME: Final = "processor"

#: What a failed connection attempt can raise: socket and TLS errors (OSError, including
#: ssl.SSLCertVerificationError), server refusals, timeouts, and asyncpg's own
#: configuration errors (a bad sslmode, a missing sslrootcert, an unparsable URL).
_CONNECT_ERRORS: Final = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.TargetServerAttributeNotMatched,  # several hosts, none the primary (yet)
    ValueError,
)


def session_settings(settings: Settings) -> dict[str, str]:
    """Server settings of the worker's sessions: its name and the three timeouts (ms).

    A stuck lock, a runaway statement or an abandoned transaction must not hold a key
    (and a lane) forever; the errors they raise are transient (``db.errors.is_transient``), so
    the batch is retried and, past the retry budget, redone from Kafka.
    """
    return {
        "application_name": APPLICATION_NAME,
        "statement_timeout": str(settings.db_statement_timeout_ms),
        "lock_timeout": str(settings.db_lock_timeout_ms),
        "idle_in_transaction_session_timeout": str(settings.db_idle_in_transaction_timeout_ms),
    }


def _command_timeout(settings: Settings) -> float:
    # The client-side guard stays behind the server's statement_timeout, so the server's
    # clean query_canceled (57014) normally comes first.
    return max(60.0, settings.db_statement_timeout_ms / 1000 + 10)


def describe_connect_error(url: str, exc: BaseException) -> str:
    """One line saying why connecting failed, without the password."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    try:
        where = f"{parts.hostname or 'the default host'}:{parts.port or 5432}"
    except ValueError:
        # several hosts (host1:port1,host2:port2, a primary and its standbys) are no port
        where = hosts if "," in hosts else "the host in DATABASE_URL"
    modes = parse_qs(parts.query).get("sslmode", [])
    mode = modes[-1] if modes else "prefer"
    if isinstance(exc, ssl.SSLCertVerificationError):
        must = "be signed by the CA in sslrootcert"
        if mode == "verify-full":
            must += " and name the host connected to (subjectAltName DNS or IP)"
        reason = (
            f"the server's TLS certificate was rejected ({exc.verify_message}): with "
            f"sslmode={mode} it must {must}"
        )
    elif isinstance(exc, ssl.SSLError):
        reason = f"TLS failed (sslmode={mode}): {exc}"
    elif isinstance(exc, FileNotFoundError | IsADirectoryError | PermissionError):
        reason = (
            f"cannot read a TLS file named in DATABASE_URL (sslrootcert, sslcert, sslkey) or "
            f"the PGSSL* variables: {exc.strerror or exc}"
        )
    elif isinstance(exc, TimeoutError):
        reason = f"no answer within {CONNECT_TIMEOUT:g} s"
    elif isinstance(exc, asyncpg.TargetServerAttributeNotMatched):
        attrs = parse_qs(parts.query).get("target_session_attrs", ["any"])[-1]
        reason = (
            f"no host accepts a session with target_session_attrs={attrs} (a failover under "
            "way: the standby not promoted yet)"
        )
    else:
        reason = f"{type(exc).__name__}: {exc}".strip()
    text = f"cannot connect to PostgreSQL at {where} (DATABASE_URL={redact_url(url)}): {reason}"
    password = parts.password
    if password:  # belt and braces: no error text may echo it
        for secret in {password, unquote(password)}:
            text = text.replace(secret, "***")
    return text


#: SQLSTATE classes of a server that is there but cannot take the connection now:
#: 08 connection exception, 53 insufficient resources (too many connections), 57 operator
#: intervention (starting up, shutting down). Any other refusal (login, database, TLS) is
#: a setting to fix.
_UNAVAILABLE_CLASSES: Final = ("08", "53", "57")


def connect_error(url: str, exc: BaseException) -> ProcessorError:
    """The error to raise for a failed connection attempt: :class:`ServiceUnreachable` when
    the server cannot be reached (or cannot take a connection now), :class:`ConfigError`
    when it refused what the settings ask (login, database, TLS), each one line."""
    text = describe_connect_error(url, exc)
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        unavailable = state.startswith(_UNAVAILABLE_CLASSES)
    elif isinstance(exc, asyncpg.TargetServerAttributeNotMatched):
        unavailable = True
    else:
        unavailable = isinstance(exc, OSError | TimeoutError) and not isinstance(
            exc, ssl.SSLError | FileNotFoundError | IsADirectoryError | PermissionError
        )
    return ServiceUnreachable(text) if unavailable else ConfigError(text)


def _url(settings: Settings) -> str:
    settings.require("database_url")
    assert settings.database_url is not None
    return settings.database_url


async def connect(settings: Settings, *, timeouts: bool = False) -> asyncpg.Connection[Any]:
    """One connection to DATABASE_URL; with ``timeouts``, the worker's session settings."""
    url = _url(settings)
    server_settings = (
        session_settings(settings) if timeouts else {"application_name": APPLICATION_NAME}
    )
    try:
        return await asyncpg.connect(
            url,
            timeout=CONNECT_TIMEOUT,
            command_timeout=_command_timeout(settings) if timeouts else None,
            server_settings=server_settings,
        )
    except _CONNECT_ERRORS as exc:
        raise connect_error(url, exc) from exc


async def create_pool(settings: Settings, *, max_size: int) -> asyncpg.Pool[Any]:
    """The worker's pool: every connection gets :func:`session_settings`.

    It opens one connection before returning, so a wrong URL, a refused login or a TLS
    certificate that fails verification stops the worker at start with one clear line.
    """
    url = _url(settings)
    try:
        pool = await asyncpg.create_pool(
            url,
            min_size=1,
            max_size=max_size,
            command_timeout=_command_timeout(settings),
            timeout=CONNECT_TIMEOUT,
            server_settings=session_settings(settings),
            reset=_keep_session,
        )
    except _CONNECT_ERRORS as exc:
        raise connect_error(url, exc) from exc
    assert pool is not None
    return pool


async def _keep_session(conn: asyncpg.Connection[Any]) -> None:
    """The pool's reset on release, with nothing left to reset.

    asyncpg rolls back an open transaction before calling this either way. Its default
    reset then sends ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``: one
    more round trip per lane per batch (a batch at low load holds a request or two), for
    session state the worker never creates (its locks are transaction-scoped, its
    settings are the connection's startup parameters).
    """


# -- errors, by SQLSTATE class (as psycopg.errors groups them) ----------------------------
