"""How the processor reaches Kafka: the bootstrap list, TLS and SASL, and their secrets.

The Kafka edge's settings, apart from the clients (:mod:`processor.kafka`) so that the
settings (:mod:`processor.config`) can build a :class:`KafkaAccess` without importing the
clients, and the clients need nothing from the settings.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from aiokafka.helpers import create_ssl_context

from processor.errors import ConfigError

__all__ = [
    "KAFKA_SECURITY_VARS",
    "SASL_MECHANISMS",
    "SECURITY_PROTOCOLS",
    "KafkaAccess",
    "Secret",
    "kafka_security_problem",
    "read_secret_file",
    "ssl_reason",
]

#: KAFKA_SECURITY_PROTOCOL values (aiokafka's ``security_protocol``).
SECURITY_PROTOCOLS: Final = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
#: KAFKA_SASL_MECHANISM values. SCRAM: the password itself never crosses the wire.
SASL_MECHANISMS: Final = ("SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN")
#: The optional Kafka security options, by the env var that sets each.
KAFKA_SECURITY_VARS: Final = {
    "sasl_mechanism": "KAFKA_SASL_MECHANISM",
    "sasl_username": "KAFKA_SASL_USERNAME",
    "sasl_password_file": "KAFKA_SASL_PASSWORD_FILE",
    "sasl_password": "KAFKA_SASL_PASSWORD",
    "ssl_cafile": "KAFKA_SSL_CAFILE",
    "ssl_certfile": "KAFKA_SSL_CERTFILE",
    "ssl_keyfile": "KAFKA_SSL_KEYFILE",
    "ssl_key_password_file": "KAFKA_SSL_KEY_PASSWORD_FILE",
}


@dataclass(frozen=True, slots=True, repr=False)
class Secret:
    """A password: ``repr()`` and ``str()`` show ``***``; :meth:`reveal` gives the value."""

    _value: str

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def read_secret_file(path: Path, env: str) -> Secret:
    """The secret in ``path`` (one trailing newline dropped); errors name ``env``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{env}={str(path)!r}: cannot read it ({reason})") from None
    value = text.removesuffix("\n").removesuffix("\r")
    if not value:
        raise ConfigError(f"{env}={str(path)!r}: the file is empty")
    return Secret(value)


def kafka_security_problem(protocol: str, **options: object) -> str | None:
    """What is wrong with a combination of Kafka security options, naming the env vars.

    ``options`` are the keys of ``KAFKA_SECURITY_VARS``; None means not given.
    """
    if protocol not in SECURITY_PROTOCOLS:
        known = ", ".join(SECURITY_PROTOCOLS)
        return f"KAFKA_SECURITY_PROTOCOL={protocol!r}: must be one of {known}"
    given = {KAFKA_SECURITY_VARS[name] for name, value in options.items() if value is not None}
    sasl = protocol.startswith("SASL_")
    tls = protocol in ("SSL", "SASL_SSL")
    for needs, applies, what in ((sasl, "KAFKA_SASL_", "SASL"), (tls, "KAFKA_SSL_", "TLS")):
        stray = sorted(v for v in given if v.startswith(applies))
        if stray and not needs:
            return (
                f"{', '.join(stray)} set, but KAFKA_SECURITY_PROTOCOL={protocol} uses no {what}: "
                f"set KAFKA_SECURITY_PROTOCOL (SSL, SASL_SSL or SASL_PLAINTEXT) or unset them"
            )
    mechanism = options.get("sasl_mechanism")
    if mechanism is not None and mechanism not in SASL_MECHANISMS:
        return f"KAFKA_SASL_MECHANISM={mechanism!r}: must be one of {', '.join(SASL_MECHANISMS)}"
    if sasl:
        if "KAFKA_SASL_MECHANISM" not in given:
            return (
                f"KAFKA_SASL_MECHANISM is required with KAFKA_SECURITY_PROTOCOL={protocol}: "
                f"one of {', '.join(SASL_MECHANISMS)}"
            )
        if "KAFKA_SASL_USERNAME" not in given:
            return f"KAFKA_SASL_USERNAME is required with KAFKA_SECURITY_PROTOCOL={protocol}"
        passwords = {"KAFKA_SASL_PASSWORD_FILE", "KAFKA_SASL_PASSWORD"} & given
        if not passwords:
            return (
                "KAFKA_SASL_PASSWORD_FILE (preferred) or KAFKA_SASL_PASSWORD is required with "
                f"KAFKA_SECURITY_PROTOCOL={protocol}"
            )
        if len(passwords) > 1:
            return "set KAFKA_SASL_PASSWORD_FILE (preferred) or KAFKA_SASL_PASSWORD, not both"
    for var in ("KAFKA_SSL_KEYFILE", "KAFKA_SSL_KEY_PASSWORD_FILE"):
        if var in given and "KAFKA_SSL_CERTFILE" not in given:
            return f"{var} needs KAFKA_SSL_CERTFILE (the client certificate)"
    return None


@dataclass(frozen=True, slots=True)
class KafkaAccess:
    """How to reach the brokers: the bootstrap list and the security options.

    ``KafkaAccess("broker:9092")`` is plaintext. TLS (``SSL``, ``SASL_SSL``) always verifies
    the broker's certificate and host name, against ``ssl_cafile`` or the system's CAs;
    ``ssl_certfile`` (+ ``ssl_keyfile``, ``ssl_key_password``) adds a client certificate.
    SASL needs ``sasl_mechanism``, ``sasl_username`` and ``sasl_password``. A bad
    combination or an unreadable file raises :class:`ConfigError` naming the setting's
    environment variable. Passwords are :class:`Secret`: never in ``repr()``.
    Build it from the settings with :meth:`processor.config.Settings.kafka_access`.
    """

    bootstrap: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password: Secret | None = None
    #: Built once from the ssl_* files (TLS protocols only); shared by every client.
    ssl_context: ssl.SSLContext | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.bootstrap.strip():
            raise ConfigError("KAFKA_BOOTSTRAP_SERVERS is empty")
        problem = kafka_security_problem(
            self.security_protocol,
            sasl_mechanism=self.sasl_mechanism,
            sasl_username=self.sasl_username,
            sasl_password=self.sasl_password,
            ssl_cafile=self.ssl_cafile,
            ssl_certfile=self.ssl_certfile,
            ssl_keyfile=self.ssl_keyfile,
            ssl_key_password_file=self.ssl_key_password,
        )
        if problem is not None:
            raise ConfigError(problem)
        if self.security_protocol in ("SSL", "SASL_SSL"):
            object.__setattr__(self, "ssl_context", self._tls_context())

    def _tls_context(self) -> ssl.SSLContext:
        cafile = str(self.ssl_cafile) if self.ssl_cafile is not None else None
        try:  # check_hostname and CERT_REQUIRED: on, and not configurable
            context: ssl.SSLContext = create_ssl_context(cafile=cafile)
        except OSError as exc:
            raise ConfigError(
                f"KAFKA_SSL_CAFILE={cafile!r}: cannot load CA certificates from it "
                f"({ssl_reason(exc)}; PEM expected)"
            ) from None
        if self.ssl_certfile is None:
            return context
        key_password = self.ssl_key_password

        def password() -> str:
            if key_password is None:
                raise ConfigError(
                    "the client key is encrypted: set KAFKA_SSL_KEY_PASSWORD_FILE "
                    f"(KAFKA_SSL_KEYFILE={str(self.ssl_keyfile or self.ssl_certfile)!r})"
                )
            return key_password.reveal()

        try:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile, password=password)
        except OSError as exc:
            raise ConfigError(
                f"KAFKA_SSL_CERTFILE={str(self.ssl_certfile)!r}, KAFKA_SSL_KEYFILE="
                f"{str(self.ssl_keyfile or self.ssl_certfile)!r}: cannot load the client "
                f"certificate and key ({ssl_reason(exc)}): not PEM, a key of another "
                "certificate, or a wrong KAFKA_SSL_KEY_PASSWORD_FILE?"
            ) from None
        return context

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    def connection_options(self) -> dict[str, Any]:
        """aiokafka's security keyword arguments (no bootstrap): for clients and connections.

        The only place a password is revealed: handed to aiokafka, never logged.
        """
        options: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.ssl_context is not None:
            options["ssl_context"] = self.ssl_context
        if self.uses_sasl:
            assert self.sasl_password is not None
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password.reveal()
        return options

    def client_options(self) -> dict[str, Any]:
        """aiokafka's keyword arguments for a producer, consumer or admin client."""
        return {"bootstrap_servers": self.bootstrap, **self.connection_options()}


def ssl_reason(exc: OSError) -> str:
    """An OSError (an SSLError too) in a few words."""
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    return exc.strerror or str(exc) or type(exc).__name__
