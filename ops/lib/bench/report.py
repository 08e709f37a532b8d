"""The report (BENCHMARKS.md): the tables of the runs against their targets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ops.lib.bench.commit_path import commit_path, curve_tables
from ops.lib.bench.costs import Result
from ops.lib.bench.text import fmt, ratio
from ops.lib.bench.whole import Config
from ops.lib.bench.workload import PGBENCH_BATCH, PGBENCH_CAS


def report(
    cfg: Config,
    versions: dict[str, str],
    results: dict[str, Any],
    command: str,
    started: dict[str, str],
    finished_load: str,
    plots: list[Path],
    out: Path,
    notes: str | None = None,
    date: str = "",
) -> str:
    contenders = results["contenders"]
    by_name = {e["drain"].name: e for e in contenders}
    best_name = results["best_processor"]
    best = by_name.get(best_name) if best_name else None
    lines = _head(cfg, versions, command, started, finished_load, date)
    lines += _result_rows(contenders, best_name, best)
    failures = _failures(results)
    lines += [""]
    busy = [
        (r.foreign_cores, r.name)
        for e in contenders
        for r in (e["drain"], e["load"])
        if r is not None and r.foreign_cores is not None
    ]
    if busy and max(busy)[0] > 0.25:
        lines += [
            f"**The machine was not quiet**: other processes used up to {max(busy)[0]:.2f} "
            f"cores (during {max(busy)[1]}); compare rows by their `other load`.",
            "",
        ]
    if best:
        lines += [f"The processor's best configuration: **{best_name}**.", ""]
    lines += targets(results, by_name, best)
    lines += commit_path(results)
    if notes:
        lines += ["## Findings", "", notes.strip(), ""]
    lines += curve_tables(results)
    if failures:
        lines += ["", "## Correctness failures", ""]
        lines += [f"- {name} ({kind}): {p}" for name, kind, p in failures]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}]({os.path.relpath(p, out.parent)})" for p in plots]
    lines += _pgbench_runs(results["pgbench"])
    return "\n".join(lines) + "\n"


def targets(
    results: dict[str, Any], by_name: dict[str, dict[str, Any]], best: dict[str, Any] | None
) -> list[str]:
    if best is None:
        return []
    d: Result = best["drain"]
    lr: Result | None = best["load"]

    def vs(name: str, factor: float) -> tuple[str, str, str]:
        other = by_name.get(name)
        if other is None or not other["drain"].ok or not d.ok:
            return ("-", "n/a", "not measured or not correct")
        r = d.throughput / max(other["drain"].throughput, 1e-9)
        return (f"{r:.2f}x", "met" if r >= factor else "**missed**", "")

    rows = []
    for name, factor in (("naive", 10), ("faststream", 5), ("pgbench-cas", 1.0)):
        got, verdict, note = vs(name, factor)
        rows.append(f"| >= {factor:g}x {name} drain | {got} | {verdict} {note} |")
    p99 = lr.p99_ms if lr else None
    rows.append(
        f"| p99 <= 25 ms at 50% of own drain | {fmt(p99, 1, ' ms')} | "
        f"{'met' if p99 is not None and p99 <= 25 else '**missed**'} |"
    )
    backlog = [p["drain"] for p in results["curves"].get("backlog", []) if p["drain"]["ok"]]
    if len(backlog) >= 2:
        small, large = backlog[0], backlog[-1]
        base = max(small["peak_rss_mb"] or 1, 1e-9)
        growth = (large["peak_rss_mb"] or 0) / base - 1
        spread = max(d["peak_rss_mb"] or 0 for d in backlog) / base - 1
        rows.append(
            f"| worker RSS flat (<= 20%) {small['requests']:,} -> {large['requests']:,} | "
            f"{growth:+.0%} (largest on the curve {spread:+.0%}) | "
            f"{'met' if growth <= 0.2 else '**missed**'} |"
        )
    return ["## Targets", "", "| target | processor | verdict |", "| --- | ---: | --- |", *rows, ""]


def _head(
    cfg: Config,
    versions: dict[str, str],
    command: str,
    started: dict[str, str],
    finished_load: str,
    date: str,
) -> list[str]:
    """The report's machine, workload and the results table's header."""
    return [
        "# Benchmarks",
        "",
        "Produced by `ops/bench` (ops/bench.py); do not edit by hand, run it again.",
        "",
        f"Command: `{command}`",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in started.items()),
        f"| load average at the end | {finished_load} |",
        *(f"| {k} | {v} |" for k, v in versions.items()),
        f"| date | {date} |",
        "",
        "Everything (Kafka, PostgreSQL, the workers, pgbench and the bench's own producer and",
        "reply reader) shares these cores: the figures are for this whole box, not a worker.",
        "",
        "## Workload",
        "",
        f"- {cfg.workload.describe()}, {cfg.partitions} partitions, "
        f"`bench.counter(id, n, version)`; every request an IfRowVersionMatches update.",
        "- Drain: the backlog is preloaded (in a Kafka transaction committed once the",
        "  contender's group is stable); throughput is replies/s from the first reply to the last.",
        "- Latency: open loop at 50% of the contender's own drain rate for "
        f"{cfg.load_seconds:.0f} s, from the request's intended send time to the reply's",
        "  arrival (read_committed).",
        "- CPU: seconds of CPU per 1,000 requests during the drain (worker processes; PostgreSQL",
        "  server and Kafka broker separately). RSS: the worker's peak (VmHWM).",
        "- Commits: `pg_stat_database.xact_commit` delta per request.",
        "- Correctness, every run: one reply per request, no duplicate, each status and version",
        "  as predicted, every counter's final n and version, the ledger's row count.",
        "",
        "## Results",
        "",
        "`processor ratio`: the best processor configuration's drain rate / this one's.",
        "`other load`: CPU used during the drain by processes outside the run (cores): the",
        "figures are only comparable where it stays near 0. `commits/req` counts read-only",
        "transactions too (an asyncpg pool's reset on release is one).",
        "",
        "| contender | correct | drain req/s | p50 ms | p99 ms | worker CPU s/1k | "
        "PostgreSQL CPU s/1k | Kafka CPU s/1k | peak RSS MB | commits/req | other load | "
        "processor ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]


def _result_rows(
    contenders: list[dict[str, Any]], best_name: str | None, best: dict[str, Any] | None
) -> list[str]:
    """One results row a contender: its drain and latency, costs, the ratio to the best."""
    lines: list[str] = []
    top = best["drain"].throughput if best else None
    for e in contenders:
        d: Result = e["drain"]
        lr: Result | None = e["load"]
        extra = ""
        if d.kind == "pgbench":
            extra = f" ({d.extra['clients']} clients"
            extra += f", {d.extra['batch']}/txn)" if d.extra.get("batch", 1) > 1 else ")"
        ok = d.ok and (lr is None or lr.ok)
        lines.append(
            f"| {d.name}{extra} | {'yes' if ok else '**FAILED**'} | {fmt(d.throughput)} | "
            f"{fmt(lr.p50_ms if lr else None, 1)} | {fmt(lr.p99_ms if lr else None, 1)} | "
            f"{fmt(d.worker_cpu_per_1k, 3)} | {fmt(d.postgres_cpu_per_1k, 3)} | "
            f"{fmt(d.kafka_cpu_per_1k, 3)} | {fmt(d.peak_rss_mb)} | "
            f"{fmt(d.commits_per_request, 3)} | {fmt(d.foreign_cores, 2)} | "
            f"{ratio(top, d.throughput) if ok and d.name != best_name else '-'} |"
        )
    return lines


def _failures(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(name, kind, problem) of every run that failed a correctness check, curves too."""
    contenders = results["contenders"]
    failures = [
        (r.name, r.kind, p)
        for e in contenders
        for r in (e["drain"], e["load"], e.get("idle"))
        if r is not None
        for p in r.problems
    ]
    for curve in results["curves"].values():
        for point in curve:
            for key in ("drain", "load"):
                r = point.get(key) if key in point else None
                if isinstance(r, dict):
                    failures += [(r["name"], r["kind"], p) for p in r["problems"]]
            if "problems" in point:
                failures += [(point["name"], point["kind"], p) for p in point["problems"]]
    return failures


def _pgbench_runs(runs: list[Result]) -> list[str]:
    """The pgbench runs' table and their two scripts; nothing if pgbench did not run."""
    if not runs:
        return []
    lines = [
        "",
        "## pgbench runs",
        "",
        "| script | clients | req/s | commits/req |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in runs:
        lines.append(
            f"| {r.name} | {r.extra['clients']} | {fmt(r.throughput)} | "
            f"{fmt(r.commits_per_request, 3)} |"
        )
    lines += [
        "",
        "pgbench-cas:",
        "",
        "```sql",
        PGBENCH_CAS.strip(),
        "```",
        "",
        "pgbench-batch (100 rows per transaction):",
        "",
        "```sql",
        PGBENCH_BATCH.strip(),
        "```",
    ]
    return lines
