"""``ops/stack``'s command line: its parser, and the dispatch to the single-node or the
cluster commands."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ops.lib.stack.cluster import Cluster, check_cluster_ports, promote
from ops.lib.stack.cluster_commands import (
    cmd_cluster_down,
    cmd_cluster_env,
    cmd_cluster_logs,
    cmd_cluster_status,
    cmd_cluster_up,
    cmd_cluster_wait,
    cmd_failover,
)
from ops.lib.stack.config import (
    CLUSTER_SERVICES,
    DEFAULT_PORTS,
    PG_NODE_NAMES,
    PORT_ENV,
    SASL_SSL_ENV,
    SERVICES,
    TLS_CLIENT_AUTH,
    StackError,
    load_stack,
    locked,
    rel,
    say,
    tail,
)
from ops.lib.stack.kafka_node import kafka_libs, kafka_version
from ops.lib.stack.single import cmd_down, cmd_env, cmd_logs, cmd_status, cmd_up, cmd_wait

logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # connection retries while waiting


logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", help="state dir [PROCESSOR_STACK_DIR, default .stack]")
    common.add_argument(
        "--cluster",
        action="store_true",
        help="three Kafka nodes and a PostgreSQL primary with a synchronous standby "
        "[PROCESSOR_STACK_CLUSTER=1; default state dir .stack-cluster; remembered by it]",
    )
    common.add_argument(
        "--kafka-route",
        help="cluster: kafka-N=PORT advertises node N's routed listener at PORT (a proxy "
        "in front of it) [PROCESSOR_STACK_KAFKA_ROUTE; remembered; 'none': no route]",
    )
    for key, default in DEFAULT_PORTS.items():
        flag = "--" + key.replace("_", "-")
        common.add_argument(flag, type=int, help=f"[{PORT_ENV[key]}, default {default}]")
    common.add_argument(
        "--kafka-sasl-ssl-port",
        type=int,
        help=f"an extra SASL_SSL listener [{SASL_SSL_ENV['kafka_sasl_ssl_port']}, default none]",
    )
    common.add_argument(
        "--kafka-tls-dir",
        help=f"its ca.pem, server.pem, server.key [{SASL_SSL_ENV['kafka_tls_dir']}]",
    )
    common.add_argument(
        "--kafka-tls-client-auth",
        choices=TLS_CLIENT_AUTH,
        help=f"client certificates [{SASL_SSL_ENV['kafka_tls_client_auth']}, default none]",
    )
    top = argparse.ArgumentParser(
        prog="ops/stack",
        description="The local Kafka + PostgreSQL stack (processes on 127.0.0.1).",
    )
    sub = top.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", parents=[common], help="start what is not running, wait for both")
    up.add_argument("--timeout", type=float, default=180)
    down = sub.add_parser("down", parents=[common], help="stop both, leave no process behind")
    down.add_argument("--immediate", action="store_true", help="SIGKILL / pg_ctl -m immediate")
    stop = sub.add_parser("stop", parents=[common], help="stop one service")
    stop.add_argument("service", choices=CLUSTER_SERVICES, help="a cluster's node too: kafka-2")
    stop.add_argument("--immediate", action="store_true", help="SIGKILL / pg_ctl -m immediate")
    restart = sub.add_parser("restart", parents=[common], help="stop one service, then `up`")
    restart.add_argument("service", choices=CLUSTER_SERVICES)
    restart.add_argument("--immediate", action="store_true")
    restart.add_argument("--timeout", type=float, default=180)
    status = sub.add_parser("status", parents=[common], help="pids and ports (exit 3: not up)")
    status.add_argument("--json", action="store_true")
    env = sub.add_parser("env", parents=[common], help="`export` lines of the endpoints")
    env.add_argument("--json", action="store_true")
    env.add_argument(
        "--sasl-ssl",
        action="store_true",
        help="the settings of the SASL_SSL listener (KAFKA_SECURITY_PROTOCOL and the rest)",
    )
    logs = sub.add_parser("logs", parents=[common], help="tail the logs")
    logs.add_argument("service", nargs="?", choices=CLUSTER_SERVICES)
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument("-n", "--lines", type=int, default=50)
    wait = sub.add_parser("wait", parents=[common], help="wait until both answer")
    wait.add_argument("--timeout", type=float, default=180)
    sub.add_parser("fetch", parents=[common], help="resolve the Kafka jars (ops/bootstrap)")
    promote_cmd = sub.add_parser(
        "promote", parents=[common], help="cluster: the standby becomes the primary"
    )
    promote_cmd.add_argument("service", choices=PG_NODE_NAMES)
    failover = sub.add_parser(
        "failover",
        parents=[common],
        help="cluster: kill -9 the primary, promote the standby, rebuild the old primary "
        "as the new standby (pg_basebackup)",
    )
    failover.add_argument(
        "--no-rebuild", action="store_true", help="leave the old primary down (`up` rebuilds it)"
    )
    failover.add_argument("--timeout", type=float, default=180)
    return top


@dataclass(frozen=True, slots=True)
class Commands:
    """The commands both forms have, bound to one stack (single-node or cluster)."""

    up: Callable[[float], int]
    down: Callable[..., int]  # (immediate[, services])
    status: Callable[[bool], int]
    env: Callable[[bool, bool], int]
    logs: Callable[[str | None, bool, int], int]
    wait: Callable[[float], int]

    @classmethod
    def of(cls, target: object, *commands: Callable[..., int]) -> Commands:
        """``commands`` (up, down, status, env, logs, wait, in this order) bound to ``target``."""
        return cls(*(functools.partial(command, target) for command in commands))


def both_forms(args: argparse.Namespace, commands: Commands) -> int | None:
    """Run ``args.command`` if both forms have it; None if it is one form's own."""
    command: str = args.command
    if command == "up":
        return commands.up(args.timeout)
    if command == "down":
        return commands.down(args.immediate)
    if command == "stop":
        return commands.down(args.immediate, [args.service])
    if command == "restart":
        commands.down(args.immediate, [args.service])
        return commands.up(args.timeout)
    if command == "status":
        return commands.status(args.json)
    if command == "env":
        return commands.env(args.json, args.sasl_ssl)
    if command == "logs":
        return commands.logs(args.service, args.follow, args.lines)
    if command == "wait":
        return commands.wait(args.timeout)
    return None


def cluster_main(cluster: Cluster, args: argparse.Namespace) -> int:
    command: str = args.command
    if cluster.base.kafka_sasl_ssl_port is not None:
        raise StackError("the cluster has no SASL_SSL listener: use the single-node stack for it")
    check_cluster_ports(cluster)
    done = both_forms(
        args,
        Commands.of(
            cluster,
            cmd_cluster_up,
            cmd_cluster_down,
            cmd_cluster_status,
            cmd_cluster_env,
            cmd_cluster_logs,
            cmd_cluster_wait,
        ),
    )
    if done is not None:
        return done
    if command == "promote":
        with locked(cluster.dir / "stack.lock"):
            promote(cluster, int(args.service.removeprefix("postgres-")))
        return 0
    if command == "failover":
        return cmd_failover(cluster, not args.no_rebuild, args.timeout)
    if command == "fetch":
        kafka_libs()
        return 0
    raise AssertionError(command)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        stack = load_stack(args)
        command: str = args.command
        if stack.cluster:
            return cluster_main(Cluster(stack), args)
        service = getattr(args, "service", None)
        if command in {"promote", "failover"} or service not in (None, *SERVICES):
            raise StackError(f"`{command} {service or ''}` needs a cluster stack (--cluster)")
        done = both_forms(
            args,
            Commands.of(stack, cmd_up, cmd_down, cmd_status, cmd_env, cmd_logs, cmd_wait),
        )
        if done is not None:
            return done
        if command == "fetch":
            libs = kafka_libs()
            say(f"Kafka {kafka_version()} jars present ({rel(libs)})")
            return 0
        raise AssertionError(command)
    except StackError as exc:
        print(f"ops/stack: error: {exc}", file=sys.stderr)
        for log in exc.logs:
            text = tail(log)
            if text.strip():
                print(
                    f"--- last lines of {log} ---\n{text}\n--- end of {log.name} ---",
                    file=sys.stderr,
                )
        return 1
    except KeyboardInterrupt:
        return 130
