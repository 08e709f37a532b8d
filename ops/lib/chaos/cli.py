"""``ops/chaos``'s command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence

import asyncpg
from aiokafka.errors import KafkaError

from ops.lib.chaos.config import (
    EXIT_ANOMALIES,
    EXIT_SETUP,
    ROUTED_NODE,
    SetupError,
    parse_args,
    say,
)
from ops.lib.chaos.private_stack import PrivateStack
from ops.lib.chaos.proxy import Proxy, netem_probe
from ops.lib.chaos.report import render
from ops.lib.chaos.run import run
from processor.config import redact_url


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    (cfg.workdir / "logs").mkdir(exist_ok=True)
    try:
        stack = PrivateStack(cfg.workdir / "stack", cfg.workdir / "logs" / "stack.log", cfg.cluster)
    except SetupError as exc:
        say(f"error: {exc}")
        return EXIT_SETUP
    broker_proxy: Proxy | None = None
    if cfg.cluster:  # listening before the brokers start: one of them advertises its port
        broker_proxy = Proxy(0, cfg.seed + 2)
        stack.route = broker_proxy.start()
    say(
        f"seed {cfg.seed}; workdir {cfg.workdir}; private {'cluster ' if cfg.cluster else ''}"
        f"stack: kafka {stack.bootstrap}, postgres {redact_url(stack.database_url())}"
    )
    netem = netem_probe()
    say(
        "network faults: "
        + (
            "tc netem is available, but the proxy is used (see docs/chaos.md)"
            if netem is None
            else f"userspace TCP proxy ({netem})"
        )
    )
    t0 = time.monotonic()
    try:
        say("starting the private stack (ops/stack up)")
        stack.up()
        if broker_proxy is not None:
            routed = stack.status()["nodes"][f"kafka-{ROUTED_NODE}"]["routed_port"]
            broker_proxy.upstream_port = int(routed)
        summary = asyncio.run(run(cfg, stack, netem, broker_proxy))
    except SetupError as exc:
        say(f"error: {exc}")
        return EXIT_SETUP
    except (OSError, asyncpg.PostgresError, KafkaError, TimeoutError) as exc:
        say(f"error: the stack failed outside a fault: {exc!r}")
        return EXIT_SETUP
    finally:
        if not cfg.keep_stack:
            with contextlib.suppress(SetupError):
                stack.down()
    summary["wall_seconds"] = round(time.monotonic() - t0, 1)
    print(render(summary))
    if cfg.json_path is not None:
        cfg.json_path.write_text(json.dumps(summary, indent=1) + "\n")
        say(f"result written to {cfg.json_path} ({summary['wall_seconds']:.0f}s in all)")
    return 0 if summary["ok"] else EXIT_ANOMALIES
