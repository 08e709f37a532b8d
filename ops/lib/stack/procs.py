"""The stack's processes: which pid serves what, waiting for them to go, ports held."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ops.lib.stack.config import HOST, PORT_ENV, SASL_SSL_ENV, Stack, StackError
from processor.tools.procs import proc_alive


def proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def wait_gone(pids: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(proc_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def kafka_pid(stack: Stack) -> int | None:
    """The broker's pid, if it runs; a stale pid file is removed."""
    try:
        pid = int(stack.kafka_pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    cmd = proc_cmdline(pid)
    if proc_alive(pid) and "kafka.Kafka" in cmd and str(stack.server_properties) in cmd:
        return pid
    stack.kafka_pidfile.unlink(missing_ok=True)
    return None


def postgres_pid(stack: Stack) -> int | None:
    """The postmaster's pid, if it runs (postgres handles a stale postmaster.pid itself)."""
    try:
        pid = int((stack.pg_data / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    cmd = proc_cmdline(pid)
    if proc_alive(pid) and cmd and Path(cmd[0]).name in {"postgres", "postmaster"}:
        return pid
    return None


def port_holder(port: int) -> str:
    """Who listens on the port, as far as `ss` can tell."""
    if not shutil.which("ss"):
        return ""
    out = subprocess.run(
        ["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=False
    ).stdout
    users = re.findall(r'\("([^"]+)",pid=(\d+)', out)
    return ", ".join(f"{name} (pid {pid})" for name, pid in users)


def check_port_free(stack: Stack, key: str, what: str) -> None:
    port: int = getattr(stack, key)
    env = {**PORT_ENV, **SASL_SSL_ENV}[key]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            holder = port_holder(port)
            raise StackError(
                f"{what} port {HOST}:{port} is already in use"
                + (f" by {holder}" if holder else f" ({exc.strerror})")
                + f", not by this stack (state dir {stack.dir}). Choose another port with "
                f"--{key.replace('_', '-')} or {env}=PORT, or stop what holds it."
            ) from None


def in_parallel(calls: Sequence[Callable[[], object]]) -> None:
    """Run ``calls`` at once, one thread each (servers stop side by side, not one after the
    other); the first failure is raised once all are done."""
    if not calls:
        return
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
    for future in futures:
        future.result()
