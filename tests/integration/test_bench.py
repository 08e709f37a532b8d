"""ops/bench's quick mode works end to end with tiny sizes, and its correctness checks pass.

No timing is asserted: this machine is shared. What is checked is that every contender
ran, that every run's checks (one reply per request, statuses, versions, counters, ledger)
passed, and that the report, its JSON and the plots were written.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import Endpoints
from tests.support import ROOT

pytest.importorskip("faststream", reason="the bench dependency group is not installed")
pytest.importorskip("matplotlib", reason="the bench dependency group is not installed")


@pytest.mark.timeout(600)
async def test_quick_bench_runs_and_its_checks_pass(
    stack_endpoints: Endpoints, tmp_path: Path
) -> None:
    database = f"bench_test_{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": stack_endpoints.kafka_bootstrap,
        "DATABASE_URL": stack_endpoints.database_url,
    }
    command = [
        str(ROOT / "ops" / "bench"),
        "--quick",
        *("--requests", "300", "--keys", "60", "--load-seconds", "1"),
        *("--backlogs", "100,300", "--database", database),
        *("--report", str(tmp_path / "BENCHMARKS.md"), "--plots", str(tmp_path / "plots")),
        *("--workdir", str(tmp_path / "work")),
    ]
    try:
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=580)
    finally:
        conn = await asyncpg.connect(stack_endpoints.database_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await conn.close()
    assert run.returncode == 0, run.stderr[-4000:]
    report = (tmp_path / "BENCHMARKS.md").read_text()
    results = json.loads((tmp_path / "plots" / "results.json").read_text())
    names = {e["drain"]["name"] for e in results["contenders"]}
    assert {"kafka", "kafka-txn", "naive", "faststream", "pgbench-cas", "pgbench-batch"} <= names
    assert {"processor-1w-l2", "processor-2w-l2"} <= names
    for entry in results["contenders"]:
        for run_ in (entry["drain"], entry["load"]):
            if run_ is not None:
                assert run_["ok"], (run_["name"], run_["problems"])
                assert run_["throughput"] > 0, run_["name"]
    assert [p["requests"] for p in results["curves"]["backlog"]] == [100, 300]
    assert "**FAILED**" not in report
    assert "## Targets" in report
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == [
        "contenders_throughput.png",
        "processor_backlog.png",
        "processor_batch.png",
        "processor_load.png",
        "processor_skew.png",
    ]
