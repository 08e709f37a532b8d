"""Least privilege: the GRANTs a worker role (or a ledger-pruning role) needs, nothing more.

``processor grants --role NAME`` prints them, built from the validated registry and the
ledger schema, with a warning on stderr when the role does not exist yet; ``--apply``
executes them (as the tables' owner) in one transaction and then checks the role: it must
hold every privilege of the plan and nothing that lets it change the schema (superuser,
CREATE on a schema or the database, ownership of a table, extra table privileges).
``processor migrate`` stays a job for the owner.

What the worker's SQL (processor/db/statements.py, processor/db/ledger.py) needs, per entity:

* ``SELECT`` on the whole table: its UPDATE rebuilds each row from the current one
  (``jsonb_populate_record(c, ...)``, a whole-row reference), and PostgreSQL checks a
  whole-row reference against every column, so column-level SELECT would have to list
  every column anyway; retrieves read the key, the attributes and the version;
* ``UPDATE`` on the registry's attributes and the version column only (column-level);
  ``SELECT ... FOR UPDATE`` needs UPDATE on at least one column, which this is;
* ``DELETE`` (table-level: PostgreSQL has no column-level DELETE). Never INSERT: an update
  never creates a row.

The ledger: ``SELECT`` and ``INSERT`` for the worker; ``SELECT`` and ``DELETE`` for the
prune role (``--prune``: ``prune-ledger`` deletes by ``ctid``, a system column, which needs
table-level SELECT). Both need ``USAGE`` on their schemas and ``CONNECT`` on the database.

Names come from the registry and the ledger schema (both allowlisted identifiers), the
role name passes the same allowlist, and the database name is quoted by the server's
``quote_ident``: no raw input reaches the SQL text.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Final

from processor.config import Settings
from processor.db import Connection, connect
from processor.db.ledger import Ledger
from processor.db.registry import Registry, load_registry, quote
from processor.errors import ConfigError, ProcessorError
from processor.names import is_identifier

__all__ = [
    "Plan",
    "TableGrant",
    "check_role_name",
    "excess_privileges",
    "missing_privileges",
    "plan_for",
    "run_grants",
    "statements",
]

_RESERVED_ROLES: Final = frozenset(
    {"public", "none", "current_user", "session_user", "current_role"}
)
#: Table privileges the check looks for beyond the plan (MAINTAIN exists from PostgreSQL 17).
_TABLE_PRIVILEGES: Final[tuple[str, ...]] = (
    *("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"),
)


def check_role_name(name: str) -> str:
    """The role name, if it is a plain identifier that is not reserved; else ConfigError."""
    if not is_identifier(name):
        raise ConfigError(
            f"--role {name[:80]!r}: not a plain lowercase identifier of at most 63 bytes "
            "(letters a-z, digits, '_', not starting with a digit)"
        )
    if name in _RESERVED_ROLES or name.startswith("pg_"):
        raise ConfigError(f"--role {name!r}: a reserved role name")
    return name


@dataclass(frozen=True, slots=True)
class TableGrant:
    """Privileges on one table: table-level ones, and UPDATE on some columns."""

    table: str  # quoted and schema-qualified
    privileges: tuple[str, ...]
    update_columns: tuple[str, ...] = ()
    why: str = ""


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything one role gets."""

    kind: str  # "worker" or "prune"
    schemas: tuple[str, ...]
    tables: tuple[TableGrant, ...]


def plan_for(ledger: Ledger, registry: Registry | None = None, *, prune: bool = False) -> Plan:
    """The worker's privileges (registry tables + ledger), or the prune role's (ledger)."""
    if prune:
        return Plan(
            "prune",
            (ledger.schema,),
            (
                TableGrant(
                    ledger.table,
                    ("SELECT", "DELETE"),
                    why="the request ledger: find and delete entries past the retention",
                ),
            ),
        )
    assert registry is not None
    schemas = {ledger.schema}
    tables = []
    for name, entity in registry.entities.items():
        schemas.add(entity.schema)
        version = entity.version_column or "xmin"
        columns = [*entity.attributes]
        if entity.version_column is not None:
            columns.append(entity.version_column)
        tables.append(
            TableGrant(
                entity.qualified,
                ("SELECT", "DELETE"),
                tuple(columns),
                why=f"entity {name} (key {entity.key.name}, version {version}): read, lock, "
                "update its attributes, delete",
            )
        )
    tables.append(
        TableGrant(
            ledger.table,
            ("SELECT", "INSERT"),
            why="the request ledger: look up stored replies, record new ones",
        )
    )
    return Plan("worker", tuple(sorted(schemas)), tuple(tables))


def statements(plan: Plan, role: str, database: str) -> list[str]:
    """The GRANTs (and ``--`` comments) of ``plan``; ``database`` is already quoted."""
    r = quote(check_role_name(role))
    out = [
        f"GRANT CONNECT ON DATABASE {database} TO {r};",
        f"GRANT USAGE ON SCHEMA {', '.join(quote(s) for s in plan.schemas)} TO {r};",
    ]
    for grant in plan.tables:
        out.append(f"-- {grant.why}")
        out.append(f"GRANT {', '.join(grant.privileges)} ON TABLE {grant.table} TO {r};")
        if grant.update_columns:
            columns = ", ".join(quote(c) for c in grant.update_columns)
            out.append(f"GRANT UPDATE ({columns}) ON TABLE {grant.table} TO {r};")
    return out


_MISSING_SQL: Final = """
SELECT c.what
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
     AS c(kind, obj, col, priv, what)
WHERE NOT CASE c.kind
    WHEN 'schema' THEN has_schema_privilege(COALESCE($6::name, current_user), c.obj, c.priv)
    WHEN 'table' THEN has_table_privilege(COALESCE($6::name, current_user), c.obj, c.priv)
    ELSE has_column_privilege(COALESCE($6::name, current_user), c.obj, c.col, c.priv)
END
"""


async def missing_privileges(
    conn: Connection, registry: Registry, ledger: Ledger, *, role: str | None = None
) -> list[str]:
    """What the worker's plan needs and ``role`` (default: the session's user) lacks."""
    return await _missing(conn, plan_for(ledger, registry), role)


async def _missing(conn: Connection, plan: Plan, role: str | None) -> list[str]:
    rows: list[tuple[str, str, str, str, str]] = []
    for schema in plan.schemas:
        rows.append(("schema", schema, "", "USAGE", f"USAGE on schema {schema}"))
    for grant in plan.tables:
        for privilege in grant.privileges:
            rows.append(("table", grant.table, "", privilege, f"{privilege} on {grant.table}"))
        for column in grant.update_columns:
            rows.append(
                ("column", grant.table, column, "UPDATE", f"UPDATE on {grant.table} ({column})")
            )
    columns = [list(c) for c in zip(*rows, strict=True)]
    found = await conn.fetch(_MISSING_SQL, *columns, role)
    return [str(r["what"]) for r in found]


async def excess_privileges(conn: Connection, plan: Plan, role: str) -> list[str]:
    """What ``role`` holds beyond ``plan`` that a least-privilege role must not."""
    problems: list[str] = []
    attrs = await conn.fetchrow(
        "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls "
        "FROM pg_roles WHERE rolname = $1",
        role,
    )
    if attrs is None:
        raise ConfigError(f"role {role!r} does not exist")
    for attribute, label in (
        ("rolsuper", "is a superuser"),
        ("rolcreaterole", "may create roles (CREATEROLE)"),
        ("rolcreatedb", "may create databases (CREATEDB)"),
        ("rolreplication", "is a replication role"),
        ("rolbypassrls", "bypasses row-level security"),
    ):
        if attrs[attribute]:
            problems.append(label)
    if await conn.fetchval("SELECT has_database_privilege($1, current_database(), 'CREATE')", role):
        problems.append("may create schemas in this database (CREATE on the database)")
    for row in await conn.fetch(
        "SELECT nspname FROM pg_namespace WHERE nspname !~ '^pg_' "
        "AND nspname <> 'information_schema' AND has_schema_privilege($1, oid, 'CREATE') "
        "ORDER BY nspname",
        role,
    ):
        problems.append(f"may create objects in schema {row['nspname']} (CREATE)")
    for schema in plan.schemas:
        if await conn.fetchval(
            "SELECT pg_has_role($1, nspowner, 'USAGE') FROM pg_namespace WHERE nspname = $2",
            role,
            schema,
        ):
            problems.append(f"owns schema {schema} (or is a member of its owner)")
    privileges = _TABLE_PRIVILEGES
    if int(await conn.fetchval("SHOW server_version_num")) >= 170000:
        privileges += ("MAINTAIN",)
    for grant in plan.tables:
        if await conn.fetchval(
            "SELECT pg_has_role($1, relowner, 'USAGE') FROM pg_class WHERE oid = to_regclass($2)",
            role,
            grant.table,
        ):
            problems.append(f"owns {grant.table} (or is a member of its owner)")
            continue
        extra = [
            privilege
            for privilege in privileges
            if privilege not in grant.privileges
            and await conn.fetchval(
                "SELECT has_table_privilege($1, $2, $3)", role, grant.table, privilege
            )
        ]
        problems.extend(f"has {privilege} on {grant.table}" for privilege in extra)
        if "UPDATE" in extra or "UPDATE" in grant.privileges:
            continue  # column-level UPDATE is then implied (or already reported)
        extra_columns = await conn.fetch(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass($2) AND attnum > 0 "
            "AND NOT attisdropped AND NOT (attname = ANY($3::text[])) "
            "AND has_column_privilege($1, attrelid, attnum, 'UPDATE') ORDER BY attnum",
            role,
            grant.table,
            list(grant.update_columns),
        )
        problems.extend(f"has UPDATE on {grant.table} ({r['attname']})" for r in extra_columns)
    return problems


async def run_grants(settings: Settings, role: str, *, prune: bool, apply: bool) -> int:
    """``processor grants``: print the plan's GRANTs; with ``apply``, execute and check."""
    check_role_name(role)
    ledger = Ledger(settings.ledger_schema)
    if not prune:
        settings.require("entities")
    conn = await connect(settings)
    try:
        registry = None
        if not prune:
            assert settings.entities is not None
            registry = await load_registry(conn, settings.entities)
        plan = plan_for(ledger, registry, prune=prune)
        database = str(await conn.fetchval("SELECT quote_ident(current_database())"))
        sql = statements(plan, role, database)
        source = "the ledger" if prune else f"{settings.entities} and the ledger"
        exists = bool(await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role))
        create = f"CREATE ROLE {role} LOGIN PASSWORD '...'"
        if apply and not exists:
            raise ConfigError(f"role {role!r} does not exist: create it first, e.g. {create}")
        print(f"-- processor grants: the {plan.kind} role {role}, from {source}")
        print("\n".join(sql))
        if not apply:
            if not exists:
                # The GRANTs would fail on this server as they stand: say so, loudly.
                print(
                    f"processor grants: warning: role {role!r} does not exist on this server; "
                    f"create it before running these GRANTs, e.g. {create}",
                    file=sys.stderr,
                )
            return 0
        async with conn.transaction():
            for statement in sql:
                if not statement.startswith("--"):
                    await conn.execute(statement)
        missing = await _missing(conn, plan, role)
        if missing:
            raise ProcessorError(
                f"after the GRANTs, role {role} still lacks: {'; '.join(missing)} "
                "(run `processor grants --apply` as the owner of these tables)"
            )
        excess = await excess_privileges(conn, plan, role)
        if excess:
            print(
                f"processor grants: applied, but role {role} is not least-privilege: "
                + "; ".join(excess),
                file=sys.stderr,
            )
            return 1
        print(f"processor grants: applied to role {role}; it holds nothing more", file=sys.stderr)
        return 0
    finally:
        await conn.close()
