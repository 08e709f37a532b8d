"""The load test's result as text, JSON and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from processor.tools.text import counted as _n


def summary(result: dict[str, Any]) -> str:
    """The human summary. Counts with thousands separators, rates and milliseconds with one
    decimal, everywhere."""
    t, lat = result["throughput"], result["latency_ms"]
    resent = result["requests"] - result["request_ids"]
    lines = [
        f"elapsed {result['elapsed_s']:,.1f} s: {_n(result['ops'], 'operation')}, "
        f"{_n(result['requests'], 'request')} ({result['request_ids']:,} request_ids, "
        f"{resent:,} resent), {result['replies']:,} replies received",
        f"throughput: {t['ops_per_s']:,.1f} operations/s, {t['requests_per_s']:,.1f} "
        f"requests/s, {t['increments_per_s']:,.1f} increments/s",
        f"latency (ms)  {'p50':>9} {'p90':>9} {'p99':>9} {'max':>9}  (nearest-rank percentiles)",
    ]
    for name in ("op", "request", "increment", "delete", "stale"):
        if lat.get(name):
            v = lat[name]
            label = "operation" if name == "op" else name
            lines.append(
                f"  {label:11} " + " ".join(f"{v[q]:>9,.1f}" for q in ("p50", "p90", "p99", "max"))
            )
    lines.append(f"conflicts (version mismatches retried): {result['conflicts']:,}")
    lines.append("outcomes: " + ", ".join(f"{k} {v:,}" for k, v in result["outcomes"].items()))
    rows = result.get("rows")
    if rows is not None:
        span = f"rows {rows['first']:,}-{rows['last']:,} of {rows['table']}"
        lines.append(
            f"{span}: kept (--keep-rows)"
            if rows["kept"]
            else f"{span}: deleted after the checks (--keep-rows keeps them)"
        )
    lines.append("invariants:")
    for check in result["invariants"]["checks"]:
        mark = "ok    " if check["ok"] else "BROKEN"
        lines.append(f"  {mark} {check['name']}: {check['detail']}")
    return "\n".join(lines)


def dump(result: dict[str, Any]) -> str:
    """The result as JSON: indented, but the samples and the timeline one entry a line."""
    head = {k: v for k, v in result.items() if k not in ("timeline", "samples")}
    text = json.dumps(head, indent=1)[:-2]
    for name in ("timeline", "samples"):
        rows = ",\n  ".join(json.dumps(row, separators=(",", ":")) for row in result[name])
        text += f',\n "{name}": [\n  {rows}\n ]'
    return text + "\n}\n"


def write_plot(result: dict[str, Any], path: Path) -> str:
    """Latency and throughput over time as a PNG; says what it did (or why not)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (
            "plot skipped: matplotlib is not installed "
            "(pip install 'processor[plot]', or the dev group)"
        )
    fig = figure(result)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot written to {path}"


def figure(result: dict[str, Any]) -> Any:
    """The plot's matplotlib figure (needs matplotlib): latency above, throughput below."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    samples = result["samples"]
    timeline = result["timeline"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    if samples:
        top.scatter(
            [s[0] for s in samples], [s[1] for s in samples], s=2, alpha=0.15, label="operation"
        )
    xs = [p["t"] + 0.5 for p in timeline]
    top.plot(xs, [p["p50_ms"] for p in timeline], color="black", label="p50 per second")
    top.plot(xs, [p["p99_ms"] for p in timeline], color="red", label="p99 per second")
    top.set_yscale("log")
    # Plain numbers of milliseconds (1, 10, 100, 1000), not powers of ten.
    top.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    top.set_ylabel("latency (ms)")
    top.legend(loc="upper right")
    top.grid(True, which="both", alpha=0.3)
    o = result["options"]
    op = result["latency_ms"].get("op", {})
    load = f"{o['clients']} clients" if o["mode"] == "closed" else f"{o['rate']} ops/s"
    top.set_title(
        f"processor loadtest: {o['mode']} loop, {load}, {o['rows']} rows, skew {o['skew']}"
        f" - operation p50 {_ms(op.get('p50'))} ms, p99 {_ms(op.get('p99'))} ms",
        fontsize=10,
    )
    # Throughput as rates over each bucket's length, during the load only: the drain after
    # it starts nothing new, and a short last bucket is not a fall in throughput.
    # (A result written before these fields existed: derived from the run's length.)
    end = result["elapsed_s"]
    loaded = [p for p in timeline if not p.get("drain", p["t"] >= o["duration"])]
    spans = [p.get("span_s", max(1e-3, min(1.0, end - p["t"]))) for p in loaded]
    lx = [p["t"] + span / 2 for p, span in zip(loaded, spans, strict=True)]
    for key, count, label in (
        ("ops_per_s", "ops", "operations/s"),
        ("requests_per_s", "requests", "requests/s"),
        ("conflicts_per_s", "conflicts", "version conflicts/s"),
    ):
        rates = [p.get(key, p[count] / span) for p, span in zip(loaded, spans, strict=True)]
        bottom.plot(lx, rates, label=label)
    for axis in (top, bottom):
        axis.axvline(o["duration"], color="grey", linestyle=":", linewidth=1)
        if end > o["duration"]:
            axis.axvspan(o["duration"], end, color="grey", alpha=0.12, linewidth=0)
    bottom.text(
        o["duration"],
        0.98,
        " drain",
        transform=bottom.get_xaxis_transform(),
        va="top",
        fontsize=8,
        color="grey",
    )
    bottom.set_xlabel("time (s)")
    bottom.set_ylabel("per second")
    bottom.legend(loc="lower left")
    bottom.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def _ms(value: Any) -> str:
    return f"{value:,.1f}" if isinstance(value, int | float) else "-"
