"""ops/stack's cluster form (ops/lib/stack), not started: its ports, settings and endpoints."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from ops.lib.stack.cluster import (
    Cluster,
    check_cluster_ports,
    cluster_pg_conf,
    cluster_server_properties,
)
from ops.lib.stack.config import Stack, StackError, kafka_route


def _cluster(tmp_path: Path, route: tuple[int, int] | None = None) -> Any:
    base = Stack(tmp_path, 39100, 39110, 39130, cluster=True, kafka_route=route)
    return Cluster(base)


def _properties(text: str) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")
    )


def test_the_brokers_replicate_three_times_and_acknowledge_on_two(tmp_path: Path) -> None:
    """RF 3 everywhere, min ISR 2, no unclean election, a quorum of the three nodes."""
    cluster = _cluster(tmp_path)
    props = _properties(cluster_server_properties(cluster, 2))
    assert props["node.id"] == "2"
    assert props["controller.quorum.voters"] == (
        "1@127.0.0.1:39110,2@127.0.0.1:39111,3@127.0.0.1:39112"
    )
    for key in (
        "default.replication.factor",
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
    ):
        assert props[key] == "3", key
    assert props["min.insync.replicas"] == "2"
    assert props["transaction.state.log.min.isr"] == "2"
    assert props["unclean.leader.election.enable"] == "false"
    assert props["inter.broker.listener.name"] == "INTERNAL"
    assert "PLAINTEXT://127.0.0.1:39101" in props["listeners"]
    assert "ROUTED://127.0.0.1:39117" in props["advertised.listeners"]


def test_a_routed_node_advertises_the_proxy_port_and_the_others_their_own(
    tmp_path: Path,
) -> None:
    cluster = _cluster(tmp_path, route=(3, 45000))
    assert (
        "ROUTED://127.0.0.1:45000"
        in _properties(cluster_server_properties(cluster, 3))["advertised.listeners"]
    )
    assert (
        "ROUTED://127.0.0.1:39117"
        in _properties(cluster_server_properties(cluster, 2))["advertised.listeners"]
    )
    assert cluster.routed_bootstrap == "127.0.0.1:39116,127.0.0.1:39117,127.0.0.1:45000"


def test_the_endpoints_name_every_broker_and_both_servers(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    assert cluster.bootstrap == "127.0.0.1:39100,127.0.0.1:39101,127.0.0.1:39102"
    assert cluster.database_url() == (
        "postgresql://postgres@127.0.0.1:39130,127.0.0.1:39131/processor"
        "?target_session_attrs=read-write"
    )


def test_both_servers_commit_synchronously_and_stream_from_the_other(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    conf = cluster_pg_conf(cluster, 1)
    assert conf["synchronous_commit"] == "on"
    assert conf["synchronous_standby_names"] == "'*'"
    assert "port=39131" in conf["primary_conninfo"]
    assert "port=39130" in cluster_pg_conf(cluster, 2)["primary_conninfo"]


def test_overlapping_port_ranges_are_refused_naming_the_layout(tmp_path: Path) -> None:
    base = Stack(tmp_path, 39100, 39101, 39130, cluster=True)
    with pytest.raises(StackError, match="must all differ"):
        check_cluster_ports(Cluster(base))


@pytest.mark.parametrize("raw", ["kafka-4=40000", "kafka-1", "broker=1", "kafka-2=x", "kafka-1=0"])
def test_a_bad_kafka_route_is_refused_naming_the_variable(raw: str) -> None:
    args = argparse.Namespace(kafka_route=raw)
    with pytest.raises(StackError, match="PROCESSOR_STACK_KAFKA_ROUTE"):
        kafka_route(args, {})


def test_a_kafka_route_is_read_from_the_flag_then_the_last_up() -> None:
    assert kafka_route(argparse.Namespace(kafka_route="kafka-3=41000"), {}) == (3, 41000)
    assert kafka_route(argparse.Namespace(kafka_route=None), {"kafka_route": [2, 42000]}) == (
        2,
        42000,
    )
    assert kafka_route(argparse.Namespace(kafka_route="none"), {"kafka_route": [2, 1]}) is None
