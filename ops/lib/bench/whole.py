"""The whole benchmark: its configuration and every run in order, the load curves included."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Final

from ops.lib.bench.contenders import Baseline, Contender, processor
from ops.lib.bench.costs import Result
from ops.lib.bench.environment import Env
from ops.lib.bench.pgbench import pgbench_best
from ops.lib.bench.runs import drain, idle, load, logged_transactions
from ops.lib.bench.workload import PGBENCH_BATCH, PGBENCH_CAS, Plan, Workload, say

#: The curves of the "curves" phase (``--curves``): offered load, hot-key skew, batch size,
#: backlog size.
CURVES: Final = ("load", "skew", "batch", "backlog")


@dataclass(slots=True)
class Config:
    quick: bool
    requests: int
    keys: int
    conflict: float
    partitions: int
    load_seconds: float
    pgbench_seconds: float
    pgbench_clients: tuple[int, ...]
    lanes: tuple[int, ...]
    workers: tuple[int, ...]
    load_shares: tuple[float, ...]
    skews: tuple[float, ...]
    batches: tuple[int, ...]
    backlogs: tuple[int, ...]
    only: frozenset[str]
    idle_requests: int = 300
    random_keys: bool = False
    curves: frozenset[str] = frozenset(CURVES)

    @property
    def workload(self) -> Workload:
        return Workload(
            self.requests, self.keys, conflict=self.conflict, random_keys=self.random_keys
        )


def config(args: argparse.Namespace) -> Config:
    if args.quick:
        base = Config(
            quick=True,
            requests=5_000,
            keys=1_000,
            conflict=0.1,
            partitions=6,
            load_seconds=3,
            pgbench_seconds=2,
            pgbench_clients=(4, 16),
            lanes=(2,),
            workers=(1, 2),
            load_shares=(0.25, 0.75),
            skews=(0.0, 1.0),
            batches=(100, 1000),
            backlogs=(1_000, 5_000),
            only=frozenset(),
            idle_requests=100,
        )
    else:
        base = Config(
            quick=False,
            requests=100_000,
            keys=10_000,
            conflict=0.1,
            partitions=6,
            load_seconds=15,
            pgbench_seconds=10,
            pgbench_clients=(1, 4, 16, 32),
            lanes=(1, 2, 4),
            workers=(1, 2),
            load_shares=(0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
            skews=(0.0, 0.5, 0.9, 0.99, 1.0),
            batches=(10, 50, 100, 250, 500, 1000, 2000),
            backlogs=(10_000, 100_000, 1_000_000),
            only=frozenset(),
        )
    if args.requests:
        base.requests = args.requests
    if args.keys:
        base.keys = args.keys
    if args.load_seconds:
        base.load_seconds = args.load_seconds
    if args.backlogs:
        base.backlogs = tuple(int(x) for x in args.backlogs.split(","))
    if args.only:
        base.only = frozenset(args.only.split(","))
    if args.partitions is not None:
        base.partitions = args.partitions
    base.random_keys = args.random_keys
    if args.workers:
        base.workers = args.workers
    if args.lanes:
        base.lanes = args.lanes
    if args.idle_requests is not None:
        base.idle_requests = args.idle_requests
    if args.load_shares:
        base.load_shares = args.load_shares
    if args.curves:
        base.curves = args.curves
    return base


PHASES: Final = ("pgbench", "kafka", "naive", "faststream", "processor", "curves")


# Long (~90 lines) on purpose: the benchmark's phases in the order they run, read top to
# bottom in one place; each phase is a call (drain, load, idle, pgbench_best, curves).
async def run_all(cfg: Config, env: Env, baseline: Baseline | None = None) -> dict[str, Any]:
    wanted = cfg.only or frozenset(PHASES)
    w = cfg.workload
    contenders: list[dict[str, Any]] = []  # {"drain": Result, "load": Result | None}
    pgbench_runs: list[Result] = []
    curves: dict[str, list[dict[str, Any]]] = {}

    async def drain_and_load(c: Contender, plan: Plan) -> dict[str, Any]:
        d = await drain(env, c, plan)
        entry: dict[str, Any] = {"drain": d, "load": None, "idle": None}
        if d.throughput > 0:
            entry["load"] = await load(env, c, w, d.throughput * 0.5, cfg.load_seconds)
        return entry

    if "pgbench" in wanted:
        if env.pgbench is None:
            say("pgbench not found: skipping the database ceiling")
        else:
            best, runs = await pgbench_best(
                env, "pgbench-cas", PGBENCH_CAS, w, cfg.pgbench_clients, cfg.pgbench_seconds
            )
            pgbench_runs += runs
            contenders.append({"drain": best, "load": None, "idle": None})
            batch_counts = tuple(c for c in (1, 2, 4) if c <= max(cfg.pgbench_clients))
            best, runs = await pgbench_best(
                env, "pgbench-batch", PGBENCH_BATCH, w, batch_counts, cfg.pgbench_seconds, 100
            )
            pgbench_runs += runs
            contenders.append({"drain": best, "load": None, "idle": None})

    plan = Plan(w, cfg.partitions)
    say(f"workload: {w.describe()}; {plan.successes:,} must succeed")
    if "kafka" in wanted:
        contenders.append(await drain_and_load(Contender("kafka", "kafka"), plan))
        contenders.append(await drain_and_load(Contender("kafka-txn", "kafka-txn"), plan))
    if "naive" in wanted:
        contenders.append(await drain_and_load(Contender("naive", "naive"), plan))
    if "faststream" in wanted:
        contenders.append(await drain_and_load(Contender("faststream", "faststream"), plan))

    best_processor: Contender | None = None
    if "processor" in wanted:
        tuning: list[Result] = []
        # Each configuration of the current code next to the same one run from the baseline
        # worktree, interleaved so that a drift of the machine's load hits both alike.
        variants = [None, baseline] if baseline else [None]
        for workers in cfg.workers:
            tried: dict[Baseline | None, list[Result]] = {v: [] for v in variants}
            for lanes in cfg.lanes:
                for variant in variants:
                    r = await drain(env, processor(workers, lanes, baseline=variant), plan)
                    tried[variant].append(r)
                    tuning.append(r)
            for variant in variants:
                best = max(tried[variant], key=lambda r: (r.ok, r.throughput))
                c = processor(workers, int(best.extra["lanes"]), baseline=variant)
                entry = {"drain": best, "load": None, "idle": None}
                if best.throughput > 0:
                    entry["load"] = await load(env, c, w, best.throughput * 0.5, cfg.load_seconds)
                if cfg.idle_requests:
                    entry["idle"] = await idle(env, c, w, cfg.idle_requests)
                if best.transactions_per_1k is None and best.ok:
                    await count_logged_transactions(env, c, plan, best)
                lr = entry["load"]
                if lr is not None and lr.transactions_per_1k is None and lr.ok:
                    await count_logged_load_transactions(env, c, w, lr, cfg.load_seconds)
                contenders.append(entry)
        curves["lanes"] = [asdict(r) for r in tuning]
        ranked = [
            e
            for e in contenders
            if e["drain"].name.startswith("processor") and e["drain"].extra.get("baseline") is None
        ]
        if ranked:
            top = max(ranked, key=lambda e: (e["drain"].ok, e["drain"].throughput))["drain"]
            best_processor = processor(top.extra["workers"], top.extra["lanes"])

    if "curves" in wanted and best_processor is not None:
        curves.update(
            await processor_curves(cfg, env, best_processor, contenders, baseline=baseline)
        )

    return {
        "contenders": contenders,
        "pgbench": pgbench_runs,
        "curves": curves,
        "best_processor": best_processor.name if best_processor else None,
    }


async def count_logged_transactions(env: Env, c: Contender, plan: Plan, into: Result) -> None:
    """An old (per-partition) worker has no transaction metric: drain the same backlog
    again with debug logging (not the timed drain: logging costs) and count the
    transactions it logged."""
    d = await drain(env, c, plan, log_level="debug")
    if not d.ok:
        into.fail(f"the debug-logged drain counting transactions failed: {d.problems}")
        return
    into.transactions_per_1k = logged_transactions(d.extra["logs"]) * 1000 / len(plan)
    into.extra["transactions_counted_by"] = "debug log"
    into.extra["debug_drain_throughput"] = d.throughput


async def count_logged_load_transactions(
    env: Env, c: Contender, workload: Workload, into: Result, seconds: float
) -> None:
    """As count_logged_transactions, for the open loop at half drain: the same rate again,
    with debug logging, untimed."""
    assert into.offered is not None
    lr = await load(env, c, workload, into.offered, seconds, log_level="debug")
    if not lr.ok:
        into.fail(f"the debug-logged load run counting transactions failed: {lr.problems}")
        return
    logged = logged_transactions(lr.extra["logs"], since=lr.extra["timed_from"])
    into.transactions_per_1k = logged * 1000 / lr.requests
    into.extra["transactions_counted_by"] = "debug log"


async def processor_curves(
    cfg: Config,
    env: Env,
    c: Contender,
    contenders: list[dict[str, Any]],
    baseline: Baseline | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """The curves of ``c``; the load curve also of ``c`` run from ``baseline`` if given,
    at the same offered loads, each point right after the current code's."""
    w = cfg.workload
    own = next(e for e in contenders if e["drain"].name == c.name)["drain"]
    out: dict[str, list[dict[str, Any]]] = {"load": [], "skew": [], "batch": [], "backlog": []}
    say(f"curves for {c.name} (drain {own.throughput:,.0f} req/s)")
    old = processor(c.workers, c.lanes, c.max_batch, baseline) if baseline else None
    for share in cfg.load_shares if "load" in cfg.curves else ():
        for contender in (c, old) if old else (c,):
            r = await load(env, contender, w, own.throughput * share, cfg.load_seconds)
            out["load"].append({"share": share, **asdict(r)})
    for hot in cfg.skews if "skew" in cfg.curves else ():
        sw = replace(w, hot=hot)
        d = await drain(env, c, Plan(sw, cfg.partitions))
        lr = (
            await load(env, c, sw, max(1.0, d.throughput * 0.5), cfg.load_seconds)
            if d.throughput
            else None
        )
        out["skew"].append({"hot": hot, "drain": asdict(d), "load": asdict(lr) if lr else None})
    for size in cfg.batches if "batch" in cfg.curves else ():
        bc = replace(c, name=f"{c.name}-b{size}", max_batch=size)
        d = await drain(env, bc, Plan(w, cfg.partitions))
        lr = (
            await load(env, bc, w, max(1.0, d.throughput * 0.5), cfg.load_seconds)
            if d.throughput
            else None
        )
        out["batch"].append(
            {"max_batch": size, "drain": asdict(d), "load": asdict(lr) if lr else None}
        )
    for size in cfg.backlogs if "backlog" in cfg.curves else ():
        d = await drain(env, c, Plan(replace(w, requests=size), cfg.partitions), stall=120)
        out["backlog"].append({"requests": size, "drain": asdict(d)})
    return out


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError, IndexError, ValueError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kb / 2**20:.1f} GiB"
    load1, load5, load15 = os.getloadavg()
    return {
        "nproc": str(os.cpu_count()),
        "memory": memory,
        "cpu": cpu,
        "kernel": platform.release(),
        "load average at start": f"{load1:.2f} {load5:.2f} {load15:.2f}",
    }


def by_offered_load(ax: Any, ylabel: str) -> None:
    """Log-log axes of a load-curve plot: offered load across, ``ylabel`` up."""
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel(ylabel)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
