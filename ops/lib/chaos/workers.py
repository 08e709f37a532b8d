"""The worker group: ``processor run`` subprocesses, killed, frozen and restarted by the faults."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

from ops.lib.common import free_ports


class Workers:
    """``processor run`` subprocesses; each has a number and a log file."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env = env
        self.logdir = logdir
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.paused: set[int] = set()
        self.ended: dict[int, str] = {}  # number -> how it ended, by our hand
        self.ids: dict[int, str] = {}  # number -> PROCESSOR_WORKER_ID
        self.ports: dict[int, int] = {}  # number -> its /metrics port
        self.next = 0

    def start(self, worker_id: str | None = None) -> int:
        """A new worker process; ``worker_id`` given: a restart under that id, as a
        supervisor would do it (its first transaction aborts its previous life's)."""
        number = self.next
        self.next += 1
        self.ids[number] = worker_id or f"w{number}"
        (self.ports[number],) = free_ports(1)
        env = dict(
            self.env,
            PROCESSOR_WORKER_ID=self.ids[number],
            PROCESSOR_METRICS_PORT=str(self.ports[number]),
        )
        with (self.logdir / f"worker-{number}.log").open("wb") as log:
            self.procs[number] = subprocess.Popen(
                [sys.executable, "-m", "processor", "run"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.logdir,
            )
        return number

    def live(self) -> list[int]:
        return [n for n, p in self.procs.items() if p.poll() is None and n not in self.paused]

    def metric(self, number: int, name: str) -> float | None:
        """A sample of the worker's /metrics (summed over labels), None if it does not answer."""
        try:
            with socket.create_connection(("127.0.0.1", self.ports[number]), timeout=2) as conn:
                conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                chunks = []
                while chunk := conn.recv(65536):
                    chunks.append(chunk)
        except OSError:
            return None
        total = None
        for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
                total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
        return total

    def assigned(self, number: int) -> bool:
        """The worker received a partition assignment (it is in the group, the rebalance
        done): its processor_assignments_total metric."""
        return (self.metric(number, "processor_assignments_total") or 0) >= 1

    def unexpected_exits(self) -> dict[int, int]:
        """Workers that exited without our signal: number -> exit status."""
        return {
            n: p.returncode
            for n, p in self.procs.items()
            if p.poll() is not None and n not in self.ended
        }

    def kill9(self, number: int) -> None:
        self.ended[number] = "SIGKILL"
        self.procs[number].send_signal(signal.SIGKILL)
        self.procs[number].wait()

    def pause(self, number: int) -> None:
        self.paused.add(number)
        self.procs[number].send_signal(signal.SIGSTOP)

    def resume(self, number: int) -> None:
        self.procs[number].send_signal(signal.SIGCONT)
        self.paused.discard(number)

    def terminate(self, number: int, timeout: float = 60) -> int:
        self.ended[number] = "SIGTERM"
        proc = self.procs[number]
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        return int(code)

    def stop_all(self) -> dict[int, int]:
        for n in list(self.paused):
            self.resume(n)
        running = [n for n, p in self.procs.items() if p.poll() is None]
        for n in running:
            self.ended[n] = "SIGTERM (end of run)"
            self.procs[n].send_signal(signal.SIGTERM)
        codes = {}
        for n in running:
            try:
                codes[n] = self.procs[n].wait(60)
            except subprocess.TimeoutExpired:
                self.procs[n].kill()
                codes[n] = self.procs[n].wait()
        return codes
