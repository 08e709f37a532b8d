"""The dependency lock (requirements/, written by ops/lock) agrees with pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support import ROOT

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.M)


def _pins(name: str) -> dict[str, str]:
    text = (ROOT / "requirements" / name).read_text()
    return {canonicalize_name(n): v for n, v in PIN.findall(text)}


def _group(groups: dict[str, list[Any]], name: str) -> list[str]:
    out: list[str] = []
    for item in groups[name]:
        out += _group(groups, item["include-group"]) if isinstance(item, dict) else [item]
    return out


def _project() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _build() -> list[str]:
    lines = (ROOT / "requirements" / "build.in").read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize(
    ("lock", "wanted"),
    [
        ("runtime.txt", lambda p: p["project"]["dependencies"] + _build()),
        (
            "dev.txt",
            lambda p: (
                p["project"]["dependencies"] + _group(p["dependency-groups"], "dev") + _build()
            ),
        ),
    ],
)
def test_every_dependency_is_pinned_in_the_lock_within_its_range(lock: str, wanted: Any) -> None:
    pins = _pins(lock)
    stale = []
    for spec in wanted(_project()):
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate():
            continue
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None or not req.specifier.contains(pinned, prereleases=True):
            stale.append(f"{spec} (lock: {pinned})")
    assert not stale, f"requirements/{lock} is stale, run ops/lock: {stale}"


def test_every_pin_has_hashes() -> None:
    for lock in ("runtime.txt", "dev.txt"):
        text = (ROOT / "requirements" / lock).read_text()
        blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
        assert blocks
        for block in blocks:
            assert "--hash=sha256:" in block, f"{lock}: {block.splitlines()[0]} has no hash"
