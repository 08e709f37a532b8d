"""ops/stack.py's KRaft cluster ids: never a value a command line takes for an option."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests.support import ROOT


def _stack_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ops_stack", ROOT / "ops" / "stack.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ops_stack"] = module
    spec.loader.exec_module(module)
    return module


def test_a_cluster_id_never_starts_with_a_dash() -> None:
    """One in 64 url-safe base64 uuids starts with '-': kafka-storage then failed with
    "argument --cluster-id: expected one argument" (a CI run hit it)."""
    stack = _stack_module()
    ids = [stack.new_cluster_id() for _ in range(5000)]
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(i) == 22 for i in ids)
