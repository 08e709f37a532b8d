"""The commands on the single-node stack (one Kafka node, one PostgreSQL server)."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from ops.lib.stack.config import (
    DEFAULT_PORTS,
    SERVICES,
    Stack,
    StackError,
    external_endpoints,
    locked,
    say,
)
from ops.lib.stack.kafka_node import java_cmd, kafka_version, start_kafka, stop_kafka
from ops.lib.stack.postgres import pg_bindir, start_postgres, stop_postgres
from ops.lib.stack.procs import check_port_free, in_parallel, kafka_pid, postgres_pid
from ops.lib.stack.readiness import wait_services


def running(stack: Stack) -> dict[str, int | None]:
    return {"kafka": kafka_pid(stack), "postgres": postgres_pid(stack)}


def check_recorded_ports(stack: Stack, pids: dict[str, int | None]) -> None:
    """A running service keeps its ports: asking for others is an error, not a restart."""
    try:
        recorded = json.loads(stack.ports_file.read_text())
    except (OSError, ValueError):
        return
    wanted = {
        "kafka_port": stack.kafka_port,
        "controller_port": stack.controller_port,
        "pg_port": stack.pg_port,
        "kafka_sasl_ssl_port": stack.kafka_sasl_ssl_port,
    }
    owners = {
        "kafka_port": "kafka",
        "controller_port": "kafka",
        "pg_port": "postgres",
        "kafka_sasl_ssl_port": "kafka",
    }
    for key, port in wanted.items():
        was = recorded.get(key, port) if key in DEFAULT_PORTS else recorded.get(key)
        if pids[owners[key]] and was != port:
            raise StackError(
                f"{owners[key]} is running in {stack.dir} on {key.replace('_', ' ')} "
                f"{was}, not {port}: run `ops/stack down` first"
            )


def served_from_outside(own: tuple[str, str], timeout: float) -> bool:
    """Whether services from outside (CI, compose, a cloud) are given: then they are
    waited for and nothing is started. The stack's own endpoints ``own`` (`eval "$(ops/stack
    env)"`) are not "outside"."""
    given = external_endpoints()
    if not given or given == own:
        return False
    say("KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL are set: starting nothing, waiting for them")
    asyncio.run(wait_services(given[0], given[1], timeout))
    return True


def cmd_up(stack: Stack, timeout: float) -> int:
    started = time.monotonic()
    if served_from_outside((stack.bootstrap, stack.database_url()), timeout):
        return 0
    with locked(stack.dir / "stack.lock"):
        pids = running(stack)
        check_recorded_ports(stack, pids)
        if pids["kafka"] is None:
            java_cmd()
            check_port_free(stack, "kafka_port", "Kafka")
            check_port_free(stack, "controller_port", "Kafka controller")
            if stack.kafka_sasl_ssl_port is not None:
                check_port_free(stack, "kafka_sasl_ssl_port", "Kafka SASL_SSL")
        if pids["postgres"] is None:
            pg_bindir()
            check_port_free(stack, "pg_port", "PostgreSQL")
        if all(pids.values()):
            say(f"already running (kafka pid {pids['kafka']}, postgres pid {pids['postgres']})")
        stack.dir.mkdir(parents=True, exist_ok=True)
        recorded: dict[str, Any] = {
            "kafka_port": stack.kafka_port,
            "controller_port": stack.controller_port,
            "pg_port": stack.pg_port,
        }
        if stack.kafka_sasl_ssl_port is not None:
            recorded["kafka_sasl_ssl_port"] = stack.kafka_sasl_ssl_port
            recorded["kafka_tls_dir"] = str(stack.kafka_tls_dir)
            recorded["kafka_tls_client_auth"] = stack.kafka_tls_client_auth
        stack.ports_file.write_text(json.dumps(recorded, indent=2) + "\n")
        starters = []
        if pids["kafka"] is None:
            starters.append(lambda: start_kafka(stack))
        if pids["postgres"] is None:
            starters.append(lambda: start_postgres(stack))
        in_parallel(starters)
        asyncio.run(wait_services(stack.bootstrap, stack.database_url(), timeout, stack=stack))
    if starters:
        say(f"stack up in {time.monotonic() - started:.1f}s: `ops/stack env` prints its endpoints")
    return 0


def cmd_down(stack: Stack, immediate: bool, services: Sequence[str] = SERVICES) -> int:
    with locked(stack.dir / "stack.lock"):
        stops = {"kafka": stop_kafka, "postgres": stop_postgres}
        in_parallel(
            [functools.partial(stops[s], stack, immediate) for s in SERVICES if s in services]
        )
        left = {name: pid for name, pid in running(stack).items() if pid and name in services}
    if left:
        raise StackError(f"still running after stop: {left}")
    return 0


def endpoints(stack: Stack) -> dict[str, str]:
    return endpoints_of(stack.bootstrap, stack.database_url())


def endpoints_of(bootstrap: str, database_url: str) -> dict[str, str]:
    given = external_endpoints()
    if given:
        return {"KAFKA_BOOTSTRAP_SERVERS": given[0], "DATABASE_URL": given[1]}
    return {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "DATABASE_URL": database_url}


def cmd_env(stack: Stack, as_json: bool, sasl_ssl: bool = False) -> int:
    values = endpoints(stack)
    if sasl_ssl:
        values = {**stack.sasl_ssl_settings(), "DATABASE_URL": values["DATABASE_URL"]}
    return print_env(values, as_json)


def print_env(values: dict[str, str], as_json: bool) -> int:
    """The endpoints as one JSON object, or as ``export`` lines for a shell."""
    if as_json:
        print(json.dumps(values))
    else:
        for key, value in values.items():
            print(f"export {key}={value}")
    return 0


def cmd_status(stack: Stack, as_json: bool) -> int:
    pids = running(stack)
    info: dict[str, Any] = {
        "state_dir": str(stack.dir),
        "kafka": {
            "running": pids["kafka"] is not None,
            "pid": pids["kafka"],
            "bootstrap": stack.bootstrap,
            "controller_port": stack.controller_port,
            "version": kafka_version(),
            "log": str(stack.kafka_log),
        },
        "postgres": {
            "running": pids["postgres"] is not None,
            "pid": pids["postgres"],
            "port": stack.pg_port,
            "log": str(stack.pg_log),
        },
        "kafka_pid": pids["kafka"],
        "postgres_pid": pids["postgres"],
        **endpoints(stack),
    }
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        print(f"state dir  {stack.dir}")
        for name, where in (
            ("kafka", f"{stack.bootstrap} (controller {stack.controller_port})"),
            ("postgres", stack.database_url()),
        ):
            pid = pids[name]
            state = f"running  pid {pid:<7}" if pid else "stopped           "
            print(f"{name:<10} {state} {where}")
    return 0 if all(pids.values()) else 3


def cmd_logs(stack: Stack, which: str | None, follow: bool, lines: int) -> int:
    files = {"kafka": [stack.kafka_log], "postgres": [stack.pg_log]}
    chosen = files[which] if which else files["kafka"] + files["postgres"]
    present = [str(f) for f in chosen if f.exists()]
    if not present:
        raise StackError(f"no logs yet in {stack.logs}")
    args = ["tail", "-n", str(lines), *(["-F"] if follow else []), *present]
    sys.stdout.flush()
    os.execvp("tail", args)  # noqa: S606


def cmd_wait(stack: Stack, timeout: float) -> int:
    given = external_endpoints()
    if given:
        asyncio.run(wait_services(given[0], given[1], timeout))
    else:
        asyncio.run(wait_services(stack.bootstrap, stack.database_url(), timeout, stack=stack))
    return 0
