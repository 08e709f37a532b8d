"""Fixtures shared by all tests: the real Kafka and PostgreSQL, a schema and topics per test.

Where the services come from (``stack_endpoints``), first match wins:

1. ``KAFKA_BOOTSTRAP_SERVERS`` and ``DATABASE_URL`` in the environment (``ops/dev test`` sets
   them to the local stack; CI or a developer may point them anywhere);
2. ``PROCESSOR_TEST_TESTCONTAINERS=1`` and a reachable Docker engine: throwaway containers
   (apache/kafka in KRaft mode, postgres:18);
3. the local stack: ``ops/stack up`` (left running afterwards; ``ops/stack down`` stops it).

Tests under tests/integration/ get the ``integration`` marker automatically; those under
tests/platform/ (checks of PostgreSQL and Kafka themselves) get ``platform`` and
``integration``.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from tests.support import ROOT, NewTopic, TopicAdmin, docker_reachable, testcontainers_stack

__all__ = ["Endpoints", "NewTopic"]

INTEGRATION_DIR = ROOT / "tests" / "integration"
PLATFORM_DIR = ROOT / "tests" / "platform"


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where the tests' Kafka and PostgreSQL are."""

    kafka_bootstrap: str
    database_url: str


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(item.path)
        if path.is_relative_to(PLATFORM_DIR):
            item.add_marker(pytest.mark.platform)
        if path.is_relative_to(INTEGRATION_DIR) or path.is_relative_to(PLATFORM_DIR):
            item.add_marker(pytest.mark.integration)


def _local_stack() -> Endpoints:
    up = subprocess.run([ROOT / "ops" / "stack", "up"], capture_output=True, text=True)
    if up.returncode != 0:
        pytest.fail(f"`ops/stack up` failed:\n{up.stderr}", pytrace=False)
    env = subprocess.run(
        [ROOT / "ops" / "stack", "env", "--json"], capture_output=True, text=True, check=True
    )
    values = json.loads(env.stdout)
    return Endpoints(values["KAFKA_BOOTSTRAP_SERVERS"], values["DATABASE_URL"])


@pytest.fixture(scope="session")
def stack_endpoints() -> Iterator[Endpoints]:
    kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    database = os.environ.get("DATABASE_URL", "").strip()
    if kafka and database:
        yield Endpoints(kafka, database)
    elif os.environ.get("PROCESSOR_TEST_TESTCONTAINERS") == "1" and docker_reachable():
        with testcontainers_stack() as (kafka, database):
            yield Endpoints(kafka, database)
    else:
        yield _local_stack()


@pytest.fixture
async def db_schema(stack_endpoints: Endpoints) -> AsyncIterator[str]:
    """A fresh, empty schema ``t_<12 hex>`` for this test; dropped (CASCADE) after it."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(stack_endpoints.database_url)
    try:
        await conn.execute(f"CREATE SCHEMA {name}")
    finally:
        await conn.close()
    yield name
    # A new connection: the test may have restarted the server meanwhile.
    conn = await asyncpg.connect(stack_endpoints.database_url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    finally:
        await conn.close()


@pytest.fixture
async def pg(stack_endpoints: Endpoints, db_schema: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection whose search_path is the test's schema."""
    conn = await asyncpg.connect(
        stack_endpoints.database_url, server_settings={"search_path": db_schema}
    )
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def pg_pool(stack_endpoints: Endpoints, db_schema: str) -> AsyncIterator[asyncpg.Pool]:
    """A small pool (1-4 connections) whose search_path is the test's schema."""
    pool = await asyncpg.create_pool(
        stack_endpoints.database_url,
        min_size=1,
        max_size=4,
        server_settings={"search_path": db_schema},
    )
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def new_topic(stack_endpoints: Endpoints) -> AsyncIterator[NewTopic]:
    """``await new_topic(partitions=1) -> name``: a uuid-named topic, deleted after the test."""
    admin = TopicAdmin(stack_endpoints.kafka_bootstrap)
    try:
        yield admin.create
    finally:
        await admin.close()
