"""The chaos run's short form (``ops/chaos --short``) passes: every fault kind, no anomaly.

It starts a private stack of its own (its own state dir and free ports), so it needs no
fixture of the shared one, and kills and restarts that stack's broker and database. On
this 2-core machine it takes ~2-3 minutes; deselect it with ``-m "not chaos"``.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from processor.tools.chaos_check import ALL_ANOMALIES, CLUSTER_FAULT_KINDS, FAULT_KINDS
from tests.support import ROOT

pytestmark = [pytest.mark.chaos, pytest.mark.faults, pytest.mark.timeout(420)]


def _clean_run(
    tmp_path: Path, kinds: Sequence[str], timeout: float, *form: str
) -> tuple[dict[str, Any], str]:
    """``ops/chaos`` (seed 11, 3 workers) in ``form``: it passed, found no anomaly, injected
    each of ``kinds`` once and recovered from every one. Its summary and output."""
    result = tmp_path / "chaos.json"
    done = subprocess.run(
        [
            str(ROOT / "ops" / "chaos"),
            *form,
            *("--seed", "11", "--workers", "3"),
            *("--workdir", str(tmp_path / "run"), "--json", str(result)),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = f"--- stdout ---\n{done.stdout[-6000:]}\n--- stderr ---\n{done.stderr[-6000:]}"
    assert done.returncode == 0, output
    summary: dict[str, Any] = json.loads(result.read_text())
    assert summary["ok"] is True, output
    assert {kind: n for kind, n in summary["anomalies"].items() if n} == {}, output
    by_kind = summary["faults"]["by_kind"]
    assert {kind: by_kind[kind]["injected"] for kind in kinds} == dict.fromkeys(kinds, 1)
    assert [k for k in kinds if by_kind[k]["not_recovered"]] == [], output
    return summary, output


def test_the_short_chaos_run_injects_every_fault_kind_and_finds_no_anomaly(
    tmp_path: Path,
) -> None:
    """Workers killed, paused, added and removed, the broker killed, the database stopped
    (immediate and fast), the database link slowed, reset and partitioned, under a contended
    load with stale versions, deletes and hostile records: the audit and the model checks
    find nothing, every fault was recovered from, and the load was not trivially small."""
    summary, output = _clean_run(tmp_path, FAULT_KINDS, 400, "--short")
    assert set(summary["anomalies"]) == set(ALL_ANOMALIES)
    figures = summary["figures"]
    assert figures["requests_sent"] > 1000, figures
    assert figures["increments_acked"] > 200, figures
    assert figures["hostile_records"] > 5, figures
    assert figures["deletes_ok"] > 0, figures
    assert figures["unsettled"] == 0, figures
    counts = figures["audit_counts"]
    assert counts["request_records"] >= figures["request_ids"], counts
    assert counts["chain_writes"] >= figures["increments_acked"], counts
    assert counts["dead_letters"] >= figures["hostile_records"], counts
    assert summary["incidents"]["workers_exited_unexpectedly"] == {}, output
    assert summary["incidents"]["worker_remove_exit_codes"] == [0], output  # SIGTERM: clean


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_the_short_cluster_chaos_run_injects_every_cluster_fault_kind_and_finds_no_anomaly(
    tmp_path: Path,
) -> None:
    """On a cluster stack (three brokers; PostgreSQL primary + synchronous standby): the
    busiest leader broker killed -9, a broker paused, the link between the workers and one
    broker slowed, reset and partitioned, a PostgreSQL failover (kill -9, promote, rebuild)
    and two faults at once, under the same load: no anomaly, every fault recovered from."""
    summary, output = _clean_run(tmp_path, CLUSTER_FAULT_KINDS, 580, "--cluster", "--short")
    figures = summary["figures"]
    assert figures["requests_sent"] > 500, figures
    assert figures["increments_acked"] > 100, figures
    assert figures["unsettled"] == 0, figures
    assert figures["proxy_resets"] > 0, figures  # the broker proxy carried the workers
    assert summary["incidents"]["workers_exited_unexpectedly"] == {}, output
