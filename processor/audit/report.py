"""The audit's report: what it read, judged and found, as text and as JSON."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from processor.audit.model import ANOMALIES
from processor.tools.text import counted as _n


@dataclass(slots=True)
class AuditReport:
    """What the audit read and found. ``ok``: no anomaly of any kind."""

    scope: dict[str, Any]
    counts: dict[str, int]
    outcomes: dict[str, int]
    fault_codes: dict[str, dict[str, Any]]
    anomalies: dict[str, int]
    examples: dict[str, list[dict[str, Any]]]
    notes: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] | None = None
    #: What the audit judged, and what it saw but could not or need not judge.
    coverage: dict[str, list[str]] = field(default_factory=dict)
    #: With a history (``--entity``): the anomalies that concern its records and requests.
    history_anomalies: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(self.anomalies.values())

    @property
    def history_ok(self) -> bool:
        """The history's records and requests have no anomaly (whatever is found elsewhere)."""
        return not self.history_anomalies

    def count(self, kind: str) -> int:
        return self.anomalies.get(kind, 0)

    def found(self) -> set[str]:
        """The kinds of anomaly found."""
        return {kind for kind, n in self.anomalies.items() if n}

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "scope": self.scope,
            "coverage": self.coverage,
            "counts": self.counts,
            "outcomes": self.outcomes,
            "fault_codes": self.fault_codes,
            "anomalies": self.anomalies,
            "examples": self.examples,
            "notes": self.notes,
            "history": self.history,
            "history_anomalies": self.history_anomalies,
        }

    def to_json(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self.to_dict()), indent=2)

    def render(self) -> str:
        """The human summary (with a history: the history, and one line on the rest)."""
        if self.history is not None:
            return self._render_history()
        s = self.scope
        total = sum(self.anomalies.values())
        lines = [
            "processor audit: "
            + ("OK, no anomalies" if self.ok else f"FAILED, {_n(total, 'anomaly')}"),
            f"  requests      {s['request_topic']}: {s['range']}",
            f"  replies       {', '.join(s['reply_topics'])}",
            f"  dead letters  {s['dlq_topic']}    ledger {s['ledger']}",
            f"  expected      {self._expected()}",
            "",
            "judged:",
        ]
        lines += [f"  - {line}" for line in self.coverage.get("judged", [])]
        not_judged = self.coverage.get("not_judged", [])
        lines.append("not judged:" + ("" if not_judged else " nothing"))
        lines += [f"  - {line}" for line in not_judged]
        lines += ["", "outcomes (per request record):"]
        width = max((len(k) for k in self.outcomes), default=0)
        lines += [f"  {k.ljust(width)}  {n:,}" for k, n in sorted(self.outcomes.items())]
        if self.fault_codes:
            lines.append("fault codes:")
            lines += [
                f"  {code:>12}  {v['name']:<32} {v['count']:,}"
                for code, v in sorted(self.fault_codes.items())
            ]
        lines.append("")
        lines.append("anomalies:" + ("" if total else " none"))
        for kind in ANOMALIES:
            n = self.anomalies.get(kind, 0)
            if not n:
                continue
            lines.append(f"  {kind}: {n:,}")
            lines += [f"    - {example_line(e)}" for e in self.examples.get(kind, [])]
            if n > len(self.examples.get(kind, [])):
                lines.append(f"    ... {n - len(self.examples.get(kind, [])):,} more")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def _expected(self) -> str:
        s = self.scope
        text = f"1 reply per request record (its processing by consumer group {s['group']})"
        if s["replayed_groups"]:
            text += (
                f", + 1 per replay by {', '.join(s['replayed_groups'])} that has passed the "
                "record (a republished copy)"
            )
        if s["accept_republished"]:
            text += "; extra copies identical to another copy are accepted as republished"
        return text

    def _render_history(self) -> str:
        assert self.history is not None
        found = self.history_anomalies
        entries = sum(len(r["entries"]) for r in self.history)
        lines = [
            "processor audit: history: "
            + (f"{_n(len(found), 'anomaly')} in it" if found else "no anomaly in it")
            + f", {_n(len(self.history), 'record')}, {_n(entries, 'entry')}"
        ]
        for record in self.history:
            lines.append(f"  {record['entity']} {record['id']}: version chain {record['chain']}")
            for e in record["entries"]:
                version = ""
                if e.get("prior") is not None or e.get("new") is not None:
                    new = e.get("new")
                    version = f" {e.get('prior')} -> {'deleted' if new is None else new}"
                replies = e.get("replies")
                told = "" if replies is None else f", {_n(replies, 'reply', 'replies')}"
                lines.append(
                    f"    {e.get('at') or '-':32} {e['request_id']} {e.get('type')} "
                    f"{e['outcome']}{version} (source {e.get('source') or '-'}{told})"
                )
        if found:
            lines.append("anomalies in this history:")
            lines += [f"  - {a['kind']}: {example_line(a)}" for a in found]
        total = sum(self.anomalies.values())
        elsewhere = total - len(found)
        lines.append(
            f"the audit of {self.scope['request_topic']} ({self.scope['range']}): "
            + (
                f"{_n(elsewhere, 'anomaly')} outside this history (they do not change this "
                "command's exit status; run processor audit without --entity to see them)"
                if elsewhere > 0
                else "no other anomaly"
            )
        )
        return "\n".join(lines)


def example_line(example: Mapping[str, Any]) -> str:
    rid = example.get("request_id")
    head = f"request {rid}: " if rid is not None else ""
    if "entity" in example:
        head += f"{example['entity']} {example['id']}: "
    where = f" [{', '.join(example['where'])}]" if example.get("where") else ""
    return f"{head}{example['detail']}{where}"


def coverage(report: AuditReport) -> dict[str, list[str]]:
    """What the audit judged and what it did not, in words (the report's first lines)."""
    c, s = report.counts, report.scope
    rejected = f"{c['rejected']:,} rejected at intake"
    if c["rejected_without_id"]:
        rejected += f" ({c['rejected_without_id']:,} without a request_id)"
    judged = [
        # the records split into requests and rejections first, then the ids they carry
        # (a rejected record's id counts too: "4 requests (5 distinct ids)" read as a miscount)
        f"{_n(c['request_records'], 'request record')} of {s['request_topic']} "
        f"({s['range']}): {_n(c['requests'], 'request')}, {rejected} "
        f"({_n(c['request_ids'], 'distinct request_id')})",
        f"{_n(c['replies'], 'reply', 'replies')} to them ({c['republished']:,} republished "
        "copies): the expected number, each equal to its ledger row",
        f"{_n(c['dead_letters'], 'dead letter')} for them: one for each bad input",
        f"{_n(c['ledger_rows'], 'ledger row')} of these requests ({c['ledger_applied']:,} "
        "applied), and every row citing these offsets",
    ]
    if c["chain_records"]:
        linking = (
            f"; {_n(c['chain_writes_other'], 'write')} of other requests in between link them"
            if c["chain_writes_other"]
            else ""
        )
        judged.append(
            f"the version chains of the {_n(c['chain_records'], 'record')} these requests "
            f"wrote, from each one's first write by them on ({_n(c['chain_writes'], 'write')}"
            f" of theirs{linking})"
        )
    not_judged = []
    if c["ledger_rows_other_topics"]:
        whose = (
            f"of {_n(c['other_topics'], 'other request topic')}"
            if c["other_topics"]
            else "without a source topic"
        )
        not_judged.append(
            f"{_n(c['ledger_rows_other_topics'], 'ledger row')} {whose} sharing {s['ledger']}: "
            "their requests, replies and version chains (audit each with its own "
            "PROCESSOR_REQUEST_TOPIC)"
        )
    if c["chain_records"]:
        not_judged.append(
            "the writes before each record's first write by these requests (other topics' "
            "traffic, a reset by plain SQL, or an earlier range)"
        )
    if c["chain_breaks_not_judged"]:
        not_judged.append(
            f"{_n(c['chain_breaks_not_judged'], 'break')} in those chains between writes of "
            "other requests only"
        )
    if c["replies_out_of_scope"]:
        not_judged.append(
            f"{_n(c['replies_out_of_scope'], 'reply', 'replies')} to requests outside the range"
        )
    if c["replies_unverifiable"]:
        not_judged.append(
            f"{_n(c['replies_unverifiable'], 'reply', 'replies')} that cannot be placed "
            "(no ledger row, and the range is partial)"
        )
    if c["replies_foreign"]:
        not_judged.append(
            f"{_n(c['replies_foreign'], 'reply', 'replies')} on reply_to topics to other requests"
        )
    if c["dead_letters_other"]:
        not_judged.append(
            f"{_n(c['dead_letters_other'], 'dead letter')} of other records or topics"
        )
    return {"judged": judged, "not_judged": not_judged}
