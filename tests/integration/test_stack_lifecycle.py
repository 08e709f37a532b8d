"""ops/stack on a second, separate stack (own state dir, own ports): the session's is untouched."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from tests.support import ROOT, free_port

pytestmark = pytest.mark.faults

STACK = ROOT / "ops" / "stack"


@dataclass
class Stack:
    env: dict[str, str]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [STACK, *args], env=self.env, capture_output=True, text=True, timeout=300
        )

    def status(self) -> dict[str, object]:
        out = self.run("status", "--json")
        assert out.returncode in (0, 3), out.stderr
        status: dict[str, object] = json.loads(out.stdout)
        return status


def alive(pid: int) -> bool:
    """Running: /proc has it and it is not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in {"Z", "X"}


def descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True)
    parent = {int(c): int(p) for c, p in (line.split() for line in out.stdout.splitlines())}
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {c for c, p in parent.items() if p in frontier} - found
        found |= frontier
    return found


@pytest.fixture
def second_stack() -> Iterator[Stack]:
    state = Path(tempfile.mkdtemp(prefix="processor-stack-test-"))  # 0700: tests o+x fixing
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL"}
        and not k.startswith("PROCESSOR_STACK_")
    }
    ports = {free_port() for _ in range(3)}
    while len(ports) < 3:
        ports.add(free_port())
    kafka, controller, pg = sorted(ports)
    env.update(
        PROCESSOR_STACK_DIR=str(state / "stack"),
        PROCESSOR_STACK_KAFKA_PORT=str(kafka),
        PROCESSOR_STACK_CONTROLLER_PORT=str(controller),
        PROCESSOR_STACK_PG_PORT=str(pg),
    )
    stack = Stack(env)
    try:
        yield stack
    finally:
        stack.run("down", "--immediate")
        shutil.rmtree(state, ignore_errors=True)


async def test_up_is_idempotent_down_leaves_nothing_and_up_again_keeps_the_data(
    second_stack: Stack,
) -> None:
    first = second_stack.run("up")
    assert first.returncode == 0, first.stderr
    status = second_stack.status()
    kafka_pid, pg_pid = status["kafka_pid"], status["postgres_pid"]
    assert isinstance(kafka_pid, int)
    assert isinstance(pg_pid, int)
    assert alive(kafka_pid)
    assert alive(pg_pid)
    assert status["KAFKA_BOOTSTRAP_SERVERS"] == (
        f"127.0.0.1:{second_stack.env['PROCESSOR_STACK_KAFKA_PORT']}"
    )

    env = json.loads(second_stack.run("env", "--json").stdout)
    conn = await asyncpg.connect(env["DATABASE_URL"])
    await conn.execute("CREATE TABLE survives_restart (id int)")
    await conn.close()

    again = second_stack.run("up")
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stderr
    status = second_stack.status()
    assert (status["kafka_pid"], status["postgres_pid"]) == (kafka_pid, pg_pid)  # no-op

    family = {kafka_pid, pg_pid} | descendants(kafka_pid) | descendants(pg_pid)
    down = second_stack.run("down")
    assert down.returncode == 0, down.stderr
    assert [pid for pid in family if alive(pid)] == []
    status = second_stack.status()
    assert (status["kafka_pid"], status["postgres_pid"]) == (None, None)

    third = second_stack.run("up")
    assert third.returncode == 0, third.stderr
    status = second_stack.status()
    assert status["kafka_pid"] not in (None, kafka_pid)
    assert status["postgres_pid"] not in (None, pg_pid)
    conn = await asyncpg.connect(env["DATABASE_URL"])
    try:
        assert await conn.fetchval("SELECT to_regclass('survives_restart') IS NOT NULL")
    finally:
        await conn.close()


def test_a_port_taken_by_something_else_is_a_clear_error_and_starts_nothing(
    second_stack: Stack,
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        second_stack.env["PROCESSOR_STACK_KAFKA_PORT"] = str(port)
        out = second_stack.run("up")
    assert out.returncode != 0
    assert f"127.0.0.1:{port} is already in use" in out.stderr
    assert "PROCESSOR_STACK_KAFKA_PORT" in out.stderr  # says how to pick another
    assert "Traceback" not in out.stderr
    status = second_stack.status()
    assert (status["kafka_pid"], status["postgres_pid"]) == (None, None)
