"""`processor loadtest` end to end: a short run with its own worker, invariants checked."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from processor.config import Settings
from processor.db.registry import Entity, quote
from processor.tools.loadtest import LoadOptions, run_loadtest, summary, write_plot
from processor.tools.loadtest.run import _wait_consumed
from tests.integration.harness import Scenario, updates

pytestmark = pytest.mark.timeout(300)


def short(**changes: Any) -> LoadOptions:
    base: dict[str, Any] = {
        "duration": 3.0,
        "clients": 12,
        "rows": 6,
        "skew": 1.2,
        "delete_share": 0.1,
        "stale_share": 0.1,
        "delete_rows": 300,
        "attempts": 50,
        "with_worker": 1,
        "seed": 7,
        "progress": False,
        "ready_timeout": 90,
    }
    return LoadOptions(**{**base, **changes})


async def test_a_short_load_test_holds_every_invariant(
    scenario: Scenario, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    settings = Settings.from_env(scenario.env())
    logs = tmp_path / "logs"
    result = await run_loadtest(settings, short(keep_rows=True, worker_logs=logs))
    report = summary(result)
    assert result["invariants"]["ok"], report
    names = [c["name"] for c in result["invariants"]["checks"]]
    assert names[:5] == [
        "counters == successful increments",
        "no stale update accepted",
        "deleted rows == successful deletes",
        "replies == requests",
        "reply topic: one reply per send, none missing, copies identical",
    ]
    outcomes = result["outcomes"]
    assert outcomes.get("increment.ok", 0) > 0
    assert outcomes.get("stale.rejected", 0) > 0
    assert outcomes.get("delete.ok", 0) > 0
    assert not any(k.endswith("ACCEPTED") or ".error." in k for k in outcomes), outcomes
    assert result["requests"] == result["replies"] == result["request_ids"]  # no timeouts
    for name in ("op", "request", "increment"):
        lat = result["latency_ms"][name]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert result["throughput"]["ops_per_s"] > 0
    # the database agrees with the increments the run counted
    rows = await pg.fetch(
        f"SELECT n FROM {scenario.schema}.counter WHERE id BETWEEN 1 AND 6 ORDER BY id"
    )
    assert sum(r["n"] for r in rows) == result["increments"]
    assert result["rows"]["kept"] is True
    # the workers' logs went where asked, and stay
    assert result["worker_logs"] == {"dir": str(logs), "kept": True}
    assert (logs / "worker-0.log").stat().st_size > 0
    # the summary and the audit line count the same requests (setup requests excluded)
    (audit,) = [c for c in result["invariants"]["checks"] if c["name"].startswith("audit")]
    assert audit["detail"].startswith(f"{result['requests']:,} requests, "), audit
    # the drain after the load is its own bucket, rated over its length
    last = result["timeline"][-1]
    assert last["drain"] is True
    assert last["span_s"] < 1
    # the outputs
    path = tmp_path / "result.json"
    path.write_text(json.dumps(result))
    assert json.loads(path.read_text())["ops"] == result["ops"]
    message = write_plot(result, tmp_path / "plot.png")
    if message.startswith("plot skipped"):
        assert "matplotlib" in message
    else:
        assert (tmp_path / "plot.png").stat().st_size > 10_000


async def test_a_tampered_counter_is_reported_as_a_broken_invariant(
    scenario: Scenario, pg: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    async def tamper(conn: asyncpg.Connection, entity: Entity) -> None:
        await conn.execute(
            f"UPDATE {entity.qualified} SET n = n + 1 WHERE {quote(entity.key.name)} = 1"
        )

    settings = Settings.from_env(scenario.env())
    opts = short(duration=1.0, clients=4, skew=math.inf, delete_share=0.0, stale_share=0.0)
    result = await run_loadtest(settings, opts, before_check=tamper)
    assert not result["invariants"]["ok"]
    broken = [c for c in result["invariants"]["checks"] if not c["ok"]]
    assert [c["name"] for c in broken] == ["counters == successful increments"]
    assert "1 row differs" in broken[0]["detail"]
    assert "BROKEN counters == successful increments" in summary(result)
    assert result["options"]["skew"] == "max"
    assert all(k.startswith("increment.") for k in result["outcomes"]), result["outcomes"]
    # The seeded rows are gone (they are not asked to stay); the temporary logs of the
    # failed run are kept, and the run said where.
    first, last = result["rows"]["first"], result["rows"]["last"]
    left = await pg.fetchval(
        f"SELECT count(*) FROM {scenario.schema}.counter WHERE id BETWEEN $1 AND $2", first, last
    )
    assert left == 0
    assert result["rows"]["kept"] is False
    logs = Path(result["worker_logs"]["dir"])
    assert result["worker_logs"]["kept"] is True
    assert (logs / "worker-0.log").is_file()
    assert f"loadtest: worker logs kept in {logs}" in capsys.readouterr().err


async def test_a_clean_run_removes_its_temporary_worker_logs(
    scenario: Scenario, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings.from_env(scenario.env())
    opts = short(duration=1.0, clients=4, delete_share=0.0, stale_share=0.0)
    result = await run_loadtest(settings, opts)
    assert result["invariants"]["ok"], summary(result)
    logs = Path(result["worker_logs"]["dir"])
    assert result["worker_logs"]["kept"] is False
    assert not logs.exists()
    err = capsys.readouterr().err
    assert f"loadtest: 1 worker, logs in {logs}" in err
    assert f"loadtest: worker logs removed ({logs})" in err


async def test_timeouts_are_settled_by_resending_the_same_request(scenario: Scenario) -> None:
    """A reply deadline shorter than a round trip: requests time out all the time, and
    each is resent with its request_id until answered; the counters still add up."""
    settings = Settings.from_env(scenario.env())
    result = await run_loadtest(settings, short(duration=2.0, timeout=0.02, stale_share=0.2))
    assert result["invariants"]["ok"], summary(result)
    outcomes = result["outcomes"]
    assert result["requests"] > result["request_ids"], "some requests were resent"
    assert any("timeout" in k for k in outcomes), outcomes
    assert not any("unsettled" in k or "ACCEPTED" in k for k in outcomes), outcomes


async def test_the_check_waits_for_the_group_to_consume_the_last_requests(
    scenario: Scenario, pg: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    """Requests the worker group has not consumed yet: the wait gives up after its limit
    and says how many; with a worker it returns once the group's committed offsets reach
    the topic's end, every request answered (an audit after it finds no reply missing)."""
    await pg.execute(f"INSERT INTO {scenario.schema}.acct (id) VALUES (1), (2)")
    sent = await scenario.send(updates([1, 2], 10, scenario.run))
    settings = Settings.from_env(scenario.env())
    await _wait_consumed(settings, 1.0)
    assert f"still {sent} request(s) behind" in capsys.readouterr().err
    scenario.start_worker()
    await _wait_consumed(settings, 120.0)
    assert "behind" not in capsys.readouterr().err
    replies = await scenario.replies(expect=sent, timeout=5)
    assert len({r.request_id for r in replies}) == sent
