"""Kafka over SASL_SSL (SCRAM logins, TLS with client certificates) on a real broker.

A private broker (its own `ops/stack` state dir and ports, started once for the module; the
session's stack is not touched) gets a SASL_SSL listener with certificates made here
(tests/pki.py) and a SCRAM user, and requires a client certificate signed by the same CA.
Over it: a `processor run` worker serves a :class:`processor.client.Client`, and
`processor topics`, `send` and `audit` work. Wrong passwords, a plaintext client on the TLS
port, a CA that signed nothing of the broker's and a missing client certificate each fail
with one clear message naming what to check, and no traceback. The database is the
session's PostgreSQL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from processor.client import Client
from processor.config import Settings
from processor.errors import ConfigError
from processor.kafka.clients import KafkaAccess
from tests.conftest import Endpoints
from tests.integration.harness import REGISTRY, TABLE_SQL, Scenario
from tests.pki import Pki, make_pki
from tests.support import ROOT, free_port

STACK = ROOT / "ops" / "stack"
WRONG_PASSWORD = "not-the-password-4711"  # what the tests must never print


@dataclass(frozen=True)
class SecureKafka:
    """The private broker: a PLAINTEXT and a SASL_SSL listener, the SCRAM user, the PKI."""

    plaintext: str
    sasl_ssl: str
    password_file: Path
    pki: Pki
    tmp: Path

    def env(self, **changes: str | None) -> dict[str, str]:
        """The processor's settings for the SASL_SSL listener, with a client certificate;
        ``changes`` override them (None: unset)."""
        values: dict[str, str | None] = {
            "KAFKA_BOOTSTRAP_SERVERS": self.sasl_ssl,
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": "processor",
            "KAFKA_SASL_PASSWORD_FILE": str(self.password_file),
            "KAFKA_SSL_CAFILE": str(self.pki.ca),
            "KAFKA_SSL_CERTFILE": str(self.pki.client_cert),
            "KAFKA_SSL_KEYFILE": str(self.pki.client_key),
            "KAFKA_SSL_KEY_PASSWORD_FILE": str(self.pki.client_key_password),
        }
        values.update(changes)
        return {k: v for k, v in values.items() if v is not None}

    def access(self, **changes: str | None) -> KafkaAccess:
        return Settings.from_env(self.env(**changes)).kafka_access()

    def wrong_password_file(self) -> Path:
        path = self.tmp / "wrong-password"
        path.write_text(WRONG_PASSWORD + "\n")
        return path


def _clean_env() -> dict[str, str]:
    """os.environ without the session's Kafka, database and stack settings."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KAFKA_", "PROCESSOR_STACK_")) and k != "DATABASE_URL"
    }


@pytest.fixture(scope="module")
def secure_kafka() -> Iterator[SecureKafka]:
    tmp = Path(tempfile.mkdtemp(prefix="processor-kafka-security-"))
    pki = make_pki(tmp / "pki")
    ports: set[int] = set()
    while len(ports) < 4:
        ports.add(free_port())
    kafka, controller, pg, sasl_ssl = sorted(ports)
    env = _clean_env()
    env.update(
        PROCESSOR_STACK_DIR=str(tmp / "stack"),
        PROCESSOR_STACK_KAFKA_PORT=str(kafka),
        PROCESSOR_STACK_CONTROLLER_PORT=str(controller),
        PROCESSOR_STACK_PG_PORT=str(pg),
        PROCESSOR_STACK_KAFKA_SASL_SSL_PORT=str(sasl_ssl),
        PROCESSOR_STACK_KAFKA_TLS_DIR=str(pki.dir),
        PROCESSOR_STACK_KAFKA_TLS_CLIENT_AUTH="required",
    )

    def stack(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [STACK, *args], env=env, capture_output=True, text=True, timeout=300, check=False
        )

    try:
        up = stack("up")
        assert up.returncode == 0, up.stderr
        settings = json.loads(stack("env", "--json", "--sasl-ssl").stdout)
        assert settings["KAFKA_BOOTSTRAP_SERVERS"] == f"127.0.0.1:{sasl_ssl}"
        assert settings["KAFKA_SSL_CAFILE"] == str(pki.ca)
        yield SecureKafka(
            plaintext=f"127.0.0.1:{kafka}",
            sasl_ssl=settings["KAFKA_BOOTSTRAP_SERVERS"],
            password_file=Path(settings["KAFKA_SASL_PASSWORD_FILE"]),
            pki=pki,
            tmp=tmp,
        )
    finally:
        stack("down", "--immediate")
        shutil.rmtree(tmp, ignore_errors=True)


def processor(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "processor", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def assert_one_clear_error(out: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 2 (configuration), the reason on stderr in a line or two, no traceback, no secret."""
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) <= 3, out.stderr  # aiokafka's line + ours
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("processor: configuration error: "), out.stderr
    for needle in needles:
        assert needle in last, out.stderr
    assert WRONG_PASSWORD not in out.stderr + out.stdout


async def test_a_worker_serves_a_client_and_the_tools_work_over_sasl_ssl_with_mutual_tls(
    secure_kafka: SecureKafka,
    stack_endpoints: Endpoints,
    db_schema: str,
    pg: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    """topics, migrate, run, Client, send and audit: every Kafka client over SCRAM + TLS."""
    await pg.execute(TABLE_SQL.format(schema=db_schema))
    await pg.execute("INSERT INTO acct (id) SELECT generate_series(1, 3)")
    (tmp_path / "entities.toml").write_text(REGISTRY.format(schema=db_schema))
    s = Scenario(secure_kafka.sasl_ssl, stack_endpoints.database_url, db_schema, tmp_path)
    secure = secure_kafka.env(PROCESSOR_PARTITIONS="2")

    topics = processor(s.env(**secure), "topics")
    assert topics.returncode == 0, topics.stderr
    assert topics.stdout.split() == [
        f"{s.request_topic}:",
        "created",
        f"{s.reply_topic}:",
        "created",
        f"{s.dlq_topic}:",
        "created",
    ]
    migrate = processor(s.env(**secure), "migrate")
    assert migrate.returncode == 0, migrate.stderr
    worker = s.start_worker(**secure)
    try:
        access = secure_kafka.access()
        assert access.ssl_context is not None
        async with Client(
            access, request_topic=s.request_topic, reply_topic=s.reply_topic, timeout=60
        ) as client:
            for key in (1, 2, 3):
                reply = await client.update("acct", key, {"balance": 10 * key, "seq": 1})
                assert reply.status == "success"
            row = await client.retrieve("acct", 2)
            assert row.attributes is not None
            assert row.attributes["balance"] == 20
        rows = await pg.fetch("SELECT id, balance FROM acct ORDER BY id")
        assert [(r["id"], r["balance"]) for r in rows] == [(1, 10), (2, 20), (3, 30)]

        send = processor(
            s.env(**secure),
            "send",
            '{"type": "update", "entity": "acct", "id": 3, "attributes": {"balance": 33}}',
        )
        assert send.returncode == 0, send.stderr
        assert json.loads(send.stdout)["status"] == "success"
        assert await pg.fetchval("SELECT balance FROM acct WHERE id = 3") == 33

        audit = processor(s.env(**secure), "audit", "--json", "--quiet")
        assert audit.returncode == 0, audit.stdout + audit.stderr
        report = json.loads(audit.stdout)
        assert report["ok"] is True
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, s.logs()
    assert "Traceback" not in s.logs()


async def test_a_wrong_password_is_one_clear_configuration_error_for_every_client(
    secure_kafka: SecureKafka,
    stack_endpoints: Endpoints,
    db_schema: str,
    pg: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    """topics (admin), send (the client), run (the worker) and the library's Client."""
    wrong = secure_kafka.env(KAFKA_SASL_PASSWORD_FILE=str(secure_kafka.wrong_password_file()))
    login = "refused the SASL login of user 'processor' (SCRAM-SHA-512)"
    env = {**_clean_env(), **wrong}

    assert_one_clear_error(processor(env, "topics"), login, "KAFKA_SASL_PASSWORD_FILE")
    retrieve = '{"type": "retrieve", "entity": "acct", "id": 1}'
    assert_one_clear_error(processor(env, "send", retrieve), login)

    await pg.execute(TABLE_SQL.format(schema=db_schema))
    (tmp_path / "entities.toml").write_text(REGISTRY.format(schema=db_schema))
    s = Scenario(secure_kafka.sasl_ssl, stack_endpoints.database_url, db_schema, tmp_path)
    assert processor(s.env(), "migrate").returncode == 0
    assert_one_clear_error(processor(s.env(**wrong), "run"), login)

    with pytest.raises(ConfigError, match="refused the SASL login") as caught:
        async with Client(
            secure_kafka.access(KAFKA_SASL_PASSWORD=WRONG_PASSWORD, KAFKA_SASL_PASSWORD_FILE=None)
        ):
            pass
    assert WRONG_PASSWORD not in str(caught.value)


async def test_a_plaintext_client_on_the_tls_port_is_told_it_is_a_tls_listener(
    secure_kafka: SecureKafka,
) -> None:
    env = {**_clean_env(), "KAFKA_BOOTSTRAP_SERVERS": secure_kafka.sasl_ssl}
    assert_one_clear_error(
        processor(env, "topics"), "it is a TLS listener, but KAFKA_SECURITY_PROTOCOL=PLAINTEXT"
    )
    with pytest.raises(ConfigError, match="TLS listener"):
        async with Client(secure_kafka.sasl_ssl):
            pass


async def test_a_tls_client_on_the_plaintext_port_is_told_to_check_the_protocol(
    secure_kafka: SecureKafka,
) -> None:
    env = {
        **_clean_env(),
        "KAFKA_BOOTSTRAP_SERVERS": secure_kafka.plaintext,
        "KAFKA_SECURITY_PROTOCOL": "SSL",
        "KAFKA_SSL_CAFILE": str(secure_kafka.pki.ca),
    }
    assert_one_clear_error(
        processor(env, "topics"),
        "answers without TLS (a plaintext listener), but KAFKA_SECURITY_PROTOCOL=SSL",
    )


async def test_a_mechanism_the_listener_does_not_enable_is_named(
    secure_kafka: SecureKafka,
) -> None:
    env = {**_clean_env(), **secure_kafka.env(KAFKA_SASL_MECHANISM="PLAIN")}
    assert_one_clear_error(
        processor(env, "topics"), "KAFKA_SASL_MECHANISM=PLAIN", "does not enable"
    )


async def test_a_ca_that_did_not_sign_the_broker_certificate_fails_verification(
    secure_kafka: SecureKafka,
) -> None:
    env = {**_clean_env(), **secure_kafka.env(KAFKA_SSL_CAFILE=str(secure_kafka.pki.rogue_ca))}
    assert_one_clear_error(processor(env, "topics"), "failed verification", "KAFKA_SSL_CAFILE")


async def test_the_broker_refuses_a_client_without_a_certificate_of_its_ca(
    secure_kafka: SecureKafka,
) -> None:
    """Mutual TLS is enforced: the happy path above really used the client certificate."""
    env = {
        **_clean_env(),
        **secure_kafka.env(
            KAFKA_SSL_CERTFILE=None, KAFKA_SSL_KEYFILE=None, KAFKA_SSL_KEY_PASSWORD_FILE=None
        ),
    }
    assert_one_clear_error(processor(env, "topics"), "client certificate")
