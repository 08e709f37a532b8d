"""ops/stack's KRaft cluster ids: never a value a command line takes for an option."""

from __future__ import annotations

from ops.lib.stack.kafka_node import new_cluster_id


def test_a_cluster_id_never_starts_with_a_dash() -> None:
    """One in 64 url-safe base64 uuids starts with '-': kafka-storage then failed with
    "argument --cluster-id: expected one argument" (a CI run hit it)."""
    ids = [new_cluster_id() for _ in range(5000)]
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(i) == 22 for i in ids)
