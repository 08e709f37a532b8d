"""The pure checks of one ledger row and of one record's version chain."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from processor.audit.model import (
    BROKEN_VERSION_CHAIN,
    DOUBLE_APPLICATION,
    OUT_OF_ORDER_APPLICATION,
    Anomaly,
    Write,
    loc,
)
from processor.contract import decode_reply
from processor.db.ledger import LedgerEntry


def ledger_row_problems(row: LedgerEntry) -> list[str]:
    """What is inconsistent inside one ledger row (its reply bytes vs its columns)."""
    try:
        reply = decode_reply(row.reply)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return [f"reply bytes are not a Reply ({str(exc)[:80]})"]
    problems = []
    code = reply.fault.code if reply.fault else None
    for name, stored, in_reply in (
        ("request_id", row.request_id, reply.request_id),
        ("status", row.status, reply.status),
        ("fault_code", row.fault_code, code),
        ("type", row.type, reply.type),
        # An execute request has neither (its ledger row: ""), retrieve_entity no id.
        ("entity", row.entity, reply.entity or ""),
        ("record_id", row.record_id, "" if reply.id is None else str(reply.id)),
    ):
        if stored != in_reply:
            problems.append(f"{name} is {stored!r} but the reply says {in_reply!r}")
    applies = reply.status == "success" and reply.type in ("update", "delete")
    if row.applied != applies:
        problems.append(f"applied is {row.applied} for a {reply.status} {reply.type} reply")
    if row.writes is None:
        if applies:
            problems.append("an applied request without writes")
        return problems
    try:
        writes = msgspec.json.decode(row.writes)
    except msgspec.DecodeError:
        return [*problems, "writes is not JSON"]
    if not applies:
        return [*problems, "writes on a request that applied nothing"]
    if (
        not isinstance(writes, list)
        or not writes
        or not all(
            isinstance(w, dict) and {"entity", "id", "prior", "new"} <= w.keys() for w in writes
        )
    ):
        return [*problems, "writes is not a list of {entity, id, prior, new}"]
    first = writes[0]
    if (first["entity"], str(first["id"])) != (row.entity, row.record_id):
        problems.append(f"the first write is {first['entity']} {first['id']}, not the request's")
    if reply.type == "delete":
        if len(writes) != 1 or first["new"] is not None:
            problems.append("a delete's writes must be its one record with new = null")
    else:
        if any(w["new"] is None for w in writes):
            problems.append("an update's write has no new version")
        if first["new"] != reply.row_version:
            problems.append(
                f"the reply's row_version {reply.row_version!r} is not the write's new "
                f"version {first['new']!r}"
            )
        related = [(r.entity, str(r.id), r.row_version) for r in reply.related or []]
        written = [(w["entity"], str(w["id"]), w["new"]) for w in writes[1:]]
        if related != written:
            problems.append("the reply's related versions differ from the related writes")
    return problems


def version_name(v: str | None) -> str:
    return "deleted" if v is None else v


def written_records(row: LedgerEntry) -> list[tuple[str, str]]:
    """The records a consistent applied ledger row wrote (its own first)."""
    writes = msgspec.json.decode(row.writes) if row.writes else []
    return [(str(w["entity"]), str(w["id"])) for w in writes]


def _chain_problems(life: Sequence[Write]) -> list[tuple[tuple[Write, ...], str]]:
    """Why one incarnation's writes are not a single prior -> new path.

    Each problem names the writes involved (the guilty one first) and why; the details
    never repeat the guilty request's id, which the report prints in front of them.
    """
    problems: list[tuple[tuple[Write, ...], str]] = []
    by_prior: dict[str | None, Write] = {}
    for w in life:
        other = by_prior.get(w.prior)
        if other is not None:
            problems.append(
                (
                    (w, other),
                    f"fork: this request and request {other.request_id} both wrote over "
                    f"version {w.prior} (a lost update)",
                )
            )
            continue
        by_prior[w.prior] = w
    produced: dict[str, Write] = {}
    for w in life:
        if w.new is None:
            continue
        other = produced.get(w.new)
        if other is not None:
            problems.append(
                ((w, other), f"version {w.new} produced twice, also by request {other.request_id}")
            )
            continue
        produced[w.new] = w
    starts = [w for w in life if w.prior is None or w.prior not in produced]
    if not starts:
        return [*problems, (tuple(life), "the versions form a cycle")]
    # The first start (in processed_at order) is where the incarnation begins; every other
    # start is a gap.
    previous: Write | None = None
    start_ids = {id(w) for w in starts[1:]}
    for w in life:
        if id(w) in start_ids and previous is not None:
            problems.append(
                (
                    (w,),
                    f"gap: wrote over version {w.prior}, which no write produced (the write "
                    f"before it, by request {previous.request_id}, left "
                    f"{version_name(previous.new)})",
                )
            )
        previous = w
    if problems or len(starts) > 1:
        return problems
    seen, current = 0, starts[0]
    while True:
        seen += 1
        if current.new is None or seen > len(life):
            break
        follower = by_prior.get(current.new)
        if follower is None:
            break
        current = follower
    if seen != len(life):
        return [(tuple(life), "the versions form a cycle")]
    return []


def _order_problem(life: Sequence[Write]) -> tuple[str, str] | None:
    """Why a linked incarnation was applied against its requests' offset order, if it was.

    Walks the chain from its start (the order of application) and, per source topic and
    partition, checks that the record's own writes come from increasing offsets. Only a
    pair with an audited write is judged.
    """
    produced = {w.new for w in life if w.new is not None}
    by_prior = {w.prior: w for w in life}
    current: Write | None = next(
        (w for w in life if w.prior is None or w.prior not in produced), None
    )
    last: dict[tuple[str, int], Write] = {}
    steps = 0
    while current is not None and steps < len(life):
        steps += 1
        origin = current.origin
        if current.own and origin is not None:
            before = last.get(origin[:2])
            if (
                before is not None
                and before.origin is not None
                and before.origin[2] > origin[2]
                and (current.audited or before.audited)
            ):
                topic, partition, offset = origin
                return (
                    current.request_id,
                    f"applied after request {before.request_id}, which came later: "
                    f"{loc(topic, partition, offset)} before "
                    f"{loc(topic, partition, before.origin[2])}; version {current.prior} -> "
                    f"{version_name(current.new)} follows {before.prior} -> "
                    f"{version_name(before.new)}",
                )
            last[origin[:2]] = current
        current = by_prior.get(current.new) if current.new is not None else None
    return None


def _judge_life(entity: str, record_id: str, life: Sequence[Write]) -> tuple[list[Anomaly], int]:
    """One incarnation: its anomalies, and how many breaks involve no audited write (those
    are another request topic's business, not judged here)."""
    problems = _chain_problems(life)
    judged = [(ws, why) for ws, why in problems if any(w.audited for w in ws)]
    if judged:
        involved, why = judged[0]
        culprit = next(w for w in involved if w.audited)
        if culprit is not involved[0]:
            why = f"{why} (with request {involved[0].request_id}, of another source)"
        anomaly = Anomaly(BROKEN_VERSION_CHAIN, why, culprit.request_id, entity, record_id)
        return [anomaly], len(problems) - len(judged)
    if problems:
        return [], len(problems)
    order = _order_problem(life)
    if order:
        return [Anomaly(OUT_OF_ORDER_APPLICATION, order[1], order[0], entity, record_id)], 0
    return [], 0


def judge_chain(entity: str, record_id: str, writes: Sequence[Write]) -> tuple[list[Anomaly], int]:
    """One record's writes, in processed_at order: one chain per incarnation, each once,
    applied in the offset order of the record's requests.

    Only what involves an *audited* write (``Write.audited``) is judged: the writes before
    the record's first audited write are dropped (its chain starts there, whatever came
    before: another request topic's traffic, a reset by plain SQL), and a break between
    writes of other requests is _n, not reported. Returns the anomalies and that count.
    """
    first = next((i for i, w in enumerate(writes) if w.audited), None)
    if first is None:
        return [], 0
    anomalies: list[Anomaly] = []
    seen: set[str] = set()
    unique: list[Write] = []
    for w in writes[first:]:
        if w.request_id in seen:
            if w.audited:
                anomalies.append(
                    Anomaly(
                        DOUBLE_APPLICATION,
                        f"the request wrote this record twice (again {w.prior} -> "
                        f"{version_name(w.new)})",
                        w.request_id,
                        entity,
                        record_id,
                    )
                )
            continue
        seen.add(w.request_id)
        unique.append(w)
    not_judged = 0
    life: list[Write] = []
    for w in unique:
        life.append(w)
        if w.new is None:
            found, skipped = _judge_life(entity, record_id, life)
            anomalies.extend(found)
            not_judged += skipped
            life = []
    if life:
        found, skipped = _judge_life(entity, record_id, life)
        anomalies.extend(found)
        not_judged += skipped
    return anomalies, not_judged


def check_chain(entity: str, record_id: str, writes: Sequence[Write]) -> list[Anomaly]:
    """The anomalies of :func:`judge_chain`."""
    return judge_chain(entity, record_id, writes)[0]
