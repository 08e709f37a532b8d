"""The network: a TCP proxy between the workers and PostgreSQL (delay, loss, a cut)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
import subprocess
import threading
from collections.abc import Callable

from ops.lib.chaos.config import SetupError


def netem_probe() -> str | None:
    """None if ``tc qdisc ... netem`` works in a scratch network namespace, else why not."""
    name = f"chaos-probe-{os.getpid()}"
    try:
        add = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    except OSError as exc:
        return f"ip: {exc}"
    if add.returncode != 0:
        return f"ip netns add: {add.stderr.strip()}"
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=False)
        try:
            tc = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    name,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    "lo",
                    "root",
                    "netem",
                    "delay",
                    "1ms",
                ],
                capture_output=True,
                text=True,
            )
        except OSError as exc:
            return f"tc: {exc}"
        return None if tc.returncode == 0 else f"tc netem: {tc.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


class Proxy:
    """A userspace TCP proxy (its own thread and event loop) with three faults:

    - ``latency``: every chunk forwarded, either way, waits this long;
    - ``reset``: every second each connection is reset (RST) with this probability, and
      a new connection is refused with it;
    - ``partition``: nothing is forwarded either way, new connections are held unanswered
      (a blackhole); on heal the held data flows again, as after a real short partition.
    """

    def __init__(self, upstream_port: int, seed: int) -> None:
        self.upstream_port = upstream_port
        self.rng = random.Random(seed)
        self.latency = 0.0
        self.reset_share = 0.0
        self.port = 0
        self.connections = 0
        self.resets = 0
        self._loop = asyncio.new_event_loop()
        self._open: asyncio.Event | None = None
        self._live: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="chaos-proxy", daemon=True)

    def start(self) -> int:
        self._thread.start()
        if not self._ready.wait(10):
            raise SetupError("the network proxy did not start")
        return self.port

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            while True:
                await asyncio.sleep(1.0)
                if self.reset_share > 0:
                    for pair in list(self._live):
                        if self.rng.random() < self.reset_share:
                            self._reset(pair)

    def _reset(self, pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        self.resets += 1
        self._live.discard(pair)
        for writer in pair:
            with contextlib.suppress(OSError, AttributeError):
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._open is not None
        self.connections += 1
        await self._open.wait()  # a partition holds new connections unanswered
        if self.reset_share > 0 and self.rng.random() < self.reset_share:
            self.resets += 1
            with contextlib.suppress(OSError, AttributeError):
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.upstream_port), 10
            )
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._live.add(pair)
        try:
            await asyncio.gather(
                self._pump(reader, up_writer),
                self._pump(up_reader, writer),
                return_exceptions=True,
            )
        finally:
            self._live.discard(pair)
            for w in pair:
                w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._open is not None
        try:
            while data := await reader.read(65536):
                await self._open.wait()
                if self.latency > 0:
                    await asyncio.sleep(self.latency)
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()  # one side gone: the whole connection is

    def _call(self, fn: Callable[[], None]) -> None:
        self._loop.call_soon_threadsafe(fn)

    def set_latency(self, seconds: float) -> None:
        self.latency = seconds

    def set_reset(self, share: float) -> None:
        self.reset_share = share

    def set_partition(self, on: bool) -> None:
        def apply() -> None:
            assert self._open is not None
            if on:
                self._open.clear()
            else:
                self._open.set()

        self._call(apply)

    def heal(self) -> None:
        self.set_latency(0.0)
        self.set_reset(0.0)
        self.set_partition(False)
