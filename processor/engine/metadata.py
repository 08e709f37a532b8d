"""Entity metadata (Dataverse's RetrieveEntityRequest), from the validated registry.

The workers answer ``retrieve_entity`` with :func:`entity_metadata` of their registry;
``processor entities`` prints the local registry with :func:`render_table` (or as JSON).
"""

from __future__ import annotations

from collections.abc import Iterable

from processor.contract import AttributeMetadata, EntityMetadata
from processor.db.registry import Column, Entity

__all__ = ["entity_metadata", "render_table"]


def _attribute(column: Column) -> AttributeMetadata:
    return AttributeMetadata(logical_name=column.name, type=column.type, nullable=column.nullable)


def entity_metadata(entity: Entity) -> EntityMetadata:
    """What a caller needs to know to write to ``entity`` (the table's name stays private)."""
    return EntityMetadata(
        logical_name=entity.name,
        is_optimistic_concurrency_enabled=entity.optimistic_concurrency,
        default_behavior=entity.default_behavior,
        row_version="xmin" if entity.version_column is None else "column",
        row_version_column=entity.version_column,
        key=_attribute(entity.key),
        attributes=[_attribute(c) for c in entity.attributes.values()],
    )


def render_table(entities: Iterable[EntityMetadata]) -> str:
    """One line per entity, the columns aligned; attributes as ``name type[?]`` (? nullable)."""
    header = ("entity", "optimistic concurrency", "default", "row version", "key", "attributes")
    rows = [header]
    for m in entities:
        version = (
            m.row_version if m.row_version_column is None else f"column {m.row_version_column}"
        )
        attributes = ", ".join(
            f"{a.logical_name} {a.type}{'?' if a.nullable else ''}" for a in m.attributes
        )
        rows.append(
            (
                m.logical_name,
                "enabled" if m.is_optimistic_concurrency_enabled else "disabled",
                m.default_behavior,
                version,
                f"{m.key.logical_name} {m.key.type}",
                attributes,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = []
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, r[-1]]).rstrip())
    return "\n".join(lines)
