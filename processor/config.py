"""Settings: read once, at the entry point, from the environment and CLI flags.

Every setting has one environment variable and the same name as a CLI flag
(``PROCESSOR_REPLY_TOPIC`` <-> ``--reply-topic``, ``KAFKA_BOOTSTRAP_SERVERS`` <->
``--kafka-bootstrap-servers``); a flag wins over the variable. Nothing below the entry
point reads ``os.environ``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

from processor.errors import ConfigError

__all__ = ["ENV_VARS", "SETTINGS", "Setting", "Settings"]

_TOPIC_RE: Final = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_IDENT_RE: Final = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _topic(value: str) -> str:
    if not _TOPIC_RE.fullmatch(value) or value in {".", ".."}:
        raise ValueError("not a valid Kafka topic name (1-249 of letters, digits, '.', '_', '-')")
    return value


def _group(value: str) -> str:
    if not value or len(value) > 249:
        raise ValueError("must be 1-249 characters")
    return value


def _ident(value: str) -> str:
    if not _IDENT_RE.fullmatch(value):
        raise ValueError("not a plain lowercase identifier of at most 63 bytes")
    return value


def _positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be > 0")
    return number


def _port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError("must be a port number 0-65535 (0: no metrics server)")
    return number


def _url(value: str) -> str:
    if not value.startswith(("postgresql://", "postgres://")):
        raise ValueError("must be a postgresql:// URL")
    return value


@dataclass(frozen=True, slots=True)
class Setting:
    name: str  # Settings attribute
    env: str
    parse: Callable[[str], Any]
    help: str

    @property
    def flag(self) -> str:
        bare = self.env.removeprefix("PROCESSOR_")
        return "--" + bare.lower().replace("_", "-")


SETTINGS: Final[tuple[Setting, ...]] = (
    Setting("kafka_bootstrap_servers", "KAFKA_BOOTSTRAP_SERVERS", str, "Kafka host:port list"),
    Setting("database_url", "DATABASE_URL", _url, "PostgreSQL URL"),
    Setting("request_topic", "PROCESSOR_REQUEST_TOPIC", _topic, "topic the requests arrive on"),
    Setting("reply_topic", "PROCESSOR_REPLY_TOPIC", _topic, "default topic for replies"),
    Setting("dlq_topic", "PROCESSOR_DLQ_TOPIC", _topic, "dead-letter topic"),
    Setting("group_id", "PROCESSOR_GROUP_ID", _group, "consumer group of the workers"),
    Setting("entities", "PROCESSOR_ENTITIES", Path, "path of the entity registry (TOML)"),
    Setting("ledger_schema", "PROCESSOR_LEDGER_SCHEMA", _ident, "schema of the request ledger"),
    Setting("lanes", "PROCESSOR_LANES", _positive, "database connections working in parallel"),
    Setting("max_batch", "PROCESSOR_MAX_BATCH", _positive, "records fetched per batch"),
    Setting("max_message_bytes", "PROCESSOR_MAX_MESSAGE_BYTES", _positive, "larger: not decoded"),
    Setting("metrics_port", "PROCESSOR_METRICS_PORT", _port, "HTTP port of /metrics, /healthz"),
    Setting("partitions", "PROCESSOR_PARTITIONS", _positive, "partitions `topics` creates"),
    Setting(
        "ledger_retention_days",
        "PROCESSOR_LEDGER_RETENTION_DAYS",
        _positive,
        "days `prune-ledger` keeps (must outlive the request topic's retention)",
    ),
    Setting("log_level", "PROCESSOR_LOG_LEVEL", str.lower, "debug, info, warning or error"),
)


@dataclass(frozen=True, slots=True)
class Settings:
    """The processor's configuration; build it with :meth:`from_env`."""

    kafka_bootstrap_servers: str | None = None
    database_url: str | None = None
    request_topic: str = "requests"
    reply_topic: str = "replies"
    dlq_topic: str = "requests.dlq"
    group_id: str = "processor"
    entities: Path | None = None
    ledger_schema: str = "processor"
    lanes: int = 2
    max_batch: int = 1000
    max_message_bytes: int = 1_000_000
    metrics_port: int = 9108
    partitions: int = 6
    ledger_retention_days: int = 30
    log_level: str = "info"

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], flags: Mapping[str, str | None] | None = None
    ) -> Settings:
        """Build settings from the environment; ``flags`` (by env var name) win.

        Any bad value raises :class:`ConfigError` naming the variable and the problem.
        """
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            raw = (flags or {}).get(setting.env)
            origin = setting.flag
            if raw is None:
                raw, origin = environ.get(setting.env), setting.env
            if raw is None or raw.strip() == "":
                continue
            try:
                values[setting.name] = setting.parse(raw.strip())
            except ValueError as exc:
                raise ConfigError(f"{origin}={raw[:200]!r}: {exc}") from None
        if values.get("log_level", "info") not in {"debug", "info", "warning", "error"}:
            raise ConfigError(f"PROCESSOR_LOG_LEVEL={values['log_level']!r}: unknown level")
        return cls(**values)

    def require(self, *names: str) -> None:
        """Fail with the env var names of required settings that are missing."""
        by_name = {s.name: s for s in SETTINGS}
        missing = [by_name[n] for n in names if getattr(self, n) is None]
        if missing:
            raise ConfigError(
                "missing setting(s): " + ", ".join(f"{s.env} (or {s.flag})" for s in missing)
            )


assert {s.name for s in SETTINGS} == {f.name for f in fields(Settings)}

#: Every environment variable the processor reads (docker-compose.yml is checked against it).
ENV_VARS: Final[frozenset[str]] = frozenset(s.env for s in SETTINGS)
