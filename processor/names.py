"""The one allowlist for the PostgreSQL names the processor puts into SQL text.

A plain identifier: lowercase ASCII letters, digits and ``_``, not starting with a digit,
at most 63 bytes (PostgreSQL's NAMEDATALEN - 1: a longer name is silently truncated).
Such a name never needs quoting rules beyond ``"name"``; anything else is refused before
it reaches a statement. Used for schema, table, column and role names (the ledger schema,
the registry's entities, ``processor grant --role``, ops/bench's database).
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["IDENTIFIER", "is_identifier"]

#: Match with ``fullmatch`` (``$`` would also match before a final newline).
IDENTIFIER: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def is_identifier(name: str) -> bool:
    """``name`` is a plain identifier of at most 63 bytes."""
    return IDENTIFIER.fullmatch(name) is not None
