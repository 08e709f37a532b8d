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
        ("PROCESSOR_LANES", "0", "must be > 0"),
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


def test_require_names_the_missing_variables_and_flags() -> None:
    with pytest.raises(ConfigError, match=r"KAFKA_BOOTSTRAP_SERVERS.*--kafka-bootstrap-servers"):
        Settings.from_env({}).require("kafka_bootstrap_servers")


def test_every_setting_has_one_env_var_and_one_flag() -> None:
    assert len(ENV_VARS) == len(SETTINGS)
    assert {s.flag for s in SETTINGS} >= {"--reply-topic", "--database-url", "--entities"}
