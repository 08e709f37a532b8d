"""``ops/bench``'s command line and its outputs (results JSON, report, plots, notes)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ops.lib.bench.costs import Result
from ops.lib.bench.environment import prepare
from ops.lib.bench.pgbench import add_baseline, migrate_baseline, remove_baseline
from ops.lib.bench.plots import plot
from ops.lib.bench.report import report
from ops.lib.bench.whole import CURVES, PHASES, Config, config, machine, run_all
from ops.lib.bench.workload import say
from ops.lib.common import ROOT


def to_json(results: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "meta": meta,
        "contenders": [entry_json(e) for e in results["contenders"]],
        "compared_with": [entry_json(e) for e in results.get("compared_with", [])],
        "pgbench": [asdict(r) for r in results["pgbench"]],
        "curves": results["curves"],
        "best_processor": results["best_processor"],
    }


def entry_json(e: dict[str, Any]) -> dict[str, Any]:
    return {
        key: asdict(e[key]) if e.get(key) is not None else None for key in ("drain", "load", "idle")
    }


def entry_from_json(e: dict[str, Any]) -> dict[str, Any]:
    return {key: Result(**e[key]) if e.get(key) else None for key in ("drain", "load", "idle")}


def from_json(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "contenders": [entry_from_json(e) for e in data["contenders"]],
        "compared_with": [entry_from_json(e) for e in data.get("compared_with", [])],
        "pgbench": [Result(**r) for r in data["pgbench"]],
        "curves": data["curves"],
        "best_processor": data["best_processor"],
    }


def write_outputs(
    cfg: Config,
    results: dict[str, Any],
    meta: dict[str, Any],
    report_path: Path,
    plots_dir: Path,
    notes: Path | None,
) -> None:
    plots = plot(results, plots_dir)
    text = report(
        cfg,
        meta["versions"],
        results,
        meta["command"],
        meta["machine"],
        meta["finished_load"],
        plots,
        report_path,
        notes.read_text() if notes is not None and notes.is_file() else None,
        meta.get("date", ""),
    )
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(text)
    (plots_dir / "results.json").write_text(json.dumps(to_json(results, meta), indent=1))


def all_ok(results: dict[str, Any]) -> bool:
    for e in results["contenders"]:
        for r in (e["drain"], e["load"], e.get("idle")):
            if r is not None and not r.ok:
                return False
    for curve in results["curves"].values():
        for point in curve:
            for r in (point.get("drain"), point.get("load"), point):
                if isinstance(r, dict) and "ok" in r and not r["ok"]:
                    return False
    return True


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def positive_list(text: str) -> tuple[int, ...]:
    return tuple(positive(x) for x in text.split(","))


def share_list(text: str) -> tuple[float, ...]:
    """Shares of a contender's drain rate, e.g. ``0.05,0.5,1``: each in (0, 2]."""
    shares = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            value = 0.0
        if not 0 < value <= 2:
            raise argparse.ArgumentTypeError(f"{item!r} is not a share in (0, 2]")
        shares.append(value)
    return tuple(shares)


def curve_set(text: str) -> frozenset[str]:
    names = frozenset(text.split(","))
    unknown = sorted(names - set(CURVES))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown curve(s) {', '.join(unknown)}: choose from {','.join(CURVES)}"
        )
    return names


def _parser() -> argparse.ArgumentParser:
    """``ops/bench``'s flags."""
    parser = argparse.ArgumentParser(
        prog="ops/bench", description="Benchmark the processor against its ceilings and peers."
    )
    parser.add_argument("--quick", action="store_true", help="CI-sized run (< 3 min)")
    parser.add_argument("--requests", type=int, help="backlog size of the comparison")
    parser.add_argument("--keys", type=int, help="distinct counters")
    parser.add_argument("--load-seconds", type=float, help="length of each open-loop run")
    parser.add_argument("--backlogs", help="backlog sizes of that curve, e.g. 10000,100000")
    parser.add_argument("--only", help=f"comma-separated phases: {','.join(PHASES)}")
    parser.add_argument(
        "--curves",
        type=curve_set,
        help=f"which curves the curves phase draws (all): {','.join(CURVES)}",
    )
    parser.add_argument(
        "--load-shares",
        type=share_list,
        help="offered loads of the load curve, as shares of the drain rate, e.g. 0.05,0.5,1",
    )
    parser.add_argument(
        "--partitions", type=positive, help="partitions of the request and reply topics (6)"
    )
    parser.add_argument("--workers", type=positive_list, help="processor worker counts, e.g. 1,2")
    parser.add_argument("--lanes", type=positive_list, help="processor lane counts tried, e.g. 2")
    parser.add_argument(
        "--idle-requests",
        type=int,
        help="requests of each processor's closed-loop idle run (300; 0: none)",
    )
    parser.add_argument(
        "--random-keys",
        action="store_true",
        help="every request under a Kafka key of its own (partitioned by its row still)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run each processor contender from this commit (a git worktree), e.g. a8821c1",
    )
    parser.add_argument(
        "--compare-with",
        type=Path,
        action="append",
        default=[],
        metavar="RESULTS_JSON",
        help="add that run's processor contenders to the old-vs-new section (e.g. the run at "
        "another partition count)",
    )
    parser.add_argument("--report", type=Path, help="where BENCHMARKS.md goes")
    parser.add_argument("--plots", type=Path, help="directory of the PNG plots")
    parser.add_argument("--workdir", type=Path, help="scratch: registry, pgbench scripts, logs")
    parser.add_argument("--database", help="the bench's own database (default <name>_bench)")
    parser.add_argument(
        "--notes",
        type=Path,
        help="text for the report's Findings section (default: docs/bench/notes.md, full runs)",
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="only rewrite the report and plots from a run's results.json",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.idle_requests is not None and args.idle_requests < 0:
        parser.error("--idle-requests must be >= 0")
    cfg = config(args)
    unknown = cfg.only - set(PHASES)
    if unknown:
        parser.error(f"unknown phases: {sorted(unknown)}")
    default_out = ROOT / ".cache" / "bench" / "quick" if cfg.quick else ROOT
    report_path = args.report or default_out / "BENCHMARKS.md"
    plots_dir = args.plots or (default_out / "plots" if cfg.quick else ROOT / "docs" / "bench")
    notes = args.notes or (None if cfg.quick else ROOT / "docs" / "bench" / "notes.md")
    if args.render:
        data = json.loads(args.render.read_text())
        saved = from_json(data)
        write_outputs(cfg, saved, data["meta"], report_path, plots_dir, notes)
        say(f"rewrote {report_path} and the plots in {plots_dir}")
        return 0 if all_ok(saved) else 1
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    command = "ops/bench " + " ".join(argv if argv is not None else sys.argv[1:])
    started = machine()
    say(f"workdir {workdir}; load average {started['load average at start']}")
    t0 = time.monotonic()
    compared = []
    for path in args.compare_with:
        try:
            compared += from_json(json.loads(path.read_text()))["contenders"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.error(f"--compare-with {path}: not a bench results.json ({exc})")
    env = asyncio.run(prepare(workdir, cfg.partitions, args.database))
    baseline = add_baseline(args.baseline, workdir) if args.baseline else None
    try:
        if baseline is not None:
            migrate_baseline(env, baseline)
            env.versions["baseline"] = baseline.rev
        results = asyncio.run(run_all(cfg, env, baseline))
    finally:
        if baseline is not None:
            remove_baseline(baseline)
    results["compared_with"] = compared
    load1, load5, load15 = os.getloadavg()
    meta = {
        "command": command.strip(),
        "machine": started,
        "finished_load": f"{load1:.2f} {load5:.2f} {load15:.2f}",
        "versions": env.versions,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    write_outputs(cfg, results, meta, report_path, plots_dir, notes)
    ok = all_ok(results)
    say(f"done in {time.monotonic() - t0:.0f}s: {report_path}" + ("" if ok else " (FAILURES)"))
    return 0 if ok else 1
