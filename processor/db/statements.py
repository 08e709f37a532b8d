"""SQL for one entity, built once from registry names that passed the allowlist and catalog.

Every statement works on many rows at once (arrays + ``unnest``), so a batch costs a few
round trips whatever its size. Values always travel as parameters, never as SQL text.
"""

from __future__ import annotations

from dataclasses import dataclass

from processor.db.registry import Entity, quote

__all__ = ["EntityStatements"]


def _literal(name: str) -> str:
    # Only registry names reach here: plain identifiers, so no quote can occur in them.
    return f"'{name}'"


@dataclass(frozen=True, slots=True)
class EntityStatements:
    lock: str  # $1 keys -> (key, version), rows locked FOR UPDATE in key order
    read: str  # $1 keys -> (key, version, attributes json text)
    update: str  # $1 keys, $2 jsonb attrs -> (key, new version)
    delete: str  # $1 keys -> (key)

    @classmethod
    def build(cls, entity: Entity) -> EntityStatements:
        table = entity.qualified
        key = quote(entity.key.name)
        key_array = f"{entity.key.base_type}[]"
        version = entity.version_sql
        readable = [entity.key.name, *entity.attributes]
        json_pairs = ", ".join(f"{_literal(n)}, t.{quote(n)}" for n in readable)
        assignments = [
            f"{quote(n)} = CASE WHEN v.attrs ? {_literal(n)} THEN (v.rec).{quote(n)} "
            f"ELSE t.{quote(n)} END"
            for n in entity.attributes
        ]
        if entity.version_column is not None:
            vc = quote(entity.version_column)
            assignments.append(f"{vc} = t.{vc} + 1")
        return cls(
            lock=(
                f"SELECT t.{key} AS k, {version} AS v FROM {table} AS t "
                f"WHERE t.{key} = ANY($1::{key_array}) ORDER BY t.{key} FOR UPDATE"
            ),
            read=(
                f"SELECT t.{key} AS k, {version} AS v, jsonb_build_object({json_pairs})::text AS a "
                f"FROM {table} AS t WHERE t.{key} = ANY($1::{key_array})"
            ),
            update=(
                f"UPDATE {table} AS t SET {', '.join(assignments)} "
                # The current row is the base record: columns missing from attrs keep
                # their values instead of NULL, which a NOT NULL domain would reject.
                f"FROM (SELECT u.k, u.attrs, jsonb_populate_record(c, u.attrs) AS rec "
                f"FROM unnest($1::{key_array}, $2::jsonb[]) AS u(k, attrs) "
                f"JOIN {table} AS c ON c.{key} = u.k) AS v "
                f"WHERE t.{key} = v.k RETURNING t.{key} AS k, {version} AS v"
            ),
            delete=(
                f"DELETE FROM {table} AS t WHERE t.{key} = ANY($1::{key_array}) "
                f"RETURNING t.{key} AS k"
            ),
        )
