"""Kafka security settings: parsed, cross-checked, errors naming the variable, secrets hidden."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from processor.cli import _parser
from processor.client import Client
from processor.config import ENV_VARS, Secret, Settings
from processor.errors import ConfigError
from processor.kafka import clients as kafka
from processor.kafka.clients import KafkaAccess
from tests.pki import CLIENT_KEY_PASSWORD, Pki, make_pki

PASSWORD = "s3cret-pa55word"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "password"
    path.write_text(PASSWORD + "\n")
    return path


@pytest.fixture
def sasl_ssl(pki: Pki, password_file: Path) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9094",
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "processor",
        "KAFKA_SASL_PASSWORD_FILE": str(password_file),
        "KAFKA_SSL_CAFILE": str(pki.ca),
    }


def test_the_default_is_plaintext_with_no_tls_and_no_sasl() -> None:
    access = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": "b:9092"}).kafka_access()
    assert access.security_protocol == "PLAINTEXT"
    assert access.ssl_context is None
    assert access.client_options() == {
        "bootstrap_servers": "b:9092",
        "security_protocol": "PLAINTEXT",
    }


def test_every_security_setting_is_an_env_var_and_a_flag() -> None:
    names = {
        "KAFKA_SECURITY_PROTOCOL",
        "KAFKA_SASL_MECHANISM",
        "KAFKA_SASL_USERNAME",
        "KAFKA_SASL_PASSWORD_FILE",
        "KAFKA_SASL_PASSWORD",
        "KAFKA_SSL_CAFILE",
        "KAFKA_SSL_CERTFILE",
        "KAFKA_SSL_KEYFILE",
        "KAFKA_SSL_KEY_PASSWORD_FILE",
    }
    assert names <= ENV_VARS
    args = _parser().parse_args(
        ["--kafka-security-protocol", "sasl_ssl", "--kafka-sasl-password-file", "/p", "topics"]
    )
    assert args.KAFKA_SECURITY_PROTOCOL == "sasl_ssl"
    assert args.KAFKA_SASL_PASSWORD_FILE == "/p"


def test_sasl_ssl_settings_give_a_verifying_tls_context_and_the_sasl_login(
    sasl_ssl: dict[str, str],
) -> None:
    access = Settings.from_env({**sasl_ssl, "KAFKA_SECURITY_PROTOCOL": "sasl_ssl"}).kafka_access()
    assert access.security_protocol == "SASL_SSL"
    assert access.ssl_context is not None
    assert access.ssl_context.check_hostname is True
    assert access.ssl_context.verify_mode == ssl.CERT_REQUIRED
    options = access.client_options()
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "processor"
    assert options["sasl_plain_password"] == PASSWORD  # one trailing newline dropped
    assert options["ssl_context"] is access.ssl_context


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"KAFKA_SASL_MECHANISM": None}, "KAFKA_SASL_MECHANISM is required"),
        ({"KAFKA_SASL_USERNAME": None}, "KAFKA_SASL_USERNAME is required"),
        ({"KAFKA_SASL_PASSWORD_FILE": None}, "KAFKA_SASL_PASSWORD_FILE (preferred) or"),
        ({"KAFKA_SASL_PASSWORD": PASSWORD}, "not both"),
        ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL='TLS'"),
        ({"KAFKA_SASL_MECHANISM": "GSSAPI"}, "KAFKA_SASL_MECHANISM='GSSAPI'"),
        ({"KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"}, "KAFKA_SSL_CAFILE='/nonexistent/ca.pem'"),
        ({"KAFKA_SASL_PASSWORD_FILE": "/nonexistent/pw"}, "KAFKA_SASL_PASSWORD_FILE="),
        ({"KAFKA_SSL_KEYFILE": __file__}, "KAFKA_SSL_KEYFILE needs KAFKA_SSL_CERTFILE"),
        ({"KAFKA_SECURITY_PROTOCOL": "SSL"}, "KAFKA_SASL_"),  # SASL settings without SASL
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}, "KAFKA_SSL_CAFILE set, but"),
    ],
)
def test_a_bad_combination_is_a_config_error_naming_the_variable(
    sasl_ssl: dict[str, str], change: dict[str, str | None], needle: str
) -> None:
    env = {k: v for k, v in {**sasl_ssl, **change}.items() if v is not None}
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert needle in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_an_empty_password_file_is_an_error_naming_it(
    sasl_ssl: dict[str, str], tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    settings = Settings.from_env({**sasl_ssl, "KAFKA_SASL_PASSWORD_FILE": str(empty)})
    with pytest.raises(ConfigError, match=r"KAFKA_SASL_PASSWORD_FILE=.*empty"):
        settings.kafka_access()


def test_a_ca_file_that_is_not_pem_is_an_error_naming_kafka_ssl_cafile(
    sasl_ssl: dict[str, str], password_file: Path
) -> None:
    settings = Settings.from_env({**sasl_ssl, "KAFKA_SSL_CAFILE": str(password_file)})
    with pytest.raises(ConfigError, match=r"KAFKA_SSL_CAFILE=.*cannot load CA certificates"):
        settings.kafka_access()


def test_an_encrypted_client_key_needs_its_password_file(
    sasl_ssl: dict[str, str], pki: Pki
) -> None:
    mutual = {
        **sasl_ssl,
        "KAFKA_SSL_CERTFILE": str(pki.client_cert),
        "KAFKA_SSL_KEYFILE": str(pki.client_key),
    }
    with pytest.raises(ConfigError, match="encrypted: set KAFKA_SSL_KEY_PASSWORD_FILE"):
        Settings.from_env(mutual).kafka_access()
    wrong = pki.dir / "wrong-key-password"
    wrong.write_text("nope\n")
    with pytest.raises(ConfigError, match=r"KAFKA_SSL_CERTFILE=.*wrong KAFKA_SSL_KEY_PASSWORD"):
        Settings.from_env({**mutual, "KAFKA_SSL_KEY_PASSWORD_FILE": str(wrong)}).kafka_access()
    access = Settings.from_env(
        {**mutual, "KAFKA_SSL_KEY_PASSWORD_FILE": str(pki.client_key_password)}
    ).kafka_access()
    assert access.ssl_context is not None
    assert access.ssl_key_password == Secret(CLIENT_KEY_PASSWORD)


def test_no_secret_shows_in_repr_str_or_settings(sasl_ssl: dict[str, str], pki: Pki) -> None:
    inline = {**sasl_ssl, "KAFKA_SASL_PASSWORD": PASSWORD}
    del inline["KAFKA_SASL_PASSWORD_FILE"]
    settings = Settings.from_env(inline)
    access = settings.kafka_access()
    mutual = Settings.from_env(
        {
            **sasl_ssl,
            "KAFKA_SSL_CERTFILE": str(pki.client_cert),
            "KAFKA_SSL_KEYFILE": str(pki.client_key),
            "KAFKA_SSL_KEY_PASSWORD_FILE": str(pki.client_key_password),
        }
    ).kafka_access()
    for shown in (repr(settings), str(settings), repr(access), str(access), repr(mutual)):
        assert PASSWORD not in shown
        assert CLIENT_KEY_PASSWORD not in shown
    assert repr(Secret(PASSWORD)) == str(Secret(PASSWORD)) == "Secret('***')"
    assert f"{Secret(PASSWORD)}" == "Secret('***')"


def test_a_kafka_access_made_in_code_is_checked_like_the_settings() -> None:
    with pytest.raises(ConfigError, match="KAFKA_SASL_USERNAME is required"):
        KafkaAccess(
            "b:9093",
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-256",
            sasl_password=Secret(PASSWORD),
        )
    with pytest.raises(ConfigError, match="KAFKA_BOOTSTRAP_SERVERS is empty"):
        KafkaAccess(" ")


async def test_the_client_takes_a_bootstrap_string_or_a_kafka_access(
    sasl_ssl: dict[str, str],
) -> None:
    plain = Client("127.0.0.1:1")
    assert plain.access == KafkaAccess("127.0.0.1:1")
    assert plain.bootstrap == "127.0.0.1:1"
    access = Settings.from_env(sasl_ssl).kafka_access()
    secure = Client(access)
    assert secure.access is access
    assert secure.bootstrap == "127.0.0.1:9094"


async def test_every_factory_builds_its_client_with_the_security_options(
    sasl_ssl: dict[str, str],
) -> None:
    access = Settings.from_env(sasl_ssl).kafka_access()
    producer = kafka.make_producer(access)
    consumer = kafka.make_consumer(access, None)
    admin = kafka.admin_client(access)
    try:
        for client in (producer.client, consumer._client, admin._client):
            assert client._security_protocol == "SASL_SSL"
            assert client._ssl_context is access.ssl_context
            assert client._sasl_mechanism == "SCRAM-SHA-512"
            assert client._sasl_plain_password == PASSWORD
    finally:
        await producer.stop()
        await consumer.stop()
        await admin.close()
