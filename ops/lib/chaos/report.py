"""The run's summary and its report (JSON and text)."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ops.lib.chaos.config import Config
from ops.lib.chaos.faults import Chaos
from ops.lib.chaos.load import Load
from ops.lib.chaos.private_stack import PrivateStack
from ops.lib.chaos.proxy import Proxy
from processor.audit import ANOMALIES, AuditReport
from processor.tools.chaos_check import (
    ALL_ANOMALIES,
    ClientHistory,
    Observed,
    Verdict,
)


# Long (~90 lines): most of it is the summary's JSON literal, every key of the report
# (docs/chaos.md) in one place.
def summarize(
    cfg: Config,
    stack: PrivateStack,
    netem: str | None,
    proxy: Proxy,
    result: dict[str, Any],
    history: ClientHistory,
    observed: Observed,
    audit: AuditReport | None,
    verdict: Verdict,
) -> dict[str, Any]:
    load: Load = result["load"]
    chaos: Chaos = result["chaos"]
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in cfg.kinds:
        records = [r for r in chaos.records if r.kind == kind]
        recoveries = [r.recovery for r in records if r.recovery is not None]
        disruptions = [r.disruption for r in records if r.disruption is not None]
        by_kind[kind] = {
            "injected": len(records),
            "not_recovered": sum(1 for r in records if r.recovery is None),
            "max_recovery_s": round(max(recoveries), 1) if recoveries else None,
            "max_disruption_s": round(max(disruptions), 1) if disruptions else None,
        }
    acked = sum(history.acked.values())
    seconds = max(result["load_s"], 1e-9)
    return {
        "ok": verdict.ok,
        "command": "ops/chaos " + " ".join(sys.argv[1:]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seed": cfg.seed,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "machine": {"cpus": os.cpu_count(), "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "stack": {"dir": str(stack.dir), "kafka": stack.bootstrap, "postgres_port": stack.pg_port},
        "network_faults": "tc netem" if netem is None else "userspace TCP proxy",
        "netem": "available" if netem is None else f"unavailable ({netem})",
        "figures": {
            "requests_sent": load.sends,
            "request_ids": len(load.request_ids),
            "resends": load.resends,
            "replies_to_clients": load.replies,
            "operations": sum(load.ops.values()),
            "increments_acked": acked,
            "increments_unknown": sum(history.unknown.values()),
            "version_conflicts_retried": load.conflicts,
            "stale_updates_accepted": len(history.stale_accepted),
            "deletes_ok": len(history.deleted),
            "hostile_records": len(history.hostile),
            "hostile_unknown": load.hostile_unknown,
            "unsettled": len(history.unsettled),
            "client_errors": dict(load.client_errors),
            "audit_counts": audit.counts if audit else None,
            "audit_outcomes": audit.outcomes if audit else None,
            "proxy_connections": proxy.connections,
            "proxy_resets": proxy.resets,
        },
        "ops": dict(sorted(load.ops.items())),
        "throughput": {
            "load_seconds": round(result["load_s"], 1),
            "fault_phase_seconds": round(result["fault_phase_s"], 1),
            "replies_per_s": round(load.replies / seconds, 1),
            "operations_per_s": round(sum(load.ops.values()) / seconds, 1),
            "increments_per_s": round(acked / seconds, 1),
            "baseline_replies_per_s": round(result["baseline"], 1),
        },
        "faults": {
            "injected": len(chaos.records),
            "by_kind": by_kind,
            "log": [
                {
                    "kind": r.kind,
                    "at_s": round(r.started, 1),
                    "healed_s": round(r.healed, 1),
                    "recovery_s": None if r.recovery is None else round(r.recovery, 2),
                    "detail": r.detail,
                }
                for r in chaos.records
            ],
        },
        "incidents": {
            "workers_exited_unexpectedly": {str(k): v for k, v in result["crashed"].items()},
            "worker_remove_exit_codes": chaos.faults.remove_codes,
            "quiet": result["quiet_why"],
            "quiet_settled": result["quiet_ok"],
        },
        "anomalies": verdict.anomalies,
        "examples": verdict.examples,
    }


def _audit_line(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "did not run"
    return (
        f"{counts['request_records']} request records ({counts['rejected']} rejected at "
        f"intake), {counts['replies']} replies, {counts['dead_letters']} dead letters, "
        f"{counts['ledger_rows']} ledger rows, {counts['chain_writes']} writes on "
        f"{counts['chain_records']} version chains"
    )


def render(summary: dict[str, Any]) -> str:
    f, t = summary["figures"], summary["throughput"]
    lines = [
        "",
        f"chaos run, seed {summary['seed']}: "
        + (
            "OK, no anomalies"
            if summary["ok"]
            else f"FAILED, {sum(summary['anomalies'].values())} anomalies"
        ),
        f"  network faults by {summary['network_faults']} (netem {summary['netem']})",
        f"  requests   {f['requests_sent']} sent ({f['request_ids']} request ids, "
        f"{f['resends']} resends), {f['replies_to_clients']} replies to the clients, "
        f"{f['hostile_records']} hostile records",
        f"  operations {f['operations']}: {f['increments_acked']} increments acknowledged "
        f"({f['increments_unknown']} unknown), {f['version_conflicts_retried']} conflicts "
        f"retried, {f['deletes_ok']} deletes, {f['stale_updates_accepted']} stale accepted, "
        f"{f['unsettled']} unsettled",
        f"  audit      {_audit_line(f['audit_counts'])}",
        f"  throughput {t['replies_per_s']} replies/s, {t['operations_per_s']} operations/s, "
        f"{t['increments_per_s']} increments/s over {t['load_seconds']}s "
        f"(baseline before faults {t['baseline_replies_per_s']} replies/s)",
        "",
        f"  {'fault':20} {'injected':>8} {'max recovery':>13} {'max disruption':>15}",
    ]
    for kind, v in summary["faults"]["by_kind"].items():
        rec = "-" if v["max_recovery_s"] is None else f"{v['max_recovery_s']:.1f}s"
        dis = "-" if v["max_disruption_s"] is None else f"{v['max_disruption_s']:.1f}s"
        if v["not_recovered"]:
            rec += f" ({v['not_recovered']} not)"
        lines.append(f"  {kind:20} {v['injected']:>8} {rec:>13} {dis:>15}")
    lines += ["", f"  {'anomaly':28} {'count':>6}"]
    for kind in ALL_ANOMALIES:
        n = summary["anomalies"].get(kind, 0)
        lines.append(f"  {kind:28} {n:>6}" + ("   <-- " if n else ""))
    for kind, examples in summary["examples"].items():
        if kind in ANOMALIES and not summary["anomalies"].get(kind):
            continue
        lines.append(f"  {kind}:")
        lines += [f"    - {e}" for e in examples]
    inc = summary["incidents"]
    if inc["workers_exited_unexpectedly"]:
        lines.append(f"  workers that exited on their own: {inc['workers_exited_unexpectedly']}")
    if any(inc["worker_remove_exit_codes"]):
        lines.append(f"  SIGTERM exit codes: {inc['worker_remove_exit_codes']}")
    return "\n".join(lines)
