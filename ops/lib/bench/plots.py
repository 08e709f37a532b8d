"""The plots (SVG through matplotlib when it is installed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ops.lib.bench.text import per_transaction
from ops.lib.bench.whole import by_offered_load


# Long (~90 lines): one matplotlib figure after another, each a few lines of axes and
# labels; split per figure it would pass the same results and directory five times.
def plot(results: dict[str, Any], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = directory / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made.append(path)

    entries = [e for e in results["contenders"] if e["drain"].ok]
    if entries:
        fig, ax = plt.subplots(figsize=(8, 4))
        names = [e["drain"].name for e in entries]
        ax.barh(names, [e["drain"].throughput for e in entries], color="tab:blue")
        ax.set_xlabel("drain throughput (requests/s)")
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        save(fig, "contenders_throughput")
    curves = results["curves"]
    if curves.get("load"):
        pts = [p for p in curves["load"] if p["p99_ms"] is not None]
        names = list(dict.fromkeys(p["name"] for p in pts))  # the current code first
        fig, ax = plt.subplots(figsize=(7, 4))
        for n, name in enumerate(names):
            mine = [p for p in pts if p["name"] == name]
            color = f"C{n}"
            xs = [p["offered"] for p in mine]
            ax.plot(xs, [p["p99_ms"] for p in mine], "o-", color=color, label=f"{name} p99")
            ax.plot(xs, [p["p50_ms"] for p in mine], "s--", color=color, label=f"{name} p50")
        ax.axhline(25, color="grey", ls=":", label="25 ms target")
        by_offered_load(ax, "latency (ms)")
        save(fig, "processor_load")
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = False
        for n, name in enumerate(names):
            batched = [
                (p["offered"], y)
                for p in pts
                if p["name"] == name and (y := per_transaction(p)) is not None
            ]
            if batched:
                # The cadence adapting to load: one commit per cycle, its batch what arrived.
                ax.plot(
                    [x for x, _ in batched],
                    [y for _, y in batched],
                    "o-",
                    color=f"C{n}",
                    label=name,
                )
                drawn = True
        if drawn:
            by_offered_load(ax, "requests per Kafka transaction")
            save(fig, "processor_batch_by_load")
        else:
            plt.close(fig)
    for key, label, xlabel in (
        ("skew", "hot", "share of requests on one row"),
        ("batch", "max_batch", "PROCESSOR_MAX_BATCH"),
        ("backlog", "requests", "backlog (requests)"),
    ):
        pts = [p for p in curves.get(key, []) if p["drain"]["ok"]]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [p[label] for p in pts]
        ax.plot(xs, [p["drain"]["throughput"] for p in pts], "o-", color="tab:blue")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("drain requests/s", color="tab:blue")
        if key in ("batch", "backlog"):
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        if key == "backlog":
            ax2.plot(xs, [p["drain"]["peak_rss_mb"] for p in pts], "s--", color="tab:red")
            ax2.set_ylabel("worker peak RSS (MB)", color="tab:red")
            ax2.set_ylim(bottom=0)
        else:
            p99 = [(x, p["load"]["p99_ms"]) for x, p in zip(xs, pts, strict=True) if p["load"]]
            ax2.plot([x for x, _ in p99], [y for _, y in p99], "s--", color="tab:red")
            ax2.set_ylabel("p99 ms at 50% of drain", color="tab:red")
        save(fig, f"processor_{key}")
    return made
