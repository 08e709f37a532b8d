"""load_registry against the live catalog: every error names the file, entity and field."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from processor.db.ledger import Ledger
from processor.db.registry import load_registry
from processor.engine.engine import Engine
from processor.errors import ConfigError
from tests.integration.engine_kit import envelope, update

SOURCE = "conf/entities.toml"

TABLES = """
CREATE TABLE account (
    id      integer PRIMARY KEY,
    name    text NOT NULL DEFAULT '',
    balance numeric(12,2),
    total   numeric GENERATED ALWAYS AS (balance * 2) STORED
);
CREATE TABLE item (
    sku     text PRIMARY KEY,
    qty     integer NOT NULL DEFAULT 0,
    version bigint NOT NULL DEFAULT 1,
    label   text NOT NULL DEFAULT '',
    loose   bigint,
    stamp   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE by_code (
    n     integer NOT NULL,
    code  varchar(20) NOT NULL UNIQUE,
    uid   uuid UNIQUE,
    ord   numeric PRIMARY KEY,
    tag   text,
    part  text,
    a     integer,
    b     integer,
    UNIQUE (a, b)
);
CREATE UNIQUE INDEX by_code_partial ON by_code (tag) WHERE tag IS NOT NULL;
CREATE UNIQUE INDEX by_code_expr ON by_code (lower(part));
CREATE TABLE only_key (id integer PRIMARY KEY);
CREATE TABLE no_key (id integer, name text);
CREATE VIEW account_view AS SELECT * FROM account;
CREATE TABLE parted (
    id      integer NOT NULL,
    version bigint NOT NULL DEFAULT 1,
    label   text,
    PRIMARY KEY (id)
) PARTITION BY RANGE (id);
CREATE TABLE parted_low PARTITION OF parted FOR VALUES FROM (0) TO (1000);
"""


@pytest.fixture
async def catalog(pg: asyncpg.Connection, db_schema: str) -> AsyncIterator[str]:
    """The test schema with the tables above, plus a second schema off the search_path."""
    await pg.execute(TABLES)
    other = f"{db_schema}_other"
    await pg.execute(
        f'CREATE SCHEMA "{other}"; '
        f'CREATE TABLE "{other}".ledgerish (id bigint PRIMARY KEY, body text, v integer NOT NULL)'
    )
    yield other
    await pg.execute(f'DROP SCHEMA "{other}" CASCADE')


async def _error(pg: asyncpg.Connection, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        await load_registry(pg, SOURCE, text=text)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}: "), message
    return message


def _entity(name: str, **fields: str | bool | list[str]) -> str:
    """One [entities.<name>] table in TOML (JSON's strings, arrays and booleans are TOML's)."""
    body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items())
    return f"[entities.{name}]\n{body}"


async def test_unknown_table(pg: asyncpg.Connection, catalog: str) -> None:
    """A table that does not exist (or is not visible) is named."""
    message = await _error(pg, _entity("ghost", table="ghost", key="id"))
    assert "entities.ghost.table: " in message
    assert "does not exist" in message


async def test_unknown_schema(pg: asyncpg.Connection, catalog: str) -> None:
    """So is a schema-qualified table in a schema that does not exist."""
    message = await _error(pg, _entity("a", table="nowhere.account", key="id"))
    assert "entities.a.table: " in message
    assert '"nowhere"."account"' in message


async def test_view_is_not_a_table(pg: asyncpg.Connection, catalog: str) -> None:
    """Views are refused (no xmin of their own, no unique key)."""
    message = await _error(pg, _entity("v", table="account_view", key="id"))
    assert "entities.v.table: " in message
    assert "is not a table" in message


async def test_unknown_key_column(pg: asyncpg.Connection, catalog: str) -> None:
    """The key column must exist."""
    message = await _error(pg, _entity("account", table="account", key="account_id"))
    assert "entities.account.key: column 'account_id' does not exist" in message


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("account", "name"),  # plain column
        ("no_key", "id"),  # table without any key
        ("by_code", "tag"),  # unique only WHERE tag IS NOT NULL
        ("by_code", "part"),  # unique only as lower(part)
        ("by_code", "a"),  # first column of a two-column unique
    ],
)
async def test_key_that_is_not_unique(
    pg: asyncpg.Connection, catalog: str, table: str, key: str
) -> None:
    """The key must be the primary key or a plain single-column unique key."""
    message = await _error(pg, _entity("e", table=table, key=key))
    assert f"entities.e.key: column {key!r} is not the primary key or a unique key" in message


async def test_key_of_unsupported_type(pg: asyncpg.Connection, catalog: str) -> None:
    """Only integer, text, varchar and uuid keys (the wire id is a string or an integer)."""
    message = await _error(pg, _entity("e", table="by_code", key="ord"))
    assert "entities.e.key: column 'ord' has type numeric" in message


@pytest.mark.parametrize(
    ("column", "problem"),
    [("label", "text"), ("stamp", "timestamp with time zone"), ("loose", "bigint NULL")],
)
async def test_version_column_that_is_not_an_integer_not_null(
    pg: asyncpg.Connection, catalog: str, column: str, problem: str
) -> None:
    """row_version must name an integer NOT NULL column."""
    message = await _error(pg, _entity("item", table="item", key="sku", row_version=column))
    assert f"entities.item.row_version: column {column!r} must be an integer NOT NULL" in message
    assert message.endswith(f"not {problem}")


async def test_unknown_version_column(pg: asyncpg.Connection, catalog: str) -> None:
    """row_version must exist."""
    message = await _error(pg, _entity("item", table="item", key="sku", row_version="rev"))
    assert "entities.item.row_version: column 'rev' does not exist" in message


async def test_version_column_cannot_be_the_key(pg: asyncpg.Connection, catalog: str) -> None:
    """The key never changes, so it cannot version the row."""
    message = await _error(pg, _entity("account", table="account", key="id", row_version="id"))
    assert "entities.account.row_version: cannot be the key column" in message


@pytest.mark.parametrize(
    ("attributes", "index", "problem"),
    [
        (["qty", "sku"], 1, "'sku' is the key or the version column"),
        (["version"], 0, "'version' is the key or the version column"),
        (["qty", "nope"], 1, "column 'nope' does not exist"),
    ],
)
async def test_attributes_naming_key_version_or_unknown_columns(
    pg: asyncpg.Connection, catalog: str, attributes: list[str], index: int, problem: str
) -> None:
    """attributes[i] names the offending column by index."""
    message = await _error(
        pg, _entity("item", table="item", key="sku", row_version="version", attributes=attributes)
    )
    assert f"entities.item.attributes[{index}]: {problem}" in message


async def test_generated_column_is_not_writable(pg: asyncpg.Connection, catalog: str) -> None:
    """A generated column cannot be listed; by default it is left out."""
    message = await _error(pg, _entity("account", table="account", key="id", attributes=["total"]))
    assert "entities.account.attributes[0]: 'total' is a generated column" in message
    registry = await load_registry(pg, SOURCE, text=_entity("account", table="account", key="id"))
    entity = registry.get("account")
    assert entity is not None
    assert list(entity.attributes) == ["name", "balance"]


async def test_table_without_writable_columns(pg: asyncpg.Connection, catalog: str) -> None:
    """An entity with nothing to update is an error."""
    message = await _error(pg, _entity("k", table="only_key", key="id"))
    assert "entities.k.attributes: " in message
    assert "has no writable column" in message


async def test_partitioned_table_needs_a_version_column(
    pg: asyncpg.Connection, db_schema: str, catalog: str
) -> None:
    """xmin is refused on a partitioned table; a version column is accepted and works."""
    message = await _error(pg, _entity("p", table="parted", key="id"))
    assert "entities.p.row_version: partitioned table" in message
    registry = await load_registry(
        pg, SOURCE, text=_entity("p", table="parted", key="id", row_version="version")
    )
    await pg.execute("INSERT INTO parted (id) VALUES (5)")
    ledger = Ledger(db_schema)
    await ledger.migrate(pg)
    (outcome,) = await Engine(registry, ledger).process(
        pg, [envelope(update("p", 5, {"label": "x"}, version="1", behavior=1))]
    )
    assert outcome.reply.status == "success", outcome.reply.fault
    assert outcome.reply.row_version == "2"


async def test_two_entities_on_one_table_are_refused(pg: asyncpg.Connection, catalog: str) -> None:
    """One table, one entity: two would let one batch write a row twice in one round."""
    text = _entity("account", table="account", key="id") + _entity(
        "account_alias", table="account", key="id", default_behavior="IfRowVersionMatches"
    )
    message = await _error(pg, text)
    assert "entities.account_alias.table: " in message
    assert "is already the table of entity 'account'" in message


async def test_unreadable_registry_file(pg: asyncpg.Connection, tmp_path: Path) -> None:
    """A missing or non-UTF-8 file is a ConfigError naming it."""
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read the entity registry"):
        await load_registry(pg, missing)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[entities]")
    with pytest.raises(ConfigError, match=r"binary\.toml: not UTF-8"):
        await load_registry(pg, binary)


async def test_good_registry_loads(
    pg: asyncpg.Connection, db_schema: str, catalog: str, tmp_path: Path
) -> None:
    """A registry with every option, read from a file, resolves each entity: schema-qualified
    tables off the search_path too, keys of each kind, attributes defaulting to the writable
    columns."""
    path = tmp_path / "entities.toml"
    path.write_text(
        _entity("account", table="account", key="id")
        + _entity(
            "item",
            table=f"{db_schema}.item",
            key="sku",
            row_version="version",
            default_behavior="IfRowVersionMatches",
            attributes=["qty", "label"],
        )
        + _entity("by_code", table="by_code", key="code", optimistic_concurrency=False)
        + _entity("remote", table=f"{catalog}.ledgerish", key="id", row_version="v"),
        encoding="utf-8",
    )
    registry = await load_registry(pg, path)
    assert registry.source == str(path)
    assert set(registry.entities) == {"account", "item", "by_code", "remote"}

    account = registry.entities["account"]
    assert (account.schema, account.table) == (db_schema, "account")
    assert account.key.name == "id"
    assert account.key_kind == "int"
    assert account.version_column is None
    assert account.optimistic_concurrency is True
    assert account.default_behavior == "AlwaysOverwrite"
    assert list(account.attributes) == ["name", "balance"]
    assert account.attributes["balance"].type == "numeric(12,2)"
    assert account.attributes["name"].nullable is False

    item = registry.entities["item"]
    assert item.qualified == f'"{db_schema}"."item"'
    assert item.version_column == "version"
    assert item.key_kind == "str"
    assert item.default_behavior == "IfRowVersionMatches"
    assert list(item.attributes) == ["qty", "label"]

    by_code = registry.entities["by_code"]
    assert by_code.key.name == "code"
    assert by_code.key_kind == "str"
    assert by_code.optimistic_concurrency is False
    assert "n" in by_code.attributes
    assert "code" not in by_code.attributes

    remote = registry.entities["remote"]
    assert (remote.schema, remote.table) == (catalog, "ledgerish")
    assert remote.qualified == f'"{catalog}"."ledgerish"'
    assert remote.version_column == "v"
    assert list(remote.attributes) == ["body"]
    assert remote.key.int_range == (-(2**63), 2**63 - 1)


async def test_uuid_key(pg: asyncpg.Connection, catalog: str) -> None:
    """A uuid unique key is accepted and read as a string on the wire."""
    registry = await load_registry(pg, SOURCE, text=_entity("u", table="by_code", key="uid"))
    entity = registry.get("u")
    assert entity is not None
    assert entity.key_kind == "uuid"


async def test_schema_qualified_table_is_found_off_the_search_path(
    pg: asyncpg.Connection, catalog: str
) -> None:
    """Unqualified, the other schema's table is not visible; qualified, it is."""
    message = await _error(pg, _entity("r", table="ledgerish", key="id"))
    assert "entities.r.table: " in message
    assert "does not exist" in message
    registry = await load_registry(
        pg, SOURCE, text=_entity("r", table=f"{catalog}.ledgerish", key="id")
    )
    assert registry.entities["r"].schema == catalog
