"""The load test's arithmetic and its invariant checker, without services."""

from __future__ import annotations

import argparse
import math
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

import processor.tools.loadtest as lt
import processor.tools.loadtest.cli as loadtest_cli
from processor.config import Settings
from processor.contract import FaultDetail, Reply, encode_reply
from processor.errors import ConfigError
from processor.tools.loadtest import LoadOptions, Observations, check_invariants, percentile


def reply(rid: str, status: str = "success", code: int | None = None) -> bytes:
    fault = None
    if code is not None:
        fault = FaultDetail(code=code, name="X", message="m", retryable=True)
    return encode_reply(
        Reply(
            request_id=rid,
            type="update",
            entity="counter",
            id=1,
            status=status,  # type: ignore[arg-type]
            processed_at=datetime(2026, 1, 1, tzinfo=UTC),
            fault=fault,
        )
    )


def healthy() -> Observations:
    return Observations(
        increments=Counter({1: 3, 2: 1}),
        deleted={10},
        sent=Counter({"a": 1, "b": 2, "c": 1}),
        replied={"a", "b", "c"},
        topic={"a": [reply("a")], "b": [reply("b"), reply("b")], "c": [reply("c")]},
        topic_read=True,
    )


def broken(
    seen: Observations, counters: dict[int, int] | None = None, left: set[int] | None = None
) -> list[str]:
    checks = check_invariants(
        seen, counters or {1: 3, 2: 1}, [10, 11], {11} if left is None else left
    )
    return [c.name for c in checks if not c.ok]


def test_a_healthy_run_breaks_nothing() -> None:
    assert broken(healthy()) == []


def test_a_counter_off_by_one_is_reported_with_the_row() -> None:
    checks = check_invariants(healthy(), {1: 4, 2: 1}, [10, 11], {11})
    bad = [c for c in checks if not c.ok]
    assert [c.name for c in bad] == ["counters == successful increments"]
    assert "(1, (4, 3))" in bad[0].detail


def test_an_accepted_stale_update_is_reported() -> None:
    seen = healthy()
    seen.stale_accepted = 1
    assert broken(seen) == ["no stale update accepted"]


def test_deletes_must_match_the_rows_gone() -> None:
    assert broken(healthy(), left={10, 11}) == ["deleted rows == successful deletes"]
    assert broken(healthy(), left=set()) == ["deleted rows == successful deletes"]


def test_a_request_without_reply_or_an_unsettled_timeout_is_reported() -> None:
    seen = healthy()
    seen.replied.discard("c")
    assert broken(seen) == ["replies == requests"]
    seen = healthy()
    seen.unsettled = 1
    assert broken(seen) == ["replies == requests"]


def test_the_reply_topic_must_hold_one_identical_reply_per_send() -> None:
    topic = "reply topic: one reply per send, none missing, copies identical"
    seen = healthy()
    seen.topic["a"].append(reply("a"))  # sent once, replied twice
    assert broken(seen) == [topic]
    seen = healthy()
    del seen.topic["c"]
    assert broken(seen) == [topic]
    seen = healthy()
    seen.topic["b"][1] = reply("b", "fault", -2147088254)  # the resend's reply differs
    assert broken(seen) == [topic]
    seen = healthy()  # UnExpected is not ledgered: a resend may be answered differently
    seen.topic["b"][0] = reply("b", "fault", -2147220970)
    assert broken(seen) == []


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([3.0], 90) == 3.0
    assert math.isnan(percentile([], 50))


def test_skew_zero_is_uniform_and_max_is_one_row() -> None:
    assert lt.zipf_weights(4, 0) == [1.0] * 4
    assert lt.zipf_weights(3, math.inf) == [1.0, 0.0, 0.0]
    weights = lt.zipf_weights(100, 1.0)
    assert weights[0] / weights[9] == pytest.approx(10)


@pytest.mark.parametrize(
    "changes",
    [
        {"duration": 0},
        {"mode": "both"},
        {"delete_share": 0.6, "stale_share": 0.6},
        {"delete_share": 0.1, "delete_rows": 0},
        {"rows": 0},
        {"skew": -1.0},
        {"attempts": 0},
    ],
)
def test_bad_options_are_configuration_errors(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        LoadOptions(**changes).validate()


def fake_result(ok: bool = True) -> dict[str, Any]:
    return {
        "elapsed_s": 1.04,
        "ops": 1,
        "requests": 1234,
        "request_ids": 1230,
        "replies": 1234,
        "conflicts": 5678,
        "throughput": {"ops_per_s": 1.0, "requests_per_s": 1234.0, "increments_per_s": 1.0},
        "latency_ms": {
            "op": {"p50": 1.0, "p90": 2.5, "p99": 10412.34, "max": 12000.0, "mean": 1.0}
        },
        "outcomes": {"increment.ok": 1},
        "invariants": {
            "ok": ok,
            "checks": [
                {"name": "counters == successful increments", "ok": ok, "detail": "x"},
            ],
        },
        "rows": {"table": "demo.counter", "first": 1, "last": 5100, "kept": False},
        "options": {"mode": "closed", "clients": 2, "rows": 1, "skew": 0, "duration": 1.0},
        "timeline": [],
        "samples": [],
    }


def loadtest_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    lt.add_arguments(parser)
    return parser.parse_args(list(argv))


def fake_run(monkeypatch: pytest.MonkeyPatch, result: dict[str, Any]) -> list[LoadOptions]:
    runs: list[LoadOptions] = []

    async def fake(settings: Settings, opts: LoadOptions) -> dict[str, Any]:
        runs.append(opts)
        return result

    monkeypatch.setattr(loadtest_cli, "run_loadtest", fake)  # where the command finds it
    return runs


async def test_the_command_exits_1_loudly_when_an_invariant_breaks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_run(monkeypatch, fake_result(ok=False))
    args = loadtest_args("--json", str(tmp_path / "r.json"), "--no-plot", "--skew", "max")
    assert args.skew == math.inf
    assert await lt.run_from_args(Settings(), args) == 1
    out = capsys.readouterr()
    assert "BROKEN counters == successful increments" in out.out
    assert "LOADTEST FAILED" in out.err
    assert msgspec.json.decode((tmp_path / "r.json").read_bytes())["invariants"]["ok"] is False


async def test_the_command_writes_no_file_unless_asked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_run(monkeypatch, fake_result())
    monkeypatch.chdir(tmp_path)
    assert await lt.run_from_args(Settings(), loadtest_args()) == 0
    assert list(tmp_path.iterdir()) == []
    assert "written" not in capsys.readouterr().out


async def test_the_outputs_go_where_asked_and_a_directory_gets_the_default_names(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_run(monkeypatch, fake_result())
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    assert await lt.run_from_args(Settings(), loadtest_args("--json", "out", "--plot", "out")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["loadtest.json", "loadtest.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    printed = capsys.readouterr().out
    assert f"result written to {out / 'loadtest.json'}" in printed
    assert f"plot written to {out / 'loadtest.png'}" in printed


async def test_an_output_in_a_missing_directory_is_refused_before_the_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    runs = fake_run(monkeypatch, fake_result())
    with pytest.raises(ConfigError, match=r"--json .*the directory .*nowhere does not exist"):
        await lt.run_from_args(Settings(), loadtest_args("--json", str(tmp_path / "nowhere/r")))
    assert runs == []


def test_the_summary_formats_numbers_alike() -> None:
    text = lt.summary(fake_result())
    assert text.startswith(
        "elapsed 1.0 s: 1 operation, 1,234 requests (1,230 request_ids, 4 resent), "
        "1,234 replies received\n"
    )
    assert "throughput: 1.0 operations/s, 1,234.0 requests/s, 1.0 increments/s" in text
    assert "  operation         1.0       2.5  10,412.3  12,000.0" in text
    assert "conflicts (version mismatches retried): 5,678" in text
    assert "rows 1-5,100 of demo.counter: deleted after the checks (--keep-rows keeps them)" in text


def test_the_plot_reads_in_milliseconds_and_leaves_the_drain_out_of_the_throughput() -> None:
    result = fake_result()
    result["elapsed_s"] = 2.3
    result["options"]["duration"] = 2.0
    result["timeline"] = [
        {
            "t": t,
            "span_s": span,
            "drain": t >= 2,
            "ops": ops,
            "requests": ops,
            "conflicts": 0,
            "ops_per_s": ops / span,
            "requests_per_s": ops / span,
            "conflicts_per_s": 0.0,
            "p50_ms": 12.0,
            "p99_ms": 950.0,
        }
        for t, span, ops in ((0, 1.0, 100), (1, 1.0, 100), (2, 0.3, 5))
    ]
    result["samples"] = [[0.5, 12.0], [1.5, 950.0], [2.2, 20.0]]
    fig = lt.figure(result)
    top, bottom = fig.axes
    ticks = top.yaxis.get_major_formatter()
    assert [ticks(v, 0) for v in (1, 10, 100, 1000, 10000)] == [
        "1",
        "10",
        "100",
        "1,000",
        "10,000",
    ]
    for line in bottom.get_lines():
        xs = list(line.get_xdata())
        if line.get_label() in ("operations/s", "requests/s"):
            assert max(xs) < 2.0  # the drain bucket (2.0-2.3 s, 5 ops) is not a point
            assert list(line.get_ydata()) == [100.0, 100.0]
