"""``processor audit``: its flags, and the command (exit status 0, 3 anomalies, 1, 2)."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timedelta
from pathlib import Path

from processor.audit.model import EXIT_ANOMALIES, AuditOptions
from processor.audit.run import run_audit
from processor.config import Settings
from processor.errors import ConfigError


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an RFC 3339 time") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone (e.g. 2026-01-01T00:00:00Z)")
    return moment


def parse_offsets(spec: str) -> dict[int | None, tuple[int, int | None]]:
    """``P:START-END,...`` (one partition) or ``START-END`` (every partition); END exclusive,
    START or END may be empty (the beginning, the end)."""
    out: dict[int | None, tuple[int, int | None]] = {}
    for part in (p.strip() for p in spec.split(",")):
        try:
            partition: int | None = None
            if ":" in part:
                head, part = part.split(":", 1)
                partition = int(head)
            first, dash, last = part.partition("-")
            if not dash:
                raise ValueError("no '-'")
            start = int(first) if first.strip() else 0
            end = int(last) if last.strip() else None
        except ValueError as exc:
            raise ConfigError(
                f"--offsets {spec!r}: {part!r} is not [P:]START-END ({exc})"
            ) from None
        if (
            start < 0
            or (end is not None and end < start)
            or (partition is not None and partition < 0)
        ):
            raise ConfigError(f"--offsets {spec!r}: {part!r} is an empty or negative range")
        out[partition] = (start, end)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Read the request, reply and dead-letter topics (read_committed) and the ledger, and "
        "prove: one reply per request, replies equal to the ledger byte for byte, no request "
        "applied twice, one version chain per record, a dead letter for every bad input. "
        f"Exit status: 0 no anomaly, {EXIT_ANOMALIES} anomalies, 1 failure, 2 usage, "
        "4 Kafka or PostgreSQL cannot be reached."
    )
    parser.add_argument("--since", type=_moment, help="RFC 3339: requests from this time")
    parser.add_argument("--until", type=_moment, help="RFC 3339: requests before this time")
    parser.add_argument(
        "--offsets",
        metavar="SPEC",
        help="request offsets instead: P:START-END[,...] or START-END for every partition "
        "(END exclusive; either may be empty)",
    )
    parser.add_argument(
        "--replayed-groups",
        metavar="G1,G2",
        default="",
        help="consumer groups that replayed the request topic: their committed offsets say "
        "which records have a republished copy of their reply",
    )
    parser.add_argument(
        "--accept-republished",
        action="store_true",
        help="lenient: extra reply copies identical to another copy are republished copies",
    )
    parser.add_argument("--entity", help="print the ledger history of this entity's records")
    parser.add_argument("--id", dest="record_id", help="... of this record only (with --entity)")
    parser.add_argument(
        "--history-limit", type=int, default=1000, metavar="N", help="ledger entries shown at most"
    )
    parser.add_argument(
        "--reply-slack",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="in a range, read replies from this long before the first request (clock skew)",
    )
    parser.add_argument(
        "--no-reply-to-topics",
        action="store_true",
        help="do not read the reply_to topics that requests name",
    )
    parser.add_argument(
        "--max-examples", type=int, default=20, metavar="N", help="examples shown per anomaly kind"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--out", type=Path, metavar="FILE", help="also write the JSON report here")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


async def run_from_args(settings: Settings, args: argparse.Namespace) -> int:
    options = AuditOptions(
        since=args.since,
        until=args.until,
        offsets=parse_offsets(args.offsets) if args.offsets else None,
        replayed_groups=tuple(g.strip() for g in args.replayed_groups.split(",") if g.strip()),
        accept_republished=args.accept_republished,
        entity=args.entity,
        record_id=args.record_id,
        history_limit=args.history_limit,
        reply_slack=timedelta(seconds=args.reply_slack),
        reply_to_topics=not args.no_reply_to_topics,
        max_examples=args.max_examples,
    )
    report = await run_audit(
        settings,
        options,
        progress=None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True),
    )
    if args.out is not None:
        args.out.write_bytes(report.to_json() + b"\n")
    if args.json:
        sys.stdout.write(report.to_json().decode() + "\n")
    else:
        print(report.render())
    if options.entity is not None:
        # A history is a query: only anomalies of its records and requests fail it.
        return 0 if report.history_ok else EXIT_ANOMALIES
    return 0 if report.ok else EXIT_ANOMALIES
