"""The entity registry: which tables the processor may touch, and how (TOML + catalog).

Each ``[entities.<name>]`` table maps a logical entity name to a PostgreSQL table, its
key, its row-version source (``xmin`` or an integer version column) and Dataverse's
``IsOptimisticConcurrencyEnabled`` switch. :func:`load_registry` validates every name
against an identifier allowlist and then against the live catalog; the worker does not
start on any error, and the error names the file, the entity and the field.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from processor.db import Connection
from processor.errors import ConfigError
from processor.names import is_identifier

__all__ = ["Column", "Entity", "Registry", "load_registry", "parse_registry"]

_ALLOWED_KEYS: Final = frozenset(
    {"table", "key", "row_version", "optimistic_concurrency", "default_behavior", "attributes"}
)
#: Column types a key may have, and how the wire ``id`` must look for each.
_KEY_KINDS: Final[Mapping[str, Literal["int", "str", "uuid"]]] = {
    "smallint": "int",
    "integer": "int",
    "bigint": "int",
    "text": "str",
    "character varying": "str",
    "uuid": "uuid",
}
_INT_RANGES: Final[Mapping[str, tuple[int, int]]] = {
    "smallint": (-(2**15), 2**15 - 1),
    "integer": (-(2**31), 2**31 - 1),
    "bigint": (-(2**63), 2**63 - 1),
}


def quote(name: str) -> str:
    """Quote an identifier that already passed the allowlist (never a raw input)."""
    assert is_identifier(name), name
    return f'"{name}"'


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str  # format_type(), e.g. "integer", "numeric(12,2)", "text"
    base_type: str  # the type without modifiers: "numeric", "character varying"
    category: str  # pg_type.typcategory: N numeric, S string, B bool, D datetime, A array, U...
    nullable: bool

    @property
    def int_range(self) -> tuple[int, int] | None:
        return _INT_RANGES.get(self.base_type)


@dataclass(frozen=True, slots=True)
class Entity:
    """One validated registry entry, with the SQL built once from catalog-checked names."""

    name: str
    schema: str
    table: str
    key: Column
    version_column: str | None  # None: the xmin system column
    optimistic_concurrency: bool
    default_behavior: Literal["AlwaysOverwrite", "IfRowVersionMatches"]
    attributes: Mapping[str, Column]
    key_kind: Literal["int", "str", "uuid"] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_kind", _KEY_KINDS[self.key.base_type])

    @property
    def qualified(self) -> str:
        return f"{quote(self.schema)}.{quote(self.table)}"

    @property
    def version_sql(self) -> str:
        """SQL for the row's version as text, on alias ``t``."""
        if self.version_column is None:
            return "t.xmin::text"
        return f"t.{quote(self.version_column)}::text"


@dataclass(frozen=True, slots=True)
class Registry:
    entities: Mapping[str, Entity]
    source: str = "<registry>"

    def get(self, name: str) -> Entity | None:
        return self.entities.get(name)


@dataclass(frozen=True, slots=True)
class _Spec:
    name: str
    schema: str | None
    table: str
    key: str
    row_version: str
    optimistic_concurrency: bool
    default_behavior: Literal["AlwaysOverwrite", "IfRowVersionMatches"]
    attributes: tuple[str, ...] | None


def _ident(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {type(value).__name__}")
    if len(value.encode()) > 63:
        raise ConfigError(
            f"{where}: {value[:80]!r} is longer than 63 bytes (PostgreSQL would truncate it)"
        )
    if not is_identifier(value):
        raise ConfigError(
            f"{where}: {value[:80]!r} is not a plain identifier "
            "(lowercase letters, digits and '_', not starting with a digit)"
        )
    return value


def parse_registry(text: str, source: str = "<registry>") -> list[_Spec]:
    """Parse and check the TOML's shape and names; the catalog is checked by load_registry."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    unknown_top = set(data) - {"entities"}
    if unknown_top:
        raise ConfigError(f"{source}: unknown top-level key(s): {', '.join(sorted(unknown_top))}")
    entities = data.get("entities")
    if not isinstance(entities, dict) or not entities:
        raise ConfigError(f"{source}: needs at least one [entities.<name>] table")
    specs = []
    for name, raw in entities.items():
        where = f"{source}: entities.{name}"
        _ident(name, f"{source}: entity name")
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: must be a table")
        unknown = set(raw) - _ALLOWED_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown field(s): {', '.join(sorted(unknown))}")
        for required in ("table", "key"):
            if required not in raw:
                raise ConfigError(f"{where}.{required}: is required")
        table_value = raw["table"]
        if not isinstance(table_value, str):
            raise ConfigError(f"{where}.table: expected a string")
        parts = table_value.split(".")
        if len(parts) > 2:
            raise ConfigError(f"{where}.table: {table_value!r} is not 'table' or 'schema.table'")
        schema = _ident(parts[0], f"{where}.table") if len(parts) == 2 else None
        table = _ident(parts[-1], f"{where}.table")
        key = _ident(raw["key"], f"{where}.key")
        row_version = _ident(raw.get("row_version", "xmin"), f"{where}.row_version")
        oc = raw.get("optimistic_concurrency", True)
        if not isinstance(oc, bool):
            raise ConfigError(f"{where}.optimistic_concurrency: expected true or false")
        default = raw.get("default_behavior", "AlwaysOverwrite")
        if default not in ("AlwaysOverwrite", "IfRowVersionMatches"):
            raise ConfigError(
                f"{where}.default_behavior: {default!r} is not "
                "'AlwaysOverwrite' or 'IfRowVersionMatches'"
            )
        if default == "IfRowVersionMatches" and not oc:
            raise ConfigError(
                f"{where}.default_behavior: IfRowVersionMatches needs optimistic_concurrency"
            )
        attributes = raw.get("attributes")
        if attributes is not None:
            if not isinstance(attributes, list) or not attributes:
                raise ConfigError(f"{where}.attributes: expected a non-empty list of columns")
            attributes = tuple(
                _ident(a, f"{where}.attributes[{i}]") for i, a in enumerate(attributes)
            )
            if len(set(attributes)) != len(attributes):
                raise ConfigError(f"{where}.attributes: lists a column twice")
        specs.append(_Spec(name, schema, table, key, row_version, oc, default, attributes))
    return specs


_TABLE_SQL: Final = """
SELECT n.nspname, c.relname, c.relkind::text AS relkind
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass($1)
"""
_COLUMNS_SQL: Final = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type,
       format_type(a.atttypid, NULL) AS base_type, t.typcategory::text AS category,
       NOT a.attnotnull AS nullable, a.attgenerated <> '' AS generated
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
_UNIQUE_KEY_SQL: Final = """
SELECT EXISTS (
  SELECT 1 FROM pg_index i
  WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indnkeyatts = 1
    AND i.indpred IS NULL AND i.indexprs IS NULL
    AND i.indkey[0] = (SELECT attnum FROM pg_attribute
                       WHERE attrelid = to_regclass($1) AND attname = $2))
"""


async def _resolve(conn: Connection, spec: _Spec, source: str) -> Entity:
    where = f"{source}: entities.{spec.name}"
    regclass = f"{quote(spec.schema)}.{quote(spec.table)}" if spec.schema else quote(spec.table)
    row = await conn.fetchrow(_TABLE_SQL, regclass)
    if row is None:
        raise ConfigError(f"{where}.table: table {regclass} does not exist (or is not visible)")
    if row["relkind"] not in ("r", "p"):
        raise ConfigError(f"{where}.table: {regclass} is not a table")
    if row["relkind"] == "p" and spec.row_version == "xmin":
        raise ConfigError(
            f"{where}.row_version: partitioned table {regclass} needs a version column, not xmin"
        )
    schema, table = row["nspname"], row["relname"]
    qualified = f"{quote(schema)}.{quote(table)}"
    columns = {
        r["attname"]: (
            Column(r["attname"], r["type"], r["base_type"], r["category"], r["nullable"]),
            r["generated"],
        )
        for r in await conn.fetch(_COLUMNS_SQL, qualified)
    }
    if spec.key not in columns:
        raise ConfigError(f"{where}.key: column {spec.key!r} does not exist in {qualified}")
    key = columns[spec.key][0]
    if key.base_type not in _KEY_KINDS:
        raise ConfigError(
            f"{where}.key: column {spec.key!r} has type {key.type}; "
            f"supported key types: {', '.join(_KEY_KINDS)}"
        )
    if not await conn.fetchval(_UNIQUE_KEY_SQL, qualified, spec.key):
        raise ConfigError(
            f"{where}.key: column {spec.key!r} is not the primary key "
            f"or a unique key of {qualified}"
        )
    version_column: str | None = None
    if spec.row_version != "xmin":
        if spec.row_version not in columns:
            raise ConfigError(
                f"{where}.row_version: column {spec.row_version!r} does not exist in {qualified}"
            )
        vcol = columns[spec.row_version][0]
        if vcol.base_type not in ("smallint", "integer", "bigint") or vcol.nullable:
            raise ConfigError(
                f"{where}.row_version: column {spec.row_version!r} must be an integer NOT NULL "
                f"column (bigint recommended), not {vcol.type}{' NULL' if vcol.nullable else ''}"
            )
        if spec.row_version == spec.key:
            raise ConfigError(f"{where}.row_version: cannot be the key column")
        version_column = spec.row_version
    reserved = {spec.key, version_column}
    if spec.attributes is None:
        names = [n for n, (_, generated) in columns.items() if n not in reserved and not generated]
    else:
        names = list(spec.attributes)
        for i, name in enumerate(names):
            if name not in columns:
                raise ConfigError(
                    f"{where}.attributes[{i}]: column {name!r} does not exist in {qualified}"
                )
            if name in reserved:
                raise ConfigError(
                    f"{where}.attributes[{i}]: {name!r} is the key or the version column"
                )
            if columns[name][1]:
                raise ConfigError(f"{where}.attributes[{i}]: {name!r} is a generated column")
    if not names:
        raise ConfigError(f"{where}.attributes: {qualified} has no writable column")
    return Entity(
        name=spec.name,
        schema=schema,
        table=table,
        key=key,
        version_column=version_column,
        optimistic_concurrency=spec.optimistic_concurrency,
        default_behavior=spec.default_behavior,
        attributes={n: columns[n][0] for n in names},
    )


async def load_registry(
    conn: Connection, source: Path | str, *, text: str | None = None
) -> Registry:
    """Read the registry file (or ``text``) and validate it against the live catalog."""
    name = str(source)
    if text is None:
        try:
            # Read once at start-up, before any traffic: blocking is harmless here.
            text = Path(source).read_text(encoding="utf-8")  # noqa: ASYNC240
        except OSError as exc:
            raise ConfigError(f"{name}: cannot read the entity registry: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{name}: not UTF-8: {exc}") from exc
    specs = parse_registry(text, name)
    entities: dict[str, Entity] = {}
    tables: dict[str, str] = {}
    for spec in specs:
        entity = await _resolve(conn, spec, name)
        # The engine orders and versions writes per entity and key: two entities on one
        # table could write the same row twice in one round (the same xmin token twice,
        # and a version check against a stale read), so one table has one entity.
        other = tables.setdefault(entity.qualified, entity.name)
        if other != entity.name:
            raise ConfigError(
                f"{name}: entities.{spec.name}.table: {entity.qualified} is already the "
                f"table of entity {other!r} (one entity per table)"
            )
        entities[spec.name] = entity
    return Registry(entities, name)
