"""PostgreSQL hardening without a server: timeout settings, URL handling, GRANT plans,
and how the timeouts' errors are classified."""

from __future__ import annotations

import asyncpg
import pytest

from processor.config import Settings, redact_url
from processor.db import connect_error, describe_connect_error, is_transient, session_settings
from processor.db.grants import check_role_name, plan_for, statements
from processor.db.ledger import Ledger
from processor.db.registry import Column, Entity, Registry
from processor.errors import ConfigError, ServiceUnreachable

TIMEOUT_VARS = {
    "PROCESSOR_DB_STATEMENT_TIMEOUT_MS": ("db_statement_timeout_ms", 30_000),
    "PROCESSOR_DB_LOCK_TIMEOUT_MS": ("db_lock_timeout_ms", 10_000),
    "PROCESSOR_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS": ("db_idle_in_transaction_timeout_ms", 60_000),
}


def test_timeout_defaults_are_30s_statement_10s_lock_60s_idle_in_transaction() -> None:
    s = Settings.from_env({})
    for attribute, default in TIMEOUT_VARS.values():
        assert getattr(s, attribute) == default


@pytest.mark.parametrize("env", sorted(TIMEOUT_VARS))
def test_each_timeout_is_an_env_var_and_a_flag_and_the_flag_wins(env: str) -> None:
    attribute, _ = TIMEOUT_VARS[env]
    assert getattr(Settings.from_env({env: "1234"}), attribute) == 1234
    assert getattr(Settings.from_env({env: "1234"}, {env: "0"}), attribute) == 0
    from processor.cli import _parser

    flag = "--" + env.removeprefix("PROCESSOR_").lower().replace("_", "-")
    args = _parser().parse_args([flag, "77", "run"])
    assert getattr(args, env) == "77"


@pytest.mark.parametrize("value", ["-1", "soon", "2147483648", "1.5"])
@pytest.mark.parametrize("env", sorted(TIMEOUT_VARS))
def test_a_bad_timeout_is_a_config_error_naming_the_variable(env: str, value: str) -> None:
    with pytest.raises(ConfigError, match=env):
        Settings.from_env({env: value})


def test_session_settings_carry_the_three_timeouts_in_milliseconds() -> None:
    s = Settings(
        db_statement_timeout_ms=1, db_lock_timeout_ms=2, db_idle_in_transaction_timeout_ms=3
    )
    assert session_settings(s) == {
        "application_name": "processor",
        "statement_timeout": "1",
        "lock_timeout": "2",
        "idle_in_transaction_session_timeout": "3",
    }


def test_tls_parameters_of_database_url_pass_through_unchanged() -> None:
    url = (
        "postgresql://w:pw@db.example:5432/app?sslmode=verify-full"
        "&sslrootcert=/etc/ca.pem&sslcert=/etc/c.pem&sslkey=/etc/c.key"
    )
    assert Settings.from_env({"DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize("mode", ["disable", "prefer", "require", "verify-ca", "verify-full"])
def test_every_libpq_sslmode_is_accepted(mode: str) -> None:
    Settings.from_env({"DATABASE_URL": f"postgresql://h/db?sslmode={mode}"})


def test_an_unknown_sslmode_is_a_config_error_that_hides_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"DATABASE_URL": "postgresql://u:s3cret@h/db?sslmode=verify_full"})
    text = str(caught.value)
    assert "DATABASE_URL" in text
    assert "verify-full" in text
    assert "s3cret" not in text


def test_a_bad_database_url_error_never_shows_the_password() -> None:
    for url in ("mysql://u:s3cret@h/db", "u:s3cret@h/db"):
        with pytest.raises(ConfigError) as caught:
            Settings.from_env({"DATABASE_URL": url})
        assert "s3cret" not in str(caught.value)


def test_settings_repr_hides_the_database_url() -> None:
    s = Settings(database_url="postgresql://u:s3cret@h/db")
    assert "s3cret" not in repr(s)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:p@h:5/db", "postgresql://u:***@h:5/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        (
            "postgresql://h/db?password=p&sslmode=require",
            "postgresql://h/db?password=***&sslmode=require",
        ),
        ("postgresql://u:p@q@h/db?sslpassword=k", "postgresql://u:***@h/db?sslpassword=***"),
    ],
)
def test_redact_url_hides_passwords_only(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_connect_error_names_the_host_and_hides_the_password() -> None:
    url = "postgresql://u:s3cret@db.example:6543/app?sslmode=verify-full"
    text = describe_connect_error(url, ConnectionRefusedError("refused by s3cret"))
    assert "db.example:6543" in text
    assert "s3cret" not in text


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.LockNotAvailableError,  # 55P03: lock_timeout
        asyncpg.exceptions.QueryCanceledError,  # 57014: statement_timeout
        asyncpg.exceptions.IdleInTransactionSessionTimeoutError,  # 25P03
        asyncpg.exceptions.TransactionTimeoutError,  # 25P04
    ],
)
def test_the_timeouts_errors_are_transient_so_the_batch_is_retried(
    error: type[asyncpg.PostgresError],
) -> None:
    assert is_transient(error("timeout"))


def test_a_missing_privilege_is_not_transient() -> None:
    assert not is_transient(asyncpg.exceptions.InsufficientPrivilegeError("denied"))


def _registry() -> Registry:
    key = Column("id", "integer", "integer", "N", False)
    text = Column("name", "text", "text", "S", True)
    qty = Column("qty", "integer", "integer", "N", False)
    return Registry(
        {
            "account": Entity(
                "account", "app", "account", key, None, True, "AlwaysOverwrite", {"name": text}
            ),
            "item": Entity(
                "item", "stock", "item", key, "version", True, "AlwaysOverwrite", {"qty": qty}
            ),
        }
    )


def test_the_worker_plan_grants_select_delete_column_update_and_the_ledgers_tables() -> None:
    sql = statements(plan_for(Ledger("ledger"), _registry()), "w", '"my-db"')
    grants = [s for s in sql if not s.startswith("--")]
    assert grants == [
        'GRANT CONNECT ON DATABASE "my-db" TO "w";',
        'GRANT USAGE ON SCHEMA "app", "ledger", "stock" TO "w";',
        'GRANT SELECT, DELETE ON TABLE "app"."account" TO "w";',
        'GRANT UPDATE ("name") ON TABLE "app"."account" TO "w";',
        'GRANT SELECT, DELETE ON TABLE "stock"."item" TO "w";',
        'GRANT UPDATE ("qty", "version") ON TABLE "stock"."item" TO "w";',
        'GRANT SELECT, INSERT ON TABLE "ledger".request_ledger TO "w";',
    ]
    text = " ".join(grants)
    for never in ("CREATE", 'INSERT ON TABLE "app"', "TRUNCATE", "ALL", "OWNER", "WITH GRANT"):
        assert never not in text


def test_the_prune_plan_touches_only_the_ledger() -> None:
    sql = statements(plan_for(Ledger("ledger"), prune=True), "p", "db")
    assert [s for s in sql if not s.startswith("--")] == [
        'GRANT CONNECT ON DATABASE db TO "p";',
        'GRANT USAGE ON SCHEMA "ledger" TO "p";',
        'GRANT SELECT, DELETE ON TABLE "ledger".request_ledger TO "p";',
    ]


@pytest.mark.parametrize(
    "name", ['w"; DROP TABLE x; --', "Worker", "1role", "public", "pg_monitor", "a" * 64, ""]
)
def test_a_role_name_must_be_a_plain_unreserved_identifier(name: str) -> None:
    with pytest.raises(ConfigError, match="--role"):
        check_role_name(name)


def test_a_connection_left_mid_operation_is_retried_not_a_request_fault() -> None:
    """asyncpg's InternalClientError ("cannot switch to state ...; another operation is in
    progress") is a broken connection, not a bad request: retry the batch elsewhere."""
    assert is_transient(asyncpg.InternalClientError("cannot switch to state 15"))


def test_a_multi_host_url_is_accepted_as_is_and_its_errors_name_every_host() -> None:
    """A primary and its standby in one URL (asyncpg tries them in order, keeps the one
    that accepts writes): passed through unchanged; no host accepting writes yet (the
    standby not promoted) is "unreachable" (exit 4, retried by the worker), not a setting
    to fix."""
    url = "postgresql://u:pw@10.0.0.1:5432,10.0.0.2:5433/app?target_session_attrs=read-write"
    assert Settings.from_env({"DATABASE_URL": url}).database_url == url
    error = connect_error(url, asyncpg.TargetServerAttributeNotMatched("no match"))
    assert isinstance(error, ServiceUnreachable)
    assert "10.0.0.1:5432,10.0.0.2:5433" in str(error)
    assert "target_session_attrs=read-write" in str(error)
    assert "pw" not in str(error)
    assert is_transient(asyncpg.TargetServerAttributeNotMatched("no match"))
