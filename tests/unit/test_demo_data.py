"""The demo's registry and schema travel with the package (an installed wheel has no ops/)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import processor
from processor.tools.demo import DEFAULT_REGISTRY
from tests.support import ROOT


def test_the_demo_registry_and_schema_are_package_data() -> None:
    package = Path(processor.__file__).resolve().parent
    assert DEFAULT_REGISTRY.is_relative_to(package)
    assert DEFAULT_REGISTRY.is_file()
    assert (DEFAULT_REGISTRY.parent / "schema.sql").is_file()
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    data = declared["package-data"]["processor.tools"]
    relative = DEFAULT_REGISTRY.relative_to(package / "tools")
    assert any(relative.match(pattern) for pattern in data)
    assert any((relative.parent / "schema.sql").match(pattern) for pattern in data)
