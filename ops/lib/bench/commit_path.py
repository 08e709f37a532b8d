"""The report's commit-path and load-curve sections."""

from __future__ import annotations

from typing import Any

from ops.lib.bench.costs import Result
from ops.lib.bench.runs import PHASE_NAMES
from ops.lib.bench.text import fmt, per_transaction, ratio


# Long (~100 lines): a third of it is the section's fixed prose and table headers; the
# logic (columns, rows, new/old pairs) is the rest, kept next to the text it fills.
def commit_path(results: dict[str, Any]) -> list[str]:
    """Old vs new commit path: the processor contenders of this run and of the runs given
    by --compare-with (e.g. the same comparison at another partition count)."""
    entries = [*results["contenders"], *results.get("compared_with", [])]
    procs = [e for e in entries if e["drain"].name.startswith("processor")]
    if not any(e["drain"].extra.get("baseline") for e in procs):
        return []

    def parts(e: dict[str, Any]) -> int | None:
        value = e["drain"].extra.get("partitions")
        return int(value) if value is not None else None

    def idle_of(e: dict[str, Any]) -> Result | None:
        r: Result | None = e.get("idle")
        return r

    def half(e: dict[str, Any], what: str) -> float | None:
        lr: Result | None = e["load"]
        return getattr(lr, what) if lr else None

    def idle_ms(e: dict[str, Any], what: str) -> float | None:
        r = idle_of(e)
        return getattr(r, what) if r else None

    def correct(e: dict[str, Any]) -> bool:
        return all(r.ok for r in (e["drain"], e["load"], idle_of(e)) if r is not None)

    columns = (
        ("drain", lambda e: e["drain"].throughput),
        ("p50", lambda e: half(e, "p50_ms")),
        ("p99", lambda e: half(e, "p99_ms")),
        ("idle p50", lambda e: idle_ms(e, "p50_ms")),
        ("idle p99", lambda e: idle_ms(e, "p99_ms")),
        ("txn", lambda e: e["drain"].transactions_per_1k),
        ("txn half", lambda e: half(e, "transactions_per_1k")),
        ("cpu", lambda e: e["drain"].worker_cpu_per_1k),
    )
    lines = [
        "## Old vs new commit path",
        "",
        "The current worker (one transactional producer per worker, one Kafka transaction per",
        "batch over all its partitions, KIP-447) against the baseline commit (`@<rev>`: one",
        "producer and one transaction per input partition per batch), run from a git worktree",
        "on the same box, one after the other on the same backlog. p50/p99: open loop at half",
        "of the contender's own drain rate; idle: one closed-loop client (send, wait for the",
        "reply read_committed, send the next). Transactions/1k are counted during the drain",
        "and during the open loop at half drain (after its warm-up), from the worker's",
        "/metrics (`processor_kafka_transactions_total`) before and after; a worker without",
        "that metric (the per-partition design) by its debug log instead (`batch committed`",
        "lists one transaction per partition) in a second, untimed run of the same drain or",
        "rate. The `counted by` column says which. In a drain a batch (PROCESSOR_MAX_BATCH",
        "records) is mostly filled from one or two partitions' fetched data, so both designs",
        "make about one transaction per batch there; the difference shows at half drain.",
        "",
        "| contender | partitions | drain req/s | p50 ms | p99 ms | idle p50 ms | idle p99 ms "
        "| transactions/1k drain | transactions/1k half drain | counted by | worker CPU s/1k "
        "| correct |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    order = sorted(
        procs, key=lambda e: (parts(e) or 0, e["drain"].extra.get("workers", 0), e["drain"].name)
    )
    for e in order:
        d = e["drain"]
        vals = [f(e) for _, f in columns]
        lines.append(
            f"| {d.name} | {fmt(parts(e))} | {fmt(vals[0])} | {fmt(vals[1], 1)} | "
            f"{fmt(vals[2], 1)} | {fmt(vals[3], 1)} | {fmt(vals[4], 1)} | {fmt(vals[5], 1)} | "
            f"{fmt(vals[6], 1)} | {d.extra.get('transactions_counted_by', '-')} | "
            f"{fmt(vals[7], 3)} | "
            f"{'yes' if correct(e) else '**FAILED**'} |"
        )

    def pairing(e: dict[str, Any]) -> tuple[int | None, Any]:
        return parts(e), e["drain"].extra.get("workers")

    olds = [e for e in order if e["drain"].extra.get("baseline")]
    pairs = [
        (new, old)
        for new in order
        if not new["drain"].extra.get("baseline")
        for old in olds
        if pairing(old) == pairing(new)
    ]
    if pairs:
        lines += [
            "",
            "Ratios new/old (drain: higher is better; the others: lower is better):",
            "",
            "| new / old | partitions | drain | p50 | p99 | idle p50 | idle p99 "
            "| transactions/1k drain | transactions/1k half drain | worker CPU s/1k |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for new, old in pairs:
            cells = " | ".join(ratio(f(new), f(old)) for _, f in columns)
            lines.append(
                f"| {new['drain'].name} / {old['drain'].name} | {fmt(parts(new))} | {cells} |"
            )
    lines += ["", *commit_path_targets(entries, order), ""]
    return lines


def commit_path_targets(entries: list[dict[str, Any]], procs: list[dict[str, Any]]) -> list[str]:
    """Issue 11's targets, for every current-code processor contender."""

    def parts(e: dict[str, Any]) -> Any:
        return e["drain"].extra.get("partitions")

    def verdict(good: bool | None) -> str:
        return "n/a" if good is None else ("met" if good else "**not met**")

    kafka_txn = {parts(e): e["drain"] for e in entries if e["drain"].name == "kafka-txn"}
    new = [e for e in procs if not e["drain"].extra.get("baseline")]
    rows = []
    for e in new:
        d, lr, ir = e["drain"], e["load"], e.get("idle")
        where = f"| {d.name} | {fmt(parts(e))} "
        k = kafka_txn.get(parts(e))
        if k is not None and k.ok and k.throughput:
            got = d.throughput / k.throughput
            rows.append(
                where + f"| drain >= 1.5x kafka-txn ({fmt(k.throughput)} req/s) | {got:.2f}x "
                f"| {verdict(got >= 1.5)} |"
            )
        else:
            rows.append(
                where + "| drain >= 1.5x kafka-txn | not measured (add kafka to --only) | n/a |"
            )
        p99 = lr.p99_ms if lr else None
        rows.append(
            where + f"| p99 at half drain <= 100 ms | {fmt(p99, 1, ' ms')} "
            f"| {verdict(None if p99 is None else p99 <= 100)} |"
        )
        p50i, p99i = (ir.p50_ms, ir.p99_ms) if ir else (None, None)
        rows.append(
            where + f"| idle p50 <= 10 ms | {fmt(p50i, 1, ' ms')} "
            f"| {verdict(None if p50i is None else p50i <= 10)} |"
        )
        rows.append(
            where + f"| idle p99 <= 20 ms | {fmt(p99i, 1, ' ms')} "
            f"| {verdict(None if p99i is None else p99i <= 20)} |"
        )
        fewer = [
            o
            for o in new
            if o["drain"].extra.get("workers") == d.extra.get("workers")
            and parts(o) is not None
            and parts(e) is not None
            and parts(o) < parts(e)
        ]
        for o in fewer:
            got = d.throughput / max(o["drain"].throughput, 1e-9)
            rows.append(
                where + f"| drain >= 0.9x the {parts(o)}-partition drain "
                f"({o['drain'].name}, {fmt(o['drain'].throughput)} req/s) | {got:.2f}x "
                f"| {verdict(got >= 0.9)} |"
            )
    return [
        "Targets (issue 11), for the current code:",
        "",
        "| contender | partitions | target | measured | verdict |",
        "| --- | ---: | --- | ---: | --- |",
        *rows,
    ]


# Long (~80 lines): four small tables, one per curve, each its header and one row format.
def curve_tables(results: dict[str, Any]) -> list[str]:
    curves = results["curves"]
    lines: list[str] = []
    if curves.get("lanes"):
        lines += [
            "## Processor: workers and lanes (drain)",
            "",
            "| config | req/s | worker CPU s/1k | peak RSS MB | commits/req | other load "
            "| correct |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in curves["lanes"]:
            lines.append(
                f"| {r['name']} | {fmt(r['throughput'])} | {fmt(r['worker_cpu_per_1k'], 3)} | "
                f"{fmt(r['peak_rss_mb'])} | {fmt(r['commits_per_request'], 3)} | "
                f"{fmt(r['foreign_cores'], 2)} | {'yes' if r['ok'] else '**FAILED**'} |"
            )
        lines.append("")
    if curves.get("load"):
        lines += [
            "## Processor: offered load",
            "",
            "| contender | offered req/s | share of drain | achieved req/s | p50 ms | p99 ms "
            "| max ms "
            "| requests per Kafka transaction | ms per batch: database / wait / kafka "
            "| other load | correct |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for p in curves["load"]:
            phases = p.get("extra", {}).get("phase_ms") or {}
            lines.append(
                f"| {p['name']} | {fmt(p['offered'])} | {p['share']:.0%} | "
                f"{fmt(p['throughput'])} | "
                f"{fmt(p['p50_ms'], 1)} | {fmt(p['p99_ms'], 1)} | {fmt(p['max_ms'], 1)} | "
                f"{fmt(per_transaction(p), 1)} | "
                + " / ".join(fmt(phases.get(name), 1) for name in PHASE_NAMES)
                + " | "
                f"{fmt(p['foreign_cores'], 2)} | {'yes' if p['ok'] else '**FAILED**'} |"
            )
        lines.append("")
    for key, label, title in (
        ("skew", "hot", "hot-key skew (share of requests on one row)"),
        ("batch", "max_batch", "batch size (PROCESSOR_MAX_BATCH)"),
    ):
        if not curves.get(key):
            continue
        lines += [
            f"## Processor: {title}",
            "",
            f"| {label} | drain req/s | worker CPU s/1k | commits/req | p99 ms at 50% "
            "| other load | correct |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for p in curves[key]:
            d, lr = p["drain"], p["load"]
            ok = d["ok"] and (lr is None or lr["ok"])
            value = f"{p[label]:.0%}" if key == "skew" else str(p[label])
            lines.append(
                f"| {value} | {fmt(d['throughput'])} | {fmt(d['worker_cpu_per_1k'], 3)} | "
                f"{fmt(d['commits_per_request'], 3)} | {fmt(lr['p99_ms'] if lr else None, 1)} | "
                f"{fmt(d['foreign_cores'], 2)} | {'yes' if ok else '**FAILED**'} |"
            )
        lines.append("")
    if curves.get("backlog"):
        lines += [
            "## Processor: backlog size",
            "",
            "| backlog | drain req/s | worker CPU s/1k | PostgreSQL CPU s/1k | peak RSS MB "
            "| commits/req | other load | correct |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for p in curves["backlog"]:
            d = p["drain"]
            lines.append(
                f"| {p['requests']:,} | {fmt(d['throughput'])} | "
                f"{fmt(d['worker_cpu_per_1k'], 3)} | "
                f"{fmt(d['postgres_cpu_per_1k'], 3)} | {fmt(d['peak_rss_mb'])} | "
                f"{fmt(d['commits_per_request'], 3)} | {fmt(d['foreign_cores'], 2)} | "
                f"{'yes' if d['ok'] else '**FAILED**'} |"
            )
        lines.append("")
    return lines
