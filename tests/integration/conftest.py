"""Fixtures of the integration tests that run real workers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from processor.client import Client
from tests.conftest import Endpoints
from tests.integration.engine_kit import Kit
from tests.integration.harness import Scenario


@pytest.fixture
async def scenario(
    stack_endpoints: Endpoints, db_schema: str, pg: asyncpg.Connection, tmp_path: Path
) -> AsyncIterator[Scenario]:
    """Uuid topics, a group, the test's schema (tables + ledger) and registry; workers
    started through it are killed at the end."""
    s = Scenario(stack_endpoints.kafka_bootstrap, stack_endpoints.database_url, db_schema, tmp_path)
    await s.setup(pg)
    yield s
    s.stop_all()


@pytest.fixture
async def kit(pg: asyncpg.Connection, db_schema: str) -> Kit:
    """The engine over the test's schema: its tables, registry and ledger (engine_kit.py)."""
    return await Kit.create(pg, db_schema)


@pytest.fixture
async def client(scenario: Scenario) -> AsyncIterator[Client]:
    """A started client on the scenario's topics (60 s per reply: workers join slowly)."""
    async with Client(
        scenario.kafka,
        request_topic=scenario.request_topic,
        reply_topic=scenario.reply_topic,
        timeout=60,
    ) as c:
        yield c
