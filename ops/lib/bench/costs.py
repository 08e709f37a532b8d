"""Processes and their costs: CPU seconds and peak memory from /proc, and one result row."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ops.lib.bench.workload import CLK_TCK
from processor.tools.procs import children, proc_stat


def proc_cpu(pid: int, *, reaped_children: bool = False) -> float:
    """CPU seconds (user + system) of a live process; 0.0 if it is gone."""
    fields = proc_stat(pid)
    if fields is None:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def tree_cpu(pid: int | None) -> float:
    """CPU of a server and all its children, dead (reaped) or alive: PostgreSQL's backends."""
    if pid is None:
        return 0.0
    return proc_cpu(pid, reaped_children=True) + sum(proc_cpu(c) for c in children(pid))


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), bytes."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass(frozen=True, slots=True)
class CpuMark:
    at: float
    workers: float
    postgres: float
    kafka: float
    bench: float
    box: float  # busy CPU seconds of the whole machine (/proc/stat)


def box_busy() -> float:
    """CPU seconds the machine spent busy (not idle or iowait) since boot, all cores."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLK_TCK


@dataclass(slots=True)
class Result:
    name: str
    kind: str  # drain | load | pgbench
    workload: str
    requests: int = 0
    seconds: float = 0.0
    throughput: float = 0.0  # requests/s: drain rate, or the achieved rate under load
    offered: float | None = None  # load runs: requests/s offered
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    worker_cpu_per_1k: float | None = None
    postgres_cpu_per_1k: float | None = None
    kafka_cpu_per_1k: float | None = None
    bench_cpu_per_1k: float | None = None
    peak_rss_mb: float | None = None
    commits_per_request: float | None = None
    foreign_cores: float | None = None  # other processes' CPU during the run, in cores
    transactions_per_1k: float | None = None  # Kafka transactions the workers committed
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def fail(self, problem: str) -> None:
        self.ok = False
        self.problems.append(problem)
