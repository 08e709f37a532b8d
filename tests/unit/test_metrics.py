"""The worker's metrics before anything happened, and the lag series across a rebalance."""

from __future__ import annotations

from processor.metrics import Metrics


def test_a_fresh_registry_has_process_series_every_known_series_at_0_and_no_created() -> None:
    metrics = Metrics()
    value = metrics.registry.get_sample_value
    assert (value("process_resident_memory_bytes") or 0) > 0
    assert value("process_cpu_seconds_total") is not None
    assert (value("process_open_fds") or 0) > 0
    for cause in ("database", "kafka"):
        assert value("processor_retries_total", {"cause": cause}) == 0
    for phase in ("database", "wait", "kafka"):
        assert value("processor_batch_phase_seconds_count", {"phase": phase}) == 0
    events = {"source": "aiokafka", "event": "produce_retry"}
    assert value("processor_client_events_total", events) is not None
    text = metrics.exposition().decode()
    assert "_created" not in text
    assert "processor_consumer_lag{" not in text  # no partition owned yet


def test_a_partition_has_a_lag_series_from_its_assignment_until_it_is_revoked() -> None:
    metrics = Metrics()
    value = metrics.registry.get_sample_value
    metrics.partitions_assigned([0, 1])
    assert value("processor_consumer_lag", {"partition": "0"}) == 0
    metrics.lag.labels("1").set(7)
    metrics.partitions_assigned([1, 2])  # assigned again: the known value stays
    assert value("processor_consumer_lag", {"partition": "1"}) == 7
    metrics.partitions_revoked([1, 5])  # 5 was never here: nothing to drop
    assert value("processor_consumer_lag", {"partition": "1"}) is None
    assert value("processor_consumer_lag", {"partition": "2"}) == 0
