"""The documentation as a reader meets it: no dangling file names, no notes to the team,
no tool that neither the local stack nor the project ships."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT

DOCS = sorted(
    {ROOT / "README.md", ROOT / "BENCHMARKS.md", *ROOT.glob("docs/*.md"), *ROOT.glob("docs/*/*.md")}
)
#: Words of notes meant for the team, not for readers.
INTERNAL = re.compile(r"README-ready|the lead\b|merges? them|\bTODO\b|\bFIXME\b|\bXXX\b", re.I)
#: Kafka's client-side scripts an operator of this project would be sent to: the local
#: stack ships jars, not these (broker-setup tools such as kafka-storage or kafka-configs,
#: for one's own brokers, are another matter).
KAFKA_SCRIPTS = re.compile(r"kafka-(consumer-groups|topics|console-\w+)(\.sh)?\b")


def _tracked() -> set[str]:
    found = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return set(found) | {Path(f).name for f in found}


def _beside(doc: Path, name: str) -> str:
    """``name`` as a link relative to ``doc`` (``../README.md`` from docs/), from the root."""
    resolved = (doc.parent / name).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else name


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_a_markdown_file_a_doc_names_is_in_the_repository(doc: Path) -> None:
    tracked = _tracked()
    named = set(re.findall(r"[\w./-]*[A-Za-z0-9_]\.md\b", doc.read_text()))
    missing = sorted(n for n in named if n not in tracked and _beside(doc, n) not in tracked)
    assert not missing, f"{_name(doc)} names files that are not in the repository: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_a_doc_holds_no_note_to_the_team(doc: Path) -> None:
    lines = [
        f"{i}: {line.strip()}"
        for i, line in enumerate(doc.read_text().splitlines(), 1)
        if INTERNAL.search(line)
    ]
    assert not lines, f"{_name(doc)}: {lines}"


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_a_doc_names_no_kafka_script_the_stack_does_not_ship(doc: Path) -> None:
    found = {
        m.group(0).removesuffix(".sh")
        for m in KAFKA_SCRIPTS.finditer(doc.read_text().replace("\n", " "))
    }
    assert not found, (
        f"{_name(doc)} names {sorted(found)}: not shipped by ops/stack; use the project's "
        "own commands (processor audit --replayed-groups, the processor_consumer_lag metric)"
    )


#: The transactional id of the first commit path (one producer per input partition); the
#: worker's is ``<group>-<worker id>`` now. Only docs/design.md's account of that design
#: may name the old one.
OLD_TRANSACTIONAL_ID = "<group>-<topic>-<partition>"
HISTORY = "thefirstdesign(oneproducerperinputpartition,`<group>-<topic>-<partition>`"


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_a_doc_names_the_transactional_id_the_worker_uses(doc: Path) -> None:
    squeezed = re.sub(r"\s+", "", doc.read_text())  # a name may wrap across lines
    if _name(doc) == "docs/design.md":
        squeezed = squeezed.replace(HISTORY, "")
    assert OLD_TRANSACTIONAL_ID not in squeezed, (
        f"{_name(doc)} names the transactional id {OLD_TRANSACTIONAL_ID}: the worker's is "
        "<group>-<worker id> (PROCESSOR_WORKER_ID)"
    )
