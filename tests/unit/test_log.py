"""Logging: every line goes through structlog, the libraries' lines levelled and counted.

Each case runs in a subprocess: configure_logging sets process-wide hooks (the root
handler, ``warnings.showwarning``, ``sys.excepthook``) that pytest's own must not lose.
"""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import aiokafka
import pytest

from processor.log import CLIENT_EVENTS

# Lines from every kind of writer: the processor, aiokafka's expected events and its
# details, asyncpg, asyncio, warnings, a thread, __del__, and an uncaught exception.
SCRIPT = """
import asyncio, logging, sys, threading, warnings
from processor.log import client_events, configure_logging, get_logger

configure_logging(sys.argv[1], sys.argv[2])
log = get_logger("processor.worker")
log.info("own info", partition=3)
log.debug("own debug")
client = logging.getLogger("aiokafka.client")
for node in (1, 2, 3):  # a broker away: every retry says so; one info line, then debug
    client.error("Unable connect to node with id %s: %s", node, "Connect call failed")
# a failed bootstrap: the command says so itself, as one line
logging.getLogger("aiokafka").error('Unable connect to "%s:%s": %s', "127.0.0.1", 1, "refused")
logging.getLogger("aiokafka.consumer.group_coordinator").warning(
    "Heartbeat failed for group %s because it is rebalancing", "grp"
)
logging.getLogger("aiokafka.consumer.group_coordinator").info(
    "Joined group '%s' (generation %s) with member_id %s", "grp", 1, "m-1"
)
logging.getLogger("asyncpg.pool").warning("Failed to restore the pool connection")
warnings.warn("an odd thing", UserWarning)
try:
    1 / 0
except ZeroDivisionError:
    log.exception("own failure")
    logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=True)
thread = threading.Thread(target=lambda: 1 / 0, name="side")
thread.start()
thread.join()

class Leaky:
    def __del__(self):
        raise ValueError("in __del__")

Leaky()
counts = {f"{s}/{e}": n for (s, e), n in client_events().items() if n}
log.warning("counts", **counts)
raise RuntimeError("uncaught")
"""


def run(level: str = "info", fmt: str = "json") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, level, fmt],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def lines(level: str = "info") -> list[dict[str, Any]]:
    out = run(level)
    assert out.returncode == 1, out.stderr  # the uncaught exception
    assert out.stdout == ""
    parsed = []
    for line in out.stderr.splitlines():
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}\nin:\n{out.stderr}")
        assert isinstance(parsed[-1], dict)
        assert {"event", "level", "timestamp", "logger"} <= parsed[-1].keys(), line
    return parsed


def by_event(parsed: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {line["event"]: line for line in parsed}


def test_every_line_is_a_json_object_whoever_wrote_it() -> None:
    events = by_event(lines("info"))
    assert events["own info"]["level"] == "info"
    assert events["own info"]["partition"] == 3
    assert "own debug" not in events
    # aiokafka's expected events: info (once), marked and counted, not ERROR/WARNING
    unable = events["Unable connect to node with id 1: Connect call failed"]
    assert (unable["level"], unable["client_event"], unable["suppressed"]) == (
        "info",
        "connection_failed",
        0,
    )
    assert unable["logger"] == "aiokafka.client"
    assert "Unable connect to node with id 2: Connect call failed" not in events  # debug
    assert not any(e.startswith('Unable connect to "127.0.0.1:1"') for e in events)  # debug
    rebalance = events["Heartbeat failed for group grp because it is rebalancing"]
    assert (rebalance["level"], rebalance["client_event"]) == ("info", "rebalance")
    # aiokafka's INFO details: debug
    assert not any(e.startswith("Joined group") for e in events)
    # the others keep their level
    assert events["Failed to restore the pool connection"]["level"] == "warning"
    warned = events["UserWarning: an odd thing"]
    assert (warned["level"], warned["logger"]) == ("warning", "py.warnings")
    assert warned["warning_at"] == "<string>:21"  # the warn() call in SCRIPT
    own = events["own failure"]
    assert own["level"] == "error"
    assert "ZeroDivisionError" in own["exception"]
    assert "ZeroDivisionError" in events["Task exception was never retrieved"]["exception"]
    assert events["uncaught exception in a thread"]["in_thread"] == "side"
    assert "in __del__" in events["exception ignored"]["exception"]
    uncaught = events["uncaught exception"]
    assert uncaught["level"] == "critical"
    assert "RuntimeError: uncaught" in uncaught["exception"]
    counts = events["counts"]
    assert counts["aiokafka/connection_failed"] == 3
    assert counts["aiokafka/bootstrap_failed"] == 1
    assert counts["aiokafka/rebalance"] == 1
    assert counts["asyncpg/warning"] == 1
    assert counts["asyncio/error"] == 1
    assert counts["warnings/warning"] == 1


def test_the_level_quiets_the_libraries_too() -> None:
    events = by_event(lines("warning"))
    assert "own info" not in events
    assert not any("client_event" in line for line in events.values())
    assert "Failed to restore the pool connection" in events
    assert events["counts"]["aiokafka/connection_failed"] == 3  # counted all the same


def test_debug_shows_the_libraries_details_and_every_retry() -> None:
    events = by_event(lines("debug"))
    assert events["own debug"]["level"] == "debug"
    joined = events["Joined group 'grp' (generation 1) with member_id m-1"]
    assert joined["level"] == "debug"
    again = events["Unable connect to node with id 2: Connect call failed"]
    assert (again["level"], again["client_event"]) == ("debug", "connection_failed")
    bootstrap = events['Unable connect to "127.0.0.1:1": refused']
    assert (bootstrap["level"], bootstrap["client_event"]) == ("debug", "bootstrap_failed")


def test_the_console_format_is_text_for_a_terminal() -> None:
    out = run("info", "console")
    text = out.stderr.splitlines()
    assert not any(line.startswith("{") for line in text), out.stderr
    own = next(line for line in text if "own info" in line)
    assert "[info" in own
    assert "partition=3" in own
    assert any("client_event=connection_failed" in line for line in text), out.stderr
    assert "RuntimeError: uncaught" in out.stderr


def _log_templates() -> set[str]:
    """The first argument of every ``log.<level>(...)`` call in aiokafka's source."""
    found: set[str] = set()
    for path in Path(aiokafka.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "log"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                found.add(node.args[0].value)
    return found


def test_every_client_event_is_a_message_the_installed_aiokafka_logs() -> None:
    """A new aiokafka that rewords a message would leave it at its own level: this says so."""
    missing = set(CLIENT_EVENTS) - _log_templates()
    assert not missing, textwrap.shorten(f"not logged by aiokafka: {sorted(missing)}", 2000)


def test_an_orphaned_connection_error_of_a_client_library_is_debug_and_counted() -> None:
    """asyncio's "Future exception was never retrieved" for a reset connection (aiokafka
    leaves such read tasks behind): its own call reported the failure; this echo is
    debug, counted, and brings no traceback into a command's output."""
    from processor import log

    record = logging.LogRecord(
        "asyncio",
        logging.ERROR,
        __file__,
        1,
        "Future exception was never retrieved\nfuture: <Future finished>",
        None,
        (ConnectionResetError, ConnectionResetError(104, "reset"), None),
    )
    before = log.client_events()[("asyncio", log.ORPHANED)]
    log._Levels(logging.INFO).filter(record)
    assert record.levelno == logging.DEBUG
    assert log.client_events()[("asyncio", log.ORPHANED)] == before + 1
    other = logging.LogRecord(
        "asyncio", logging.ERROR, __file__, 1, "Task was destroyed but it is pending!", None, None
    )
    log._Levels(logging.INFO).filter(other)
    assert other.levelno == logging.ERROR
