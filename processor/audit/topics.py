"""The audit's reads of Kafka: the topics' partitions and offsets, the audited spans, and
every record of the request, reply and dead-letter topics in them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiokafka import TopicPartition

from processor.audit.auditor import Auditor
from processor.audit.model import (
    AuditOptions,
    Progress,
    RequestRecord,
    read_reply,
    read_request,
)
from processor.config import Settings
from processor.errors import ConfigError
from processor.kafka import clients as kafka
from processor.tools.text import counted as _n


async def call(awaitable: Any) -> Any:
    return await asyncio.wait_for(awaitable, kafka.CALL_TIMEOUT)


async def _read_topic(
    bootstrap: kafka.KafkaAccess,
    topic: str,
    spans: Mapping[int, tuple[int, int]],
    handle: Callable[[Any], None],
    progress: Progress,
    label: str,
) -> None:
    """Every committed record of ``topic`` in ``spans`` ([start, end) per partition)."""
    if not any(start < end for start, end in spans.values()):
        return
    consumer = kafka.make_consumer(bootstrap, None, max_partition_fetch_bytes=4 * 1_048_576)
    await call(consumer.start())
    read = 0

    def shown(done: int, total: int) -> None:
        nonlocal read
        read = done
        progress.update(label, done, total)

    try:
        await kafka.read_spans(consumer, topic, spans, handle, progress=shown)
        progress.done(label, read)
    finally:
        await asyncio.wait_for(consumer.stop(), kafka.CALL_TIMEOUT)


def epoch_ms(moment: datetime) -> int:
    return max(0, int(moment.timestamp() * 1000))


async def _at_time(
    meta: Any, topic: str, partitions: list[int], ms: int, fallback: dict[int, int]
) -> dict[int, int]:
    """The first offset at or after ``ms`` per partition (``fallback`` where there is none)."""
    found = await call(meta.offsets_for_times({TopicPartition(topic, p): ms for p in partitions}))
    return {
        tp.partition: (hit.offset if hit is not None else fallback[tp.partition])
        for tp, hit in found.items()
    }


Spans = dict[int, tuple[int, int]]
Passes = Callable[[RequestRecord], int]
Consumed = Callable[[RequestRecord], str | None]


@dataclass(slots=True)
class _Topics:
    """The audited topics' partitions and the offsets taken before reading them.

    Group offsets first, then the replies' ends, then the requests' ends: every reply read
    has its request read, and no replay batch is _n without its offsets.
    """

    settings: Settings
    options: AuditOptions
    meta: Any
    parts: dict[str, list[int]]
    groups: dict[str, dict[int, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ends: dict[str, dict[int, int]] = field(default_factory=dict)
    req_start: dict[int, int] = field(default_factory=dict)

    @property
    def full(self) -> bool:
        o = self.options
        return o.since is None and o.until is None and o.offsets is None

    @property
    def req_parts(self) -> list[int]:
        return self.parts[self.settings.request_topic]

    async def take_offsets(self, admin: Any) -> None:
        s, o = self.settings, self.options
        for group in dict.fromkeys((s.group_id, *o.replayed_groups)):
            try:
                self.groups[group] = await kafka.group_offsets(
                    admin, group, s.request_topic, self.req_parts
                )
            except Exception as exc:  # an unknown group only loses detail
                self.groups[group] = {}
                self.notes.append(f"cannot read the offsets of group {group!r}: {exc!r}")
            if not self.groups[group]:
                self.notes.append(f"group {group!r} has no committed offsets on {s.request_topic}")
        for topic in (s.reply_topic, s.dlq_topic, s.request_topic):
            self.ends[topic] = await kafka.offsets(self.meta, topic, self.parts[topic], end=True)
        self.req_start = await kafka.offsets(self.meta, s.request_topic, self.req_parts, end=False)

    async def request_spans(self) -> Spans:
        """The audited offsets of the request topic, per partition."""
        o, topic = self.options, self.settings.request_topic
        req_end, req_start = self.ends[topic], self.req_start
        if o.offsets is None:
            first_at = (
                await _at_time(self.meta, topic, self.req_parts, epoch_ms(o.since), req_end)
                if o.since
                else req_start
            )
            last_at = (
                await _at_time(self.meta, topic, self.req_parts, epoch_ms(o.until), req_end)
                if o.until
                else req_end
            )
            return {p: (first_at[p], max(first_at[p], last_at[p])) for p in self.req_parts}
        unknown = {p for p in o.offsets if p is not None and p not in self.req_parts}
        if unknown:
            raise ConfigError(f"--offsets: no partition {sorted(unknown)} in the request topic")
        spans: Spans = {}
        for p in self.req_parts:
            wanted = o.offsets.get(p, o.offsets.get(None))
            if wanted is None:
                continue
            first, last = wanted
            end = req_end[p] if last is None else min(last, req_end[p])
            spans[p] = (max(first, req_start[p]), max(end, req_start[p]))
        return spans

    async def window(
        self, topic: str, partitions: list[int], end: dict[int, int], first_timestamp: int | None
    ) -> Spans:
        """A reply or dead-letter topic's span: from the earliest audited request (minus the
        slack) on, to ``end``."""
        begin = await kafka.offsets(self.meta, topic, partitions, end=False)
        if self.full:
            return {p: (begin[p], end[p]) for p in partitions}
        if first_timestamp is None:
            return {}
        ms = first_timestamp
        if self.options.since is not None:
            ms = min(ms, epoch_ms(self.options.since))
        ms = max(0, ms - int(self.options.reply_slack.total_seconds() * 1000))
        first = await _at_time(self.meta, topic, partitions, ms, end)
        return {p: (max(first[p], begin[p]), end[p]) for p in partitions}


async def read_topics(
    settings: Settings,
    options: AuditOptions,
    admin: Any,
    meta: Any,
    shown: Progress,
) -> tuple[Auditor, dict[str, Any], Passes, Consumed]:
    """Read every audited record into a new :class:`Auditor`; with the report's scope and
    the ``passes`` and ``consumed`` judges of :meth:`Auditor.finish`."""
    bootstrap = settings.kafka_access()
    topics = {
        "request": settings.request_topic,
        "reply": settings.reply_topic,
        "dead-letter": settings.dlq_topic,
    }
    parts: dict[str, list[int]] = {}
    for what, topic in topics.items():
        found = await kafka.topic_partitions(admin, topic)
        if found is None:
            raise ConfigError(f"the {what} topic {topic!r} does not exist")
        parts[topic] = found
    seen = _Topics(settings, options, meta, parts)
    await seen.take_offsets(admin)
    spans = await seen.request_spans()
    complete = seen.full and all(seen.req_start[p] == 0 for p in seen.req_parts)
    auditor = Auditor(
        settings.request_topic,
        spans,
        complete=complete,
        accept_republished=options.accept_republished,
        max_examples=options.max_examples,
        history=(options.entity, options.record_id) if options.entity else None,
    )
    auditor.notes.extend(seen.notes)
    max_bytes = settings.max_message_bytes
    await _read_topic(
        bootstrap,
        settings.request_topic,
        spans,
        lambda r: auditor.add_request(read_request(r, r.timestamp, max_bytes=max_bytes)),
        shown,
        "requests",
    )
    reply_topics = await _read_answers(admin, seen, auditor, shown, set(topics.values()))
    await _retention_notes(seen, auditor, complete)
    replay_lag = _replay_notes(seen, auditor)
    scope: dict[str, Any] = {
        "request_topic": settings.request_topic,
        "range": _describe_range(options, spans, full=seen.full, complete=complete),
        "full": seen.full,
        "complete": complete,
        "spans": {str(p): list(s) for p, s in sorted(spans.items())},
        "reply_topics": reply_topics,
        "dlq_topic": settings.dlq_topic,
        "group": settings.group_id,
        "replayed_groups": list(options.replayed_groups),
        "replay_lag": replay_lag,
        "accept_republished": options.accept_republished,
    }
    passes, consumed = _judges(settings, options, seen.groups)
    return auditor, scope, passes, consumed


async def _read_answers(
    admin: Any, seen: _Topics, auditor: Auditor, shown: Progress, audited: set[str]
) -> list[str]:
    """The replies (also on the reply_to topics requests name) and the dead letters; returns
    the reply topics read."""
    s, bootstrap = seen.settings, seen.settings.kafka_access()
    first = auditor.first_timestamp
    reply_parts = seen.parts[s.reply_topic]
    await _read_topic(
        bootstrap,
        s.reply_topic,
        await seen.window(s.reply_topic, reply_parts, seen.ends[s.reply_topic], first),
        lambda r: auditor.add_reply(read_reply(r.topic, r.partition, r.offset, r.value)),
        shown,
        "replies",
    )
    reply_topics = [s.reply_topic]
    if seen.options.reply_to_topics:
        for topic in sorted(auditor.reply_to_topics() - audited):
            found = await kafka.topic_partitions(admin, topic)
            if found is None:
                continue  # the worker answered on the default topic (InvalidArgument)
            reply_topics.append(topic)
            end = await kafka.offsets(seen.meta, topic, found, end=True)
            await _read_topic(
                bootstrap,
                topic,
                await seen.window(topic, found, end, first),
                lambda r: auditor.add_reply(
                    read_reply(r.topic, r.partition, r.offset, r.value), default_topic=False
                ),
                shown,
                f"replies on {topic}",
            )
    dlq_parts = seen.parts[s.dlq_topic]
    await _read_topic(
        bootstrap,
        s.dlq_topic,
        await seen.window(s.dlq_topic, dlq_parts, seen.ends[s.dlq_topic], first),
        lambda r: auditor.add_dead_letter(r.value),
        shown,
        "dead letters",
    )
    return reply_topics


async def _retention_notes(seen: _Topics, auditor: Auditor, complete: bool) -> None:
    reply_topic = seen.settings.reply_topic
    reply_begin = await kafka.offsets(seen.meta, reply_topic, seen.parts[reply_topic], end=False)
    if seen.full and any(reply_begin.values()):
        auditor.notes.append(
            "the reply topic's first offsets are past 0 (retention): requests whose replies "
            "were deleted show as missing replies"
        )
    if seen.full and not complete:
        auditor.notes.append(
            "the request topic's first offsets are past 0 (retention): replies without a "
            "ledger row cannot be placed and are _n as unverifiable"
        )


def _replay_notes(seen: _Topics, auditor: Auditor) -> dict[str, int]:
    """How far each replay group got: what `kafka-consumer-groups --describe` would say, so
    that an operator knows whether the replay has caught up before trusting the audit."""
    s = seen.settings
    req_end = seen.ends[s.request_topic]
    replay_lag: dict[str, int] = {}
    for group in dict.fromkeys(seen.options.replayed_groups):
        if group == s.group_id or not seen.groups.get(group):
            continue
        committed = seen.groups[group]
        behind = sum(
            max(0, req_end[p] - committed.get(p, seen.req_start[p])) for p in seen.req_parts
        )
        replay_lag[group] = behind
        auditor.notes.append(
            f"replay group {group} has caught up (its committed offsets are at the end of "
            f"{s.request_topic})"
            if behind == 0
            else f"replay group {group} is {_n(behind, 'record')} behind the end of "
            f"{s.request_topic}: if it is still running, audit again once it has caught "
            "up (records past its committed offsets expect no republished copy)"
        )
    return replay_lag


def _judges(
    settings: Settings, options: AuditOptions, groups: dict[str, dict[int, int]]
) -> tuple[Passes, Consumed]:
    original = groups[settings.group_id]
    replays = [groups[g] for g in dict.fromkeys(options.replayed_groups) if g != settings.group_id]

    def passes(rec: RequestRecord) -> int:
        return 1 + sum(1 for g in replays if g.get(rec.partition, -1) > rec.offset)

    def consumed(rec: RequestRecord) -> str | None:
        committed = original.get(rec.partition)
        if committed is None:
            return (
                f"group {settings.group_id} has no committed offset on partition "
                f"{rec.partition}: not consumed yet"
            )
        if committed > rec.offset:
            return f"group {settings.group_id} consumed it (committed offset {committed}): lost"
        return (
            f"group {settings.group_id} has not consumed it yet (committed offset "
            f"{committed} on partition {rec.partition})"
        )

    return passes, consumed


def _describe_range(
    options: AuditOptions, spans: Mapping[int, tuple[int, int]], *, full: bool, complete: bool
) -> str:
    if full:
        how = "everything"
    elif options.offsets is not None:
        how = "offsets"
    else:
        how = (
            f"since {options.since.isoformat() if options.since else '-'} "
            f"until {options.until.isoformat() if options.until else '-'}"
        )
    # END is exclusive, as in --offsets: an empty partition read as "0-0" looked like one record.
    described = (
        ", ".join(
            f"p{p} empty" if a == b else f"p{p} {a}-{b}" for p, (a, b) in sorted(spans.items())
        )
        or "nothing"
    )
    return f"{how}: {described}" + ("" if complete or not full else " (truncated)")
