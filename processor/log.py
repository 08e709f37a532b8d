"""Logging: every line the processor writes to stderr goes through structlog, one event a line.

The processor's own events and those of the libraries under it (stdlib ``logging`` of
aiokafka, asyncpg and asyncio; Python ``warnings``; uncaught exceptions) end in one
handler that renders them alike: JSON objects (``PROCESSOR_LOG_FORMAT=json``, the default)
or readable text for a terminal (``console``).

The libraries' own levels are not the processor's: aiokafka logs a broker that is being
restarted, a produce retry or a group rebalance at WARNING or ERROR although it recovers
from them by itself. Those expected client events (:data:`CLIENT_EVENTS`) are counted
(:func:`client_events`, the metric ``processor_client_events_total``) and logged marked
``client_event``: at info once per :data:`CLIENT_EVENT_INTERVAL` each, with how many were
``suppressed`` since, and at debug in between. The libraries' INFO lines (group joins,
coordinator discovery) are details: logged at debug. Their other warnings and errors keep
their level, and are counted as ``warning`` or ``error`` of their source.
"""

from __future__ import annotations

import logging
import sys
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, TextIO

import structlog
from aiokafka.errors import KafkaConnectionError

__all__ = [
    "CLIENT_EVENTS",
    "CLIENT_EVENT_SOURCES",
    "LOG_FORMATS",
    "client_events",
    "configure_logging",
    "get_logger",
]

LOG_FORMATS: Final = ("json", "console")
#: Seconds between two info lines of one client event.
CLIENT_EVENT_INTERVAL: Final = 10.0


@dataclass(frozen=True, slots=True)
class ClientEvent:
    """An expected event a client library reports louder than it is."""

    source: str
    name: str
    #: Never more than debug: the processor says it itself (a failed bootstrap raises,
    #: and the command reports it as one line).
    quiet: bool = False


def _events(source: str, name: str, *templates: str, quiet: bool = False) -> dict[str, ClientEvent]:
    return dict.fromkeys(templates, ClientEvent(source, name, quiet))


#: Expected client events, by the library's message template (``LogRecord.msg``, before
#: its arguments are filled in; tests/unit/test_log.py checks each is in the library's
#: source still). Logged at info, at most once per :data:`CLIENT_EVENT_INTERVAL` seconds
#: each (with how many were ``suppressed`` since); the others at debug: a broker that is
#: away makes every client retry several times a second.
CLIENT_EVENTS: Final[Mapping[str, ClientEvent]] = {
    **_events(
        "aiokafka",
        "bootstrap_failed",
        'Unable connect to "%s:%s": %s',
        'Unable to request metadata from "%s:%s": %s',
        quiet=True,
    ),
    **_events(
        "aiokafka",
        "connection_failed",
        "Unable connect to node with id %s: %s",
    ),
    **_events(
        "aiokafka",
        "metadata_failed",
        "Unable to request metadata from node with id %s: %r",
        "Unable to update metadata from %s",
    ),
    **_events(
        "aiokafka",
        "fetch_failed",
        "Failed fetch messages from %s: %s",
        "Failed fetch offsets from %s: %s",
    ),
    **_events(
        "aiokafka",
        "produce_retry",
        "Got error produce response: %s",
        "Got error produce response on topic-partition %s, retrying. Error: %s",
        "Cannot send %r to %s: %r",
        "Could not send %r: %r",
    ),
    **_events(
        "aiokafka",
        "heartbeat_failed",
        "Heartbeat send request failed: %s. Will retry.",
    ),
    **_events(
        "aiokafka",
        "coordinator_lost",
        "Error sending %s to node %s [%s] -- marking coordinator dead",
        "Marking the coordinator dead (node %s)for group %s.",
        "Group Coordinator Request failed: %s",
        "Heartbeat session expired - marking coordinator dead",
        "Heartbeat failed for group %s: coordinator (node %s) is either not started or not valid",
        "OffsetCommit failed for group %s due to a coordinator error (%s), "
        "will find new coordinator and retry",
    ),
    **_events(
        "aiokafka",
        "rebalance",
        "Heartbeat failed for group %s because it is rebalancing",
        "Heartbeat failed for group %s: generation id is not  current.",
        "Heartbeat failed: local member_id was not recognized; resetting and re-joining group",
        "OffsetCommit failed for group %s due to group error (%s), will rejoin",
    ),
    **_events(
        "aiokafka",
        "coordinator_loading",
        "OffsetCommit failed for group %s because group is initializing (%s), will retry",
    ),
}
#: Where foreign log lines come from (the first part of the logger's name; ``warnings``:
#: Python warnings; ``other``: any other library).
CLIENT_EVENT_SOURCES: Final = ("aiokafka", "asyncpg", "asyncio", "warnings", "other")
#: asyncio's "Future exception was never retrieved" for a connection error: aiokafka leaves
#: the read task of a connection a broker (or a port that is no broker) closed unawaited.
#: The client's own call reports the failure; this is its echo, with a traceback.
ORPHANED: Final = "orphaned_connection_error"


_WARNINGS_LOGGER: Final = "py.warnings"
_OWN: Final = "processor"

_lock = threading.Lock()
_counts: dict[tuple[str, str], int] = {}
#: Per client event: when its last info line was written, and how many went to debug since.
_shown: dict[tuple[str, str], tuple[float, int]] = {}


def _reset_counts() -> None:
    with _lock:
        _counts.clear()
        _shown.clear()
        for event in CLIENT_EVENTS.values():
            _counts[(event.source, event.name)] = 0
        _counts[("asyncio", ORPHANED)] = 0
        for source in CLIENT_EVENT_SOURCES:
            _counts[(source, "warning")] = 0
            if source != "warnings":  # Python warnings are warnings
                _counts[(source, "error")] = 0


_reset_counts()


def client_events() -> dict[tuple[str, str], int]:
    """How often each (source, event) happened in this process; every one, from 0."""
    with _lock:
        return dict(_counts)


def _count(source: str, name: str) -> None:
    with _lock:
        _counts[(source, name)] = _counts.get((source, name), 0) + 1


def _source(logger_name: str) -> str:
    if logger_name == _WARNINGS_LOGGER:
        return "warnings"
    top = logger_name.split(".", 1)[0]
    return top if top in CLIENT_EVENT_SOURCES else "other"


class _Levels(logging.Filter):
    """Re-levels and counts the libraries' records, then applies the processor's level."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold = threshold

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if name != _OWN and not name.startswith(_OWN + "."):
            self._relevel(record)
        return record.levelno >= self.threshold

    @staticmethod
    def _relevel(record: logging.LogRecord) -> None:
        event = CLIENT_EVENTS.get(record.msg) if isinstance(record.msg, str) else None
        if _orphaned_connection_error(record):
            _count("asyncio", ORPHANED)
            level = logging.DEBUG
        elif event is not None and record.name.startswith(event.source):
            record.client_event = event.name
            level = _throttled(event, record)
        elif record.levelno >= logging.ERROR:
            _count(_source(record.name), "error")
            level = record.levelno
        elif record.levelno >= logging.WARNING:
            _count(_source(record.name), "warning")
            level = record.levelno
        else:
            level = logging.DEBUG
        record.levelno, record.levelname = level, logging.getLevelName(level)


def _orphaned_connection_error(record: logging.LogRecord) -> bool:
    if record.name != "asyncio" or not isinstance(record.msg, str):
        return False
    if not record.msg.startswith(("Future exception was never retrieved", "Task exception")):
        return False
    exc = record.exc_info[1] if record.exc_info else None
    return isinstance(exc, OSError | KafkaConnectionError)


def _throttled(event: ClientEvent, record: logging.LogRecord) -> int:
    """Count the event; info if its last info line is old enough, else debug."""
    key = (event.source, event.name)
    with _lock:
        _counts[key] = _counts.get(key, 0) + 1
        if event.quiet:
            return logging.DEBUG
        last, suppressed = _shown.get(key, (float("-inf"), 0))
        if record.created - last < CLIENT_EVENT_INTERVAL:
            _shown[key] = (last, suppressed + 1)
            return logging.DEBUG
        _shown[key] = (record.created, 0)
    record.suppressed = suppressed
    return logging.INFO


def _showwarning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings`` to the log: one line, with where it was raised."""
    logging.getLogger(_WARNINGS_LOGGER).warning(
        "%s: %s", category.__name__, message, extra={"warning_at": f"{filename}:{lineno}"}
    )


def _excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger(_OWN).critical("uncaught exception", exc_info=(kind, value, tb))


def _threading_excepthook(args: threading.ExceptHookArgs) -> None:
    exc = args.exc_value if args.exc_value is not None else args.exc_type()
    logging.getLogger(_OWN).error(
        "uncaught exception in a thread",
        exc_info=(args.exc_type, exc, args.exc_traceback),
        extra={"in_thread": args.thread.name if args.thread else None},
    )


def _unraisablehook(unraisable: Any) -> None:
    # Exceptions in __del__ and the like: Python would print them as plain text.
    exc = unraisable.exc_value
    logging.getLogger(_OWN).error(
        unraisable.err_msg or "exception ignored",
        exc_info=(unraisable.exc_type, exc, unraisable.exc_traceback) if exc else None,
        extra={"object": repr(unraisable.object)[:200]},
    )


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a line is written (as logging's own
    last-resort handler does), not to the one there was at configuration."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _: TextIO) -> None:
        pass


def configure_logging(
    level: str = "info", fmt: str = "json", *, stream: TextIO | None = None
) -> None:
    """Route every log line of this process through structlog, at ``level`` and above.

    ``fmt``: ``json`` (one object a line) or ``console`` (aligned text, coloured on a
    terminal). The entry point calls it once, after reading the configuration.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r}")
    threshold = logging.getLevelNamesMapping()[level.upper()]
    out = stream if stream is not None else sys.stderr
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    renderer: structlog.typing.Processor
    tail: list[structlog.typing.Processor]
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        tail = [structlog.processors.format_exc_info]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
        tail = []  # the console renderer formats exceptions itself
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.addFilter(_Levels(threshold))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.stdlib.ExtraAdder(
                    allow=["client_event", "suppressed", "warning_at", "in_thread", "object"]
                ),
                timestamper,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *tail,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # Low enough that the libraries' INFO records reach the filter (a client event may be
    # one); it drops what is below the processor's level.
    root.setLevel(min(threshold, logging.INFO))
    warnings.showwarning = _showwarning
    sys.excepthook = _excepthook
    threading.excepthook = _threading_excepthook
    sys.unraisablehook = _unraisablehook
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.stdlib.add_logger_name,
            timestamper,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger
