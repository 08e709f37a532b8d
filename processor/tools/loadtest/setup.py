"""Before the load: the settings and entity, the rows, the workers, stale versions."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

from processor.client import Client
from processor.config import Settings
from processor.db.registry import Entity, load_registry, quote
from processor.errors import (
    ConfigError,
    ProcessorError,
)
from processor.kafka import clients as kafka
from processor.tools.loadtest.model import LoadOptions
from processor.tools.text import counted as _n
from processor.tools.workers import settings_env


async def prepare(settings: Settings, opts: LoadOptions) -> tuple[Settings, Entity]:
    """Tables, ledger and topics (idempotent); the validated counter entity."""
    from processor.db.ledger import Ledger
    from processor.tools.demo import DEFAULT_REGISTRY, install_demo

    settings.require("database_url", "kafka_bootstrap_servers")
    assert settings.database_url is not None
    assert settings.kafka_bootstrap_servers is not None
    registry_path = settings.entities or DEFAULT_REGISTRY
    if (registry_path.parent / "schema.sql").is_file():  # the demo's: its tables, ledger, topics
        await install_demo(settings)
        settings = _replace(settings, entities=registry_path)
    else:
        assert settings.kafka_bootstrap_servers is not None
        await kafka.ensure_topics(
            settings.kafka_access(),
            [settings.request_topic, settings.reply_topic, settings.dlq_topic],
            partitions=settings.partitions,
            replication=settings.replication_factor,
        )
    conn = await asyncpg.connect(settings.database_url, timeout=30)
    try:
        await Ledger(settings.ledger_schema).migrate(conn)
        registry = await load_registry(conn, registry_path)
    finally:
        await conn.close()
    entity = registry.get(opts.entity)
    if entity is None:
        raise ConfigError(f"entity {opts.entity!r} is not in {registry_path}")
    column = entity.attributes.get("n")
    if entity.key_kind != "int" or column is None or column.category != "N":
        raise ConfigError(
            f"entity {opts.entity!r} must have an integer key and a numeric attribute `n`"
        )
    if not entity.optimistic_concurrency:
        raise ConfigError(f"entity {opts.entity!r} needs optimistic_concurrency = true")
    return settings, entity


def _replace(settings: Settings, **changes: Any) -> Settings:
    values = {name: getattr(settings, name) for name in settings.__dataclass_fields__}
    return Settings(**{**values, **changes})


async def reset_rows(conn: asyncpg.Connection, entity: Entity, opts: LoadOptions) -> None:
    table, key = entity.qualified, quote(entity.key.name)
    last = opts.first_id + opts.rows + opts.delete_rows - 1
    async with conn.transaction():
        await conn.execute(
            f"DELETE FROM {table} WHERE {key} BETWEEN $1 AND $2",  # noqa: S608
            opts.first_id,
            last,
        )
        await conn.execute(
            f"INSERT INTO {table} ({key}, n) SELECT g, 0 FROM generate_series($1::int, $2) g",  # noqa: S608
            opts.first_id,
            last,
        )


class Workers:
    """``--with-worker N``: N ``processor run`` subprocesses for the run's duration."""

    def __init__(self, settings: Settings, count: int, logdir: Path | None = None) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        #: A temporary directory is ours to remove; one the user named is not.
        self.temporary = logdir is None
        if logdir is None:
            self.logdir = Path(tempfile.mkdtemp(prefix="processor-loadtest-"))
        else:
            logdir.mkdir(parents=True, exist_ok=True)
            self.logdir = logdir
        print(f"loadtest: {_n(count, 'worker')}, logs in {self.logdir}", file=sys.stderr)
        env = settings_env(settings)
        for i in range(count):
            with open(self.logdir / f"worker-{i}.log", "wb") as log:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "processor", "run"],
                        # N workers on one host: each its own transactional id
                        env={**env, "PROCESSOR_WORKER_ID": f"loadtest-{i}"},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )

    def check(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                raise ProcessorError(
                    f"worker {i} exited with {proc.returncode}; log: {self.logdir}/worker-{i}.log"
                )

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs:
            try:
                await asyncio.to_thread(proc.wait, max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)

    def clean_exit(self) -> bool:
        return all(proc.returncode == 0 for proc in self.procs)

    def settle_logs(self, ok: bool) -> dict[str, Any]:
        """Remove a temporary log directory after a clean run; say where the logs are."""
        if self.temporary and ok and self.clean_exit():
            shutil.rmtree(self.logdir, ignore_errors=True)
            print(f"loadtest: worker logs removed ({self.logdir}): a clean run", file=sys.stderr)
            return {"dir": str(self.logdir), "kept": False}
        why = "" if ok and self.clean_exit() else " (a worker or an invariant failed)"
        print(f"loadtest: worker logs kept in {self.logdir}{why}", file=sys.stderr)
        return {"dir": str(self.logdir), "kept": True}


async def stale_versions(client: Client, entity: Entity, rows: Sequence[int]) -> dict[int, str]:
    gate = asyncio.Semaphore(64)

    async def one(row: int) -> tuple[int, str]:
        async with gate:
            reply = await client.retrieve(entity.name, row, timeout=max(30.0, client.timeout))
            assert reply.row_version is not None
            return row, reply.row_version

    return dict(await asyncio.gather(*(one(r) for r in rows)))
