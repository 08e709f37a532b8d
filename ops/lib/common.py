"""What more than one ops command needs: the repository's paths, progress lines, free ports.

The rest they share is in :mod:`processor.tools` (processes through /proc, ``processor run``
subprocesses, percentiles and Zipf weights) and :func:`processor.kafka.clients.read_spans` (a
topic read to its end).
"""

from __future__ import annotations

import random
import socket
import sys
import time
from pathlib import Path
from typing import Final

__all__ = ["ROOT", "STACK", "free_block", "free_ports", "port_free", "progress"]

#: The repository (``ops/lib/common.py`` is three levels below it).
ROOT: Final = Path(__file__).resolve().parents[2]
#: The ``ops/stack`` command, which the chaos run and the benchmark start as a subprocess.
STACK: Final = ROOT / "ops" / "stack"
HOST: Final = "127.0.0.1"


def progress(tool: str, message: str) -> None:
    """One progress line on stderr, ``<tool> HH:MM:SS <message>`` (stdout is the result's)."""
    print(f"{tool} {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def port_free(port: int) -> bool:
    """Nothing listens on ``port`` of 127.0.0.1 now (SO_REUSEADDR: a port in TIME_WAIT is
    free for a server that binds it)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_ports(count: int) -> list[int]:
    """Ports free right now on 127.0.0.1 (held together while chosen, so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_block(count: int, low: int, high: int, tries: int = 1000) -> int | None:
    """The first of ``count`` consecutive ports free now, all in ``low``..``high``; None if
    ``tries`` random bases found none. The bases come from the system's randomness, not
    :mod:`random`'s (a seeded run must not pick the ports of the previous run with its
    seed, which may still be in use)."""
    bases = list(range(low, high - count + 1))
    random.SystemRandom().shuffle(bases)
    for base in bases[:tries]:
        if all(port_free(p) for p in range(base, base + count)):
            return base
    return None
