"""The database's ceiling (pgbench) and the baseline: an older commit in a git worktree."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ops.lib.bench.contenders import Baseline, Topics, processor, processor_env
from ops.lib.bench.costs import Result, box_busy, tree_cpu
from ops.lib.bench.environment import Env, commits, reset_database
from ops.lib.bench.text import fmt
from ops.lib.bench.workload import Workload, say
from ops.lib.common import ROOT


async def pgbench(
    env: Env,
    name: str,
    script: str,
    workload: Workload,
    clients: int,
    seconds: float,
    batch: int = 1,
) -> Result:
    batch = max(1, min(batch, workload.keys // clients))  # distinct keys per transaction
    result = Result(name, "pgbench", workload.describe())
    result.extra.update(clients=clients, batch=batch)
    assert env.pgbench is not None
    await reset_database(env, workload.keys)
    path = env.workdir / f"{name}.sql"
    path.write_text(script)
    defines = {
        "keys": workload.keys,
        "hot_ppm": round(workload.hot * 1e6),
        "conflict_ppm": round(workload.conflict * 1e6),
        "batch": batch,
        "clients": clients,
        "lane_keys": workload.keys // clients,
    }
    cmd = [
        env.pgbench,
        *("-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 2))),
        *("-T", str(max(1, round(seconds))), "-f", str(path)),
        *(f"-D{k}={v}" for k, v in defines.items()),
        env.dsn,
    ]
    commits0 = await commits(env)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    pg0, box0, t0 = tree_cpu(env.postgres_pid), box_busy(), time.monotonic()
    out = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # pgbench's backends exit with it: let the postmaster reap them (into its cutime), or
    # one reaped between reading cutime and listing children is counted nowhere.
    await asyncio.sleep(0.5)
    pg1, box1, t1 = tree_cpu(env.postgres_pid), box_busy(), time.monotonic()
    found = re.search(r"tps = ([\d.]+)", out.stdout)
    if out.returncode != 0 or not found:
        result.fail(f"pgbench failed: {out.stderr.strip()[-500:]}")
        return result
    result.throughput = float(found.group(1)) * batch
    done = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
    transactions = int(done.group(1)) if done else 0
    result.requests = transactions * batch
    result.seconds = seconds
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    per_k = 1000 / max(1, result.requests)
    result.worker_cpu_per_1k = cpu * per_k
    if env.postgres_pid:
        result.postgres_cpu_per_1k = (pg1 - pg0) * per_k
        result.foreign_cores = max(0.0, (box1 - box0) - cpu - (pg1 - pg0)) / (t1 - t0)
    result.commits_per_request = (await commits(env) - commits0) / max(1, result.requests)
    return result


async def pgbench_best(
    env: Env,
    name: str,
    script: str,
    workload: Workload,
    counts: Sequence[int],
    seconds: float,
    batch: int = 1,
) -> tuple[Result, list[Result]]:
    runs = []
    for clients in counts:
        r = await pgbench(env, name, script, workload, clients, seconds, batch)
        say(
            f"pgbench {name}: {clients} clients: {r.throughput:,.0f} req/s, "
            f"other load {fmt(r.foreign_cores, 2)} cores"
        )
        runs.append(r)
    best = max(runs, key=lambda r: (r.ok, r.throughput))
    return best, runs


def add_baseline(rev: str, workdir: Path) -> Baseline:
    """``git worktree add --detach <workdir>/baseline REV``; checks that ``python -m
    processor`` with the baseline's environment imports that tree's package."""
    found = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", "--short", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if found.returncode != 0:
        raise SystemExit(f"bench: --baseline {rev!r} is not a commit of {ROOT}")
    short = found.stdout.strip()
    path = workdir / "baseline"
    if path.exists():
        raise SystemExit(f"bench: {path} exists: remove it or choose another --workdir")
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), short],
        check=True,
        capture_output=True,
    )
    baseline = Baseline(short, path)
    probe = subprocess.run(
        [sys.executable, "-c", "import processor; print(processor.__file__)"],
        env={**os.environ, **baseline.env},
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    imported = Path(probe.stdout.strip() or "?").resolve()
    if probe.returncode != 0 or not imported.is_relative_to(path.resolve()):
        remove_baseline(baseline)
        raise SystemExit(
            f"bench: the baseline environment imports processor from {imported}, not from "
            f"{path}: {probe.stderr.strip()[-300:]}"
        )
    say(f"baseline {short} in {path}")
    return baseline


def migrate_baseline(env: Env, baseline: Baseline) -> None:
    """The old worker's ledger DDL (its offset_marks table), by its own ``migrate``."""
    c = processor(1, 1, baseline=baseline)
    out = subprocess.run(
        [sys.executable, "-m", "processor", "migrate"],
        env={**os.environ, **processor_env(env, Topics.fresh("migrate"), c)},
        cwd=env.workdir,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"bench: the baseline's migrate failed: {out.stderr.strip()[-500:]}")


def remove_baseline(baseline: Baseline) -> None:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline.path)],
        capture_output=True,
    )
