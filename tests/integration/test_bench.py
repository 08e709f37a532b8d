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
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from ops.lib.bench.cli import curve_set, main, share_list
from ops.lib.bench.runs import logged_transactions, phase_means_ms
from ops.lib.bench.text import per_transaction
from tests.conftest import Endpoints
from tests.support import ROOT

pytest.importorskip("faststream", reason="the bench dependency group is not installed")
pytest.importorskip("matplotlib", reason="the bench dependency group is not installed")


async def _bench(
    stack_endpoints: Endpoints, tmp_path: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """``ops/bench *args`` on a database of its own (dropped after), its report, plots and
    work files under ``tmp_path``."""
    database = f"bench_test_{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": stack_endpoints.kafka_bootstrap,
        "DATABASE_URL": stack_endpoints.database_url,
    }
    command = [
        str(ROOT / "ops" / "bench"),
        *args,
        *("--database", database, "--workdir", str(tmp_path / "work")),
        *("--report", str(tmp_path / "BENCHMARKS.md"), "--plots", str(tmp_path / "plots")),
    ]
    try:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=580)
    finally:
        conn = await asyncpg.connect(stack_endpoints.database_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await conn.close()


@pytest.mark.timeout(600)
async def test_quick_bench_runs_and_its_checks_pass(
    stack_endpoints: Endpoints, tmp_path: Path
) -> None:
    run = await _bench(
        stack_endpoints,
        tmp_path,
        "--quick",
        *("--requests", "300", "--keys", "60", "--load-seconds", "1"),
        *("--backlogs", "100,300"),
    )
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
    processors = [e for e in results["contenders"] if e["drain"]["name"].startswith("processor")]
    for entry in processors:
        assert entry["idle"]["ok"], entry["drain"]["name"]
        assert entry["idle"]["p99_ms"] > 0, entry["drain"]["name"]
        assert entry["drain"]["transactions_per_1k"] > 0, entry["drain"]["name"]
    assert "**FAILED**" not in report
    assert "## Targets" in report
    # The cadence: every point of the load curve says how many requests a transaction held.
    for point in results["curves"]["load"]:
        assert point["transactions_per_1k"] > 0, point["name"]
        assert set(point["extra"]["phase_ms"]) == {"database", "wait", "kafka"}, point["name"]
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == [
        "contenders_throughput.png",
        "processor_backlog.png",
        "processor_batch.png",
        "processor_batch_by_load.png",
        "processor_load.png",
        "processor_skew.png",
    ]


@pytest.mark.timeout(600)
async def test_bench_runs_a_baseline_commit_from_a_worktree_next_to_the_current_code(
    stack_endpoints: Endpoints, tmp_path: Path
) -> None:
    """--baseline HEAD: the same processor contender run from a worktree of HEAD, beside the
    current tree's, at 3 partitions; the old-vs-new section lists both, the worktree is gone
    after the run."""
    short = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    run = await _bench(
        stack_endpoints,
        tmp_path,
        *("--quick", "--only", "processor", "--baseline", "HEAD", "--partitions", "3"),
        *("--workers", "1", "--lanes", "2", "--idle-requests", "10"),
        *("--requests", "200", "--keys", "50", "--load-seconds", "1"),
    )
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads((tmp_path / "plots" / "results.json").read_text())
    by_name = {e["drain"]["name"]: e for e in results["contenders"]}
    assert set(by_name) == {"processor-1w-l2", f"processor-1w-l2@{short}"}
    for entry in by_name.values():
        assert entry["drain"]["extra"]["partitions"] == 3
        assert entry["drain"]["transactions_per_1k"] > 0
        assert entry["drain"]["extra"]["transactions_counted_by"] == "metrics"
        assert entry["load"]["ok"]
        assert entry["load"]["transactions_per_1k"] > 0
        assert entry["idle"]["ok"]
    assert by_name[f"processor-1w-l2@{short}"]["drain"]["extra"]["baseline"] == short
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Old vs new commit path" in report
    assert f"| processor-1w-l2 / processor-1w-l2@{short} | 3 |" in report
    worktrees = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert str(tmp_path / "work" / "baseline") not in worktrees


def test_an_old_workers_transactions_are_counted_from_its_debug_log(tmp_path: Path) -> None:
    """The per-partition worker (a8821c1) logs one `batch committed` line per batch with
    the partitions it committed, one transaction each; lines before `since` are not
    counted (the warm-up of a load run)."""
    log = tmp_path / "worker.log"
    log.write_text(
        '{"partitions": [0, 2, 4], "records": 1000, "event": "batch committed", '
        '"level": "debug", "timestamp": "2026-12-02T07:44:19.939310Z"}\n'
        "not json\n"
        '{"event": "partitions assigned", "partitions": [0, 1], '
        '"timestamp": "2026-12-02T07:44:20.000000Z"}\n'
        '{"partitions": [2], "records": 513, "event": "batch committed", '
        '"level": "debug", "timestamp": "2026-12-02T07:44:20.667871Z"}\n'
    )
    assert logged_transactions([str(log)]) == 4
    since = datetime(2026, 12, 2, 7, 44, 20, tzinfo=UTC).timestamp()
    assert logged_transactions([str(log)], since=since) == 1


def test_the_curve_flags_take_shares_and_curve_names_and_name_a_bad_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert share_list("0.05,0.5,1") == (0.05, 0.5, 1.0)
    assert curve_set("load") == frozenset({"load"})
    for argv, said in (
        (["--load-shares", "0.5,x"], "'x' is not a share in (0, 2]"),
        (["--load-shares", "0"], "'0' is not a share in (0, 2]"),
        (["--curves", "load,skw"], "unknown curve(s) skw: choose from load,skew,batch,backlog"),
    ):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        assert said in capsys.readouterr().err


def test_requests_per_transaction_is_what_the_load_curve_reports() -> None:
    assert per_transaction({"transactions_per_1k": 4.0}) == 250.0
    assert per_transaction({"transactions_per_1k": None}) is None


def test_phase_means_are_per_batch_between_two_scrapes() -> None:
    before = {"database": (1.0, 10.0), "wait": (0.0, 10.0), "kafka": (2.0, 10.0)}
    after = {"database": (1.5, 20.0), "wait": (0.1, 20.0), "kafka": (2.2, 20.0)}
    means = phase_means_ms(before, after)
    assert means == pytest.approx({"database": 50.0, "wait": 10.0, "kafka": 20.0})
    assert phase_means_ms(None, after) is None
    assert phase_means_ms(before, before) is None  # no batch in between
