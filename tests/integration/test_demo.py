"""`processor demo` end to end, on its own copy of the demo tables, topics and ledger."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import Endpoints
from tests.support import ROOT

pytestmark = pytest.mark.timeout(300)


async def test_the_demo_shows_metadata_a_rolled_back_transaction_and_a_conflict(
    stack_endpoints: Endpoints, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    schema = f"demo_{run}"
    for name in ("entities.toml", "schema.sql"):
        text = (ROOT / "processor" / "tools" / "demo_data" / name).read_text()
        (tmp_path / name).write_text(
            text.replace("demo.", f"{schema}.").replace(
                "SCHEMA IF NOT EXISTS demo;", f"SCHEMA IF NOT EXISTS {schema};"
            )
        )
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": stack_endpoints.kafka_bootstrap,
        "DATABASE_URL": stack_endpoints.database_url,
        "PROCESSOR_ENTITIES": str(tmp_path / "entities.toml"),
        "PROCESSOR_REQUEST_TOPIC": f"demo-req-{run}",
        "PROCESSOR_REPLY_TOPIC": f"demo-rep-{run}",
        "PROCESSOR_DLQ_TOPIC": f"demo-dlq-{run}",
        "PROCESSOR_GROUP_ID": f"demo-{run}",
        "PROCESSOR_LEDGER_SCHEMA": f"{schema}_ledger",
        "PROCESSOR_METRICS_PORT": "0",
        "PROCESSOR_PARTITIONS": "2",
    }
    try:
        demo = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "processor", "demo"],
            env=env,
            capture_output=True,
            text=True,
            timeout=280,
        )
    finally:
        conn = await asyncpg.connect(stack_endpoints.database_url)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema}_ledger CASCADE")
        finally:
            await conn.close()
    out = demo.stdout
    assert demo.returncode == 0, out[-3000:] + demo.stderr[-3000:]
    assert "16/16 replies received" in out
    # The demo's own lines are not interleaved with the embedded worker's info lines.
    assert '"level": "info"' not in demo.stderr, demo.stderr[-3000:]
    metadata = out[out.index("entity metadata") :]
    assert "account  enabled" in metadata
    assert "AlwaysOverwrite  xmin" in metadata
    assert "faulted_request_index=1 ObjectDoesNotExist" in out
    assert "account 8 unchanged" in out
    assert "ConcurrencyVersionMismatch on update of item 'gadget'" in out
    assert "retrieved again and saved: update of item 'gadget'" in out
