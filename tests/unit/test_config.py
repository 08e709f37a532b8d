"""Settings: env vars and flags, defaults, and errors that name what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from processor.config import ENV_VARS, SETTINGS, Settings
from processor.errors import ConfigError


def test_defaults_match_the_documented_topic_and_group_names() -> None:
    s = Settings.from_env({})
    assert (s.request_topic, s.reply_topic, s.dlq_topic, s.group_id) == (
        "requests",
        "replies",
        "requests.dlq",
        "processor",
    )


def test_a_flag_wins_over_the_environment() -> None:
    s = Settings.from_env(
        {"PROCESSOR_REPLY_TOPIC": "from-env", "PROCESSOR_ENTITIES": "/x.toml"},
        {"PROCESSOR_REPLY_TOPIC": "from-flag"},
    )
    assert s.reply_topic == "from-flag"
    assert s.entities == Path("/x.toml")


@pytest.mark.parametrize(
    ("env", "value", "needle"),
    [
        ("PROCESSOR_REPLY_TOPIC", "bad topic!", "PROCESSOR_REPLY_TOPIC"),
        ("PROCESSOR_LANES", "zero", "PROCESSOR_LANES"),
        ("PROCESSOR_LANES", "0", "must be a whole number from 1 to 256"),
        ("DATABASE_URL", "mysql://x", "postgresql://"),
        ("PROCESSOR_LEDGER_SCHEMA", 'x"; drop', "identifier"),
        ("PROCESSOR_LOG_LEVEL", "loud", "PROCESSOR_LOG_LEVEL"),
        ("PROCESSOR_LOG_FORMAT", "xml", "PROCESSOR_LOG_FORMAT='xml': unknown format"),
    ],
)
def test_a_bad_value_is_a_config_error_naming_the_variable(
    env: str, value: str, needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle):
        Settings.from_env({env: value})


#: Every numeric setting, with its accepted range.
NUMERIC = {
    "PROCESSOR_LANES": (1, 256),
    "PROCESSOR_MAX_BATCH": (1, 100_000),
    "PROCESSOR_MAX_MESSAGE_BYTES": (1, 1_073_741_824),
    "PROCESSOR_METRICS_PORT": (0, 65_535),
    "PROCESSOR_PARTITIONS": (1, 10_000),
    "PROCESSOR_LEDGER_RETENTION_DAYS": (1, 36_500),
    "PROCESSOR_DB_STATEMENT_TIMEOUT_MS": (0, 2_147_483_647),
    "PROCESSOR_DB_LOCK_TIMEOUT_MS": (0, 2_147_483_647),
    "PROCESSOR_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS": (0, 2_147_483_647),
}


def test_the_numeric_settings_are_all_listed_here() -> None:
    numeric = {s.env for s in SETTINGS if isinstance(getattr(Settings(), s.name), int)}
    assert numeric == set(NUMERIC)


@pytest.mark.parametrize("env", sorted(NUMERIC))
def test_a_bad_number_names_the_variable_and_the_accepted_range(env: str) -> None:
    """Not `invalid literal for int()`: the variable, the value and the range, one line."""
    low, high = NUMERIC[env]
    span = f"must be a whole number from {low} to {high:,}"
    for value in ("abc", "1.5", "", "0x10", str(low - 1), str(high + 1)):
        if value == "":
            continue  # empty = unset: the default
        with pytest.raises(ConfigError) as caught:
            Settings.from_env({env: value})
        message = str(caught.value)
        assert message.startswith(f"{env}={value!r}: {span}"), message
        assert "int()" not in message
        assert "\n" not in message
    flag = "--" + env.removeprefix("PROCESSOR_").lower().replace("_", "-")
    with pytest.raises(ConfigError, match=f"^{flag}='abc': {span}"):
        Settings.from_env({}, {env: "abc"})
    assert getattr(Settings.from_env({env: str(low)}), _name(env)) == low
    assert getattr(Settings.from_env({env: str(high)}), _name(env)) == high


def _name(env: str) -> str:
    return next(s.name for s in SETTINGS if s.env == env)


@pytest.mark.parametrize(
    ("value", "host"),
    [("0.0.0.0", "0.0.0.0"), ("::", "::"), ("[::1]", "::1"), ("localhost", "localhost")],
)
def test_the_metrics_server_listens_on_the_address_given(value: str, host: str) -> None:
    assert Settings.from_env({}).metrics_host == "0.0.0.0"
    assert Settings.from_env({"PROCESSOR_METRICS_HOST": value}).metrics_host == host


@pytest.mark.parametrize("value", ["a b", "-x", "x..y", "1.2.3.4:80", "a" * 64])
def test_a_bad_metrics_host_is_a_config_error_naming_it(value: str) -> None:
    with pytest.raises(ConfigError, match=r"PROCESSOR_METRICS_HOST=.*IP address"):
        Settings.from_env({"PROCESSOR_METRICS_HOST": value})


def test_require_names_the_missing_variables_and_flags() -> None:
    with pytest.raises(ConfigError, match=r"KAFKA_BOOTSTRAP_SERVERS.*--kafka-bootstrap-servers"):
        Settings.from_env({}).require("kafka_bootstrap_servers")


def test_every_setting_has_one_env_var_and_one_flag() -> None:
    assert len(ENV_VARS) == len(SETTINGS)
    assert {s.flag for s in SETTINGS} >= {"--reply-topic", "--database-url", "--entities"}
