"""``processor loadtest``: its flags and the command (exit 1 when an invariant broke)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from processor.config import Settings
from processor.errors import (
    ConfigError,
)
from processor.tools.loadtest.model import LoadOptions
from processor.tools.loadtest.report import dump, summary, write_plot
from processor.tools.loadtest.run import run_loadtest


def _skew(value: str) -> float:
    if value.lower() in ("max", "inf"):
        return math.inf
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError("must be >= 0 or max")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = LoadOptions()
    a = parser.add_argument
    a("--duration", type=float, default=d.duration, help="seconds of load [%(default)s]")
    a("--mode", choices=("closed", "open"), default=d.mode, help="loop kind [%(default)s]")
    a("--clients", type=int, default=d.clients, help="virtual clients (closed) [%(default)s]")
    a("--rate", type=float, default=d.rate, help="operations/s (open loop) [%(default)s]")
    a("--max-in-flight", type=int, default=d.max_in_flight, help="open loop cap [%(default)s]")
    a("--rows", type=int, default=d.rows, help="counter rows [%(default)s]")
    a("--skew", type=_skew, default=d.skew, help="Zipf exponent; 0 uniform, max one row [0]")
    a("--delete-share", type=float, default=d.delete_share, help="deletes [%(default)s]")
    a("--stale-share", type=float, default=d.stale_share, help="stale updates [%(default)s]")
    a(
        "--delete-rows",
        type=int,
        default=d.delete_rows,
        help="rows seeded for deletes [%(default)s]",
    )
    a("--first-id", type=int, default=d.first_id, help="first row id used [%(default)s]")
    a("--entity", default=d.entity, help="counter entity of the registry [%(default)s]")
    a("--attempts", type=int, default=d.attempts, help="read-modify-write tries [%(default)s]")
    a("--backoff", type=float, default=d.backoff, help="base backoff, s [%(default)s]")
    a("--timeout", type=float, default=d.timeout, help="per-request reply timeout [%(default)s]")
    a("--ready-timeout", type=float, default=d.ready_timeout, help="wait for workers [%(default)s]")
    a("--with-worker", type=int, default=0, metavar="N", help="start N `processor run` for the run")
    a("--seed", type=int, default=None, help="random seed")
    a(
        "--json",
        type=Path,
        metavar="PATH",
        help="write the result as JSON to this file (a directory: loadtest.json in it) [none]",
    )
    a(
        "--plot",
        type=Path,
        metavar="PATH",
        help="draw latency and throughput to this PNG (a directory: loadtest.png in it) [none]",
    )
    a("--no-plot", action="store_true", help="do not draw the plot, even with --plot")
    a("--no-progress", action="store_true", help="no progress line on stderr")
    a(
        "--worker-logs",
        type=Path,
        metavar="DIR",
        help="--with-worker: write the workers' logs here and keep them [a temporary "
        "directory, removed after a clean run]",
    )
    a(
        "--keep-rows",
        action="store_true",
        help="leave the seeded rows in the table (default: deleted after the checks)",
    )


def _output(path: Path | None, flag: str, name: str) -> Path | None:
    """Where an output goes, checked now (not after the run): a directory gets ``name``."""
    if path is None:
        return None
    target = (path / name if path.is_dir() else path).resolve()
    if not target.parent.is_dir():
        raise ConfigError(f"{flag} {path}: the directory {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise ConfigError(f"{flag} {path}: the directory {target.parent} is not writable")
    return target


async def run_from_args(settings: Settings, args: argparse.Namespace) -> int:
    opts = LoadOptions(
        duration=args.duration,
        mode=args.mode,
        clients=args.clients,
        rate=args.rate,
        max_in_flight=args.max_in_flight,
        rows=args.rows,
        skew=args.skew,
        delete_share=args.delete_share,
        stale_share=args.stale_share,
        delete_rows=args.delete_rows,
        first_id=args.first_id,
        entity=args.entity,
        attempts=args.attempts,
        backoff=args.backoff,
        timeout=args.timeout,
        ready_timeout=args.ready_timeout,
        with_worker=args.with_worker,
        seed=args.seed,
        json_path=_output(args.json, "--json", "loadtest.json"),
        plot_path=None if args.no_plot else _output(args.plot, "--plot", "loadtest.png"),
        progress=not args.no_progress,
        worker_logs=args.worker_logs,
        keep_rows=args.keep_rows,
    )
    result = await run_loadtest(settings, opts)
    print(summary(result))
    if opts.json_path is not None:
        opts.json_path.write_text(dump(result))
        print(f"result written to {opts.json_path}")
    if opts.plot_path is not None:
        print(write_plot(result, opts.plot_path))
    if not result["invariants"]["ok"]:
        broken = [c["name"] for c in result["invariants"]["checks"] if not c["ok"]]
        print(f"\nLOADTEST FAILED: invariant(s) broken: {'; '.join(broken)}", file=sys.stderr)
        return 1
    return 0
