"""Settings: read once, at the entry point, from the environment and CLI flags.

Every setting has one environment variable and the same name as a CLI flag
(``PROCESSOR_REPLY_TOPIC`` <-> ``--reply-topic``, ``KAFKA_BOOTSTRAP_SERVERS`` <->
``--kafka-bootstrap-servers``); a flag wins over the variable. Nothing below the entry
point reads ``os.environ``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs

from processor.errors import ConfigError
from processor.kafka.access import (
    KAFKA_SECURITY_VARS,
    SASL_MECHANISMS,
    SECURITY_PROTOCOLS,
    KafkaAccess,
    Secret,
    kafka_security_problem,
    read_secret_file,
)
from processor.names import is_identifier

__all__ = ["ENV_VARS", "SETTINGS", "Secret", "Setting", "Settings"]

_TOPIC_RE: Final = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_LABEL_RE: Final = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def _topic(value: str) -> str:
    if not _TOPIC_RE.fullmatch(value) or value in {".", ".."}:
        raise ValueError("not a valid Kafka topic name (1-249 of letters, digits, '.', '_', '-')")
    return value


def _group(value: str) -> str:
    if not value or len(value) > 249:
        raise ValueError("must be 1-249 characters")
    return value


def _ident(value: str) -> str:
    if not is_identifier(value):
        raise ValueError("not a plain lowercase identifier of at most 63 bytes")
    return value


def _integer(low: int, high: int, note: str = "") -> Callable[[str], int]:
    """A parser of whole numbers in [low, high]; its error states the range (and ``note``)."""
    span = f"a whole number from {low} to {high:_}".replace("_", ",")

    def parse(value: str) -> int:
        try:
            number = int(value, 10)
        except ValueError:
            number = None
        if number is None or not low <= number <= high:
            raise ValueError(f"must be {span}{note}")
        return number

    return parse


_MILLIS: Final = _integer(0, 2_147_483_647, " (milliseconds; 0: no timeout)")


def _host(value: str) -> str:
    """An IP address or a host name to listen on."""
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        pass
    if len(value) > 253 or not all(_LABEL_RE.fullmatch(part) for part in value.split(".")):
        raise ValueError("must be an IP address (0.0.0.0, ::, 127.0.0.1) or a host name")
    return value


#: libpq's sslmode values, all of which asyncpg implements (verify-full: CA and host name).
SSLMODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_SECRET_PARAM: Final = re.compile(r"(?i)(^|&)((?:ssl)?password)=[^&]*")


def redact_url(url: str) -> str:
    """The URL with its password (in the user info or a ``password=`` parameter) hidden."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<not a URL: hidden>"
    head, question, query = rest.partition("?")
    at = head.rfind("@")
    if at >= 0:
        user, colon, _ = head[:at].partition(":")
        head = user + (":***" if colon else "") + head[at:]
    if question:
        query = _SECRET_PARAM.sub(r"\1\2=***", query)
    return f"{scheme}://{head}{question}{query}"


def _url(value: str) -> str:
    if not value.startswith(("postgresql://", "postgres://")):
        raise ValueError("must be a postgresql:// URL")
    query = value.partition("?")[2].partition("#")[0]
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError("its query string is not name=value pairs joined by '&'") from None
    for mode in params.get("sslmode", []):
        if mode not in SSLMODES:
            raise ValueError(f"sslmode={mode[:40]!r} is not one of {', '.join(SSLMODES)}")
    return value


# --- Kafka security (SASL, TLS): the options and their checks are processor/kafka/access.py's


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value.upper() not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value.upper()

    return parse


def _file(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError("not a regular file" if path.exists() else "no such file")
    return path


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
    Setting(
        "kafka_security_protocol",
        "KAFKA_SECURITY_PROTOCOL",
        _choice(SECURITY_PROTOCOLS),
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
    ),
    Setting(
        "kafka_sasl_mechanism",
        "KAFKA_SASL_MECHANISM",
        _choice(SASL_MECHANISMS),
        "SCRAM-SHA-256, SCRAM-SHA-512 or PLAIN (SASL_* protocols)",
    ),
    Setting("kafka_sasl_username", "KAFKA_SASL_USERNAME", str, "SASL user name"),
    Setting(
        "kafka_sasl_password_file",
        "KAFKA_SASL_PASSWORD_FILE",
        _file,
        "file holding the SASL password (preferred over KAFKA_SASL_PASSWORD)",
    ),
    Setting(
        "kafka_sasl_password",
        "KAFKA_SASL_PASSWORD",
        Secret,
        "SASL password (prefer KAFKA_SASL_PASSWORD_FILE: a flag shows in `ps`)",
    ),
    Setting(
        "kafka_ssl_cafile",
        "KAFKA_SSL_CAFILE",
        _file,
        "PEM CA certificates that verify the brokers (default: the system's)",
    ),
    Setting(
        "kafka_ssl_certfile",
        "KAFKA_SSL_CERTFILE",
        _file,
        "PEM client certificate (chain) for mutual TLS",
    ),
    Setting(
        "kafka_ssl_keyfile",
        "KAFKA_SSL_KEYFILE",
        _file,
        "PEM private key of the client certificate (default: in KAFKA_SSL_CERTFILE)",
    ),
    Setting(
        "kafka_ssl_key_password_file",
        "KAFKA_SSL_KEY_PASSWORD_FILE",
        _file,
        "file holding the password of an encrypted KAFKA_SSL_KEYFILE",
    ),
    Setting("database_url", "DATABASE_URL", _url, "PostgreSQL URL"),
    Setting(
        "db_statement_timeout_ms",
        "PROCESSOR_DB_STATEMENT_TIMEOUT_MS",
        _MILLIS,
        "statement_timeout of the worker's sessions, ms (0: none)",
    ),
    Setting(
        "db_lock_timeout_ms",
        "PROCESSOR_DB_LOCK_TIMEOUT_MS",
        _MILLIS,
        "lock_timeout of the worker's sessions, ms (0: none)",
    ),
    Setting(
        "db_idle_in_transaction_timeout_ms",
        "PROCESSOR_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS",
        _MILLIS,
        "idle_in_transaction_session_timeout of the worker's sessions, ms (0: none)",
    ),
    Setting("request_topic", "PROCESSOR_REQUEST_TOPIC", _topic, "topic the requests arrive on"),
    Setting("reply_topic", "PROCESSOR_REPLY_TOPIC", _topic, "default topic for replies"),
    Setting("dlq_topic", "PROCESSOR_DLQ_TOPIC", _topic, "dead-letter topic"),
    Setting("group_id", "PROCESSOR_GROUP_ID", _group, "consumer group of the workers"),
    Setting(
        "worker_id",
        "PROCESSOR_WORKER_ID",
        _group,
        "this worker's id, unique among live workers and kept across its restarts; its "
        "transactional id is <group>-<id> (default: the host name)",
    ),
    Setting("entities", "PROCESSOR_ENTITIES", Path, "path of the entity registry (TOML)"),
    Setting("ledger_schema", "PROCESSOR_LEDGER_SCHEMA", _ident, "schema of the request ledger"),
    Setting(
        "lanes",
        "PROCESSOR_LANES",
        _integer(1, 256),
        "database transactions in parallel per worker (each holds a connection)",
    ),
    Setting("max_batch", "PROCESSOR_MAX_BATCH", _integer(1, 100_000), "records fetched per batch"),
    Setting(
        "max_message_bytes",
        "PROCESSOR_MAX_MESSAGE_BYTES",
        _integer(1, 1_073_741_824),
        "larger messages are not decoded (a fault reply and a dead letter)",
    ),
    Setting(
        "metrics_host",
        "PROCESSOR_METRICS_HOST",
        _host,
        "address the HTTP server of /metrics, /healthz, /readyz listens on",
    ),
    Setting(
        "metrics_port",
        "PROCESSOR_METRICS_PORT",
        _integer(0, 65_535, " (0: no metrics server)"),
        "port of /metrics, /healthz, /readyz; one per worker on a host (0: off)",
    ),
    Setting(
        "partitions",
        "PROCESSOR_PARTITIONS",
        _integer(1, 10_000),
        "partitions `processor topics` creates",
    ),
    Setting(
        "replication_factor",
        "PROCESSOR_REPLICATION_FACTOR",
        _integer(1, 32_767),
        "replicas of each partition `processor topics` creates (default: one per live "
        "broker, at most 3; more than the brokers is an error)",
    ),
    Setting(
        "ledger_retention_days",
        "PROCESSOR_LEDGER_RETENTION_DAYS",
        _integer(1, 36_500),
        "days `prune-ledger` keeps (must outlive the request topic's retention)",
    ),
    Setting("log_level", "PROCESSOR_LOG_LEVEL", str.lower, "debug, info, warning or error"),
    Setting(
        "log_format",
        "PROCESSOR_LOG_FORMAT",
        str.lower,
        "json (one object a line) or console (readable text for a terminal)",
    ),
)


@dataclass(frozen=True, slots=True)
class Settings:
    """The processor's configuration; build it with :meth:`from_env`."""

    kafka_bootstrap_servers: str | None = None
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password_file: Path | None = None
    kafka_sasl_password: Secret | None = field(default=None, repr=False)
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_ssl_key_password_file: Path | None = None
    database_url: str | None = field(default=None, repr=False)  # may hold a password
    db_statement_timeout_ms: int = 30_000
    db_lock_timeout_ms: int = 10_000
    db_idle_in_transaction_timeout_ms: int = 60_000
    request_topic: str = "requests"
    reply_topic: str = "replies"
    dlq_topic: str = "requests.dlq"
    group_id: str = "processor"
    worker_id: str | None = None
    entities: Path | None = None
    ledger_schema: str = "processor"
    lanes: int = 2
    max_batch: int = 1000
    max_message_bytes: int = 1_000_000
    metrics_host: str = "0.0.0.0"  # noqa: S104  # every interface: scraped from outside
    metrics_port: int = 9108
    partitions: int = 6
    replication_factor: int | None = None  # None: from the cluster's size (kafka.py)
    ledger_retention_days: int = 30
    log_level: str = "info"
    log_format: str = "json"

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
                shown = redact_url(raw) if setting.name == "database_url" else raw
                raise ConfigError(f"{origin}={shown[:200]!r}: {exc}") from None
        if values.get("log_level", "info") not in {"debug", "info", "warning", "error"}:
            raise ConfigError(f"PROCESSOR_LOG_LEVEL={values['log_level']!r}: unknown level")
        if values.get("log_format", "json") not in {"json", "console"}:
            raise ConfigError(
                f"PROCESSOR_LOG_FORMAT={values['log_format']!r}: unknown format (json or console)"
            )
        settings = cls(**values)
        problem = settings._kafka_security_problem()
        if problem is not None:
            raise ConfigError(problem)
        return settings

    def _kafka_security_problem(self) -> str | None:
        return kafka_security_problem(
            self.kafka_security_protocol,
            **{name: getattr(self, f"kafka_{name}") for name in KAFKA_SECURITY_VARS},
        )

    def kafka_access(self) -> KafkaAccess:
        """How every Kafka client of the processor reaches the brokers (bootstrap, security).

        Reads the password files (a :class:`ConfigError` names the variable).
        """
        self.require("kafka_bootstrap_servers")
        assert self.kafka_bootstrap_servers is not None
        password = self.kafka_sasl_password
        if self.kafka_sasl_password_file is not None:
            password = read_secret_file(self.kafka_sasl_password_file, "KAFKA_SASL_PASSWORD_FILE")
        key_password = None
        if self.kafka_ssl_key_password_file is not None:
            key_password = read_secret_file(
                self.kafka_ssl_key_password_file, "KAFKA_SSL_KEY_PASSWORD_FILE"
            )
        return KafkaAccess(
            self.kafka_bootstrap_servers,
            security_protocol=self.kafka_security_protocol,
            sasl_mechanism=self.kafka_sasl_mechanism,
            sasl_username=self.kafka_sasl_username,
            sasl_password=password,
            ssl_cafile=self.kafka_ssl_cafile,
            ssl_certfile=self.kafka_ssl_certfile,
            ssl_keyfile=self.kafka_ssl_keyfile,
            ssl_key_password=key_password,
        )

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
