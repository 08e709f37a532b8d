"""The database edge: connections, errors by SQLSTATE class, and what lives in PostgreSQL.

- ``pool``: connections and pools, TLS, session settings.
- ``errors``: errors by SQLSTATE class (``is_transient``, ``is_data_error``).
- ``registry``: the entity registry (TOML checked against the live catalog).
- ``statements``: the SQL of one entity.
- ``ledger``: the request ledger.
- ``grants``: the least-privilege GRANT plan.

The package re-exports ``pool``'s and ``errors``' names (``from processor.db import connect``,
``is_transient``, as before).
"""

from processor.db.errors import is_data_error, is_transient
from processor.db.pool import (
    APPLICATION_NAME,
    Connection,
    connect,
    connect_error,
    create_pool,
    describe_connect_error,
    session_settings,
)

__all__ = [
    "APPLICATION_NAME",
    "Connection",
    "connect",
    "connect_error",
    "create_pool",
    "describe_connect_error",
    "is_data_error",
    "is_transient",
    "session_settings",
]
