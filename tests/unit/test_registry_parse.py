"""parse_registry: the TOML's shape and names; every error names the file, entity and field."""

from __future__ import annotations

import pytest

from processor.db.registry import parse_registry
from processor.errors import ConfigError

SOURCE = "conf/entities.toml"


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_registry(text, SOURCE)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}: "), message
    return message


def test_a_full_registry_parses_with_defaults() -> None:
    """Omitted fields default to xmin, optimistic concurrency on, AlwaysOverwrite."""
    specs = parse_registry(
        """
[entities.account]
table = "account"
key = "id"

[entities.item]
table = "inventory.item"
key = "sku"
row_version = "version"
optimistic_concurrency = true
default_behavior = "IfRowVersionMatches"
attributes = ["qty", "price"]

[entities.note]
table = "note"
key = "id"
optimistic_concurrency = false
""",
        SOURCE,
    )
    account, item, note = specs
    assert (account.name, account.schema, account.table, account.key) == (
        "account",
        None,
        "account",
        "id",
    )
    assert account.row_version == "xmin"
    assert account.optimistic_concurrency is True
    assert account.default_behavior == "AlwaysOverwrite"
    assert account.attributes is None
    assert (item.schema, item.table, item.row_version) == ("inventory", "item", "version")
    assert item.default_behavior == "IfRowVersionMatches"
    assert item.attributes == ("qty", "price")
    assert note.optimistic_concurrency is False


def test_bad_toml_names_the_file() -> None:
    """A syntax error says which file and that it is not TOML."""
    message = _error('[entities.account\ntable = "a"')
    assert "not valid TOML" in message


def test_unknown_top_level_key() -> None:
    """Only [entities.*] is allowed at the top."""
    message = _error('[entity.account]\ntable = "a"\nkey = "id"\n')
    assert "unknown top-level key(s): entity" in message


@pytest.mark.parametrize("text", ["", "entities = 1\n", "[entities]\n"])
def test_no_entities(text: str) -> None:
    """A registry with no entity is an error, not an empty allowlist."""
    assert "at least one [entities.<name>]" in _error(text)


def test_entity_that_is_not_a_table() -> None:
    """entities.<name> must be a table."""
    assert "entities.account: must be a table" in _error('[entities]\naccount = "x"\n')


def test_unknown_fields_name_entity_and_fields() -> None:
    """A misspelt field (e.g. row_versoin) is named, with its entity."""
    message = _error('[entities.account]\ntable = "a"\nkey = "id"\nrow_versoin = "v"\ncolour = 1\n')
    assert "entities.account: unknown field(s): colour, row_versoin" in message


@pytest.mark.parametrize("field", ["table", "key"])
def test_required_fields(field: str) -> None:
    """table and key are required."""
    other = "key" if field == "table" else "table"
    message = _error(f'[entities.account]\n{other} = "x"\n')
    assert f"entities.account.{field}: is required" in message


BAD_NAMES = {
    "double quote": 'ac"count',
    "single quote": "ac'count",
    "semicolon": "account;drop",
    "uppercase": "Account",
    "space": "my account",
    "leading digit": "1account",
    "hyphen": "my-account",
    "non-ASCII": "cömpte",
    "empty": "",
}


@pytest.mark.parametrize("kind", sorted(BAD_NAMES))
@pytest.mark.parametrize("field", ["table", "key", "row_version"])
def test_bad_identifiers_are_rejected_naming_entity_and_field(kind: str, field: str) -> None:
    """Quotes, semicolons, uppercase and other non-plain names never reach SQL text."""
    values = {"table": "account", "key": "id", field: BAD_NAMES[kind]}
    lines = "".join(f"{k} = {_toml_string(v)}\n" for k, v in values.items())
    message = _error(f"[entities.account]\n{lines}")
    assert f"entities.account.{field}: " in message
    assert "is not a plain identifier" in message


@pytest.mark.parametrize("kind", sorted(BAD_NAMES))
def test_bad_identifier_in_attributes_names_its_index(kind: str) -> None:
    """attributes[i] is named by its index."""
    bad = _toml_string(BAD_NAMES[kind])
    message = _error(f'[entities.account]\ntable = "a"\nkey = "id"\nattributes = ["ok", {bad}]\n')
    assert "entities.account.attributes[1]: " in message


@pytest.mark.parametrize("kind", sorted(set(BAD_NAMES) - {"empty"}))
def test_bad_entity_name_is_rejected(kind: str) -> None:
    """The entity's own name follows the same rule (it is echoed in logs and faults)."""
    message = _error(f'[entities.{_toml_string(BAD_NAMES[kind])}]\ntable = "a"\nkey = "id"\n')
    assert "entity name: " in message
    assert "is not a plain identifier" in message


@pytest.mark.parametrize("field", ["table", "key", "row_version", "schema"])
def test_names_over_63_bytes_are_rejected(field: str) -> None:
    """PostgreSQL truncates names over 63 bytes silently: refuse them instead."""
    long_name = "a" * 64
    values = {"table": "account", "key": "id"}
    if field == "schema":
        values["table"] = f"{long_name}.account"
    else:
        values[field] = long_name
    lines = "".join(f'{k} = "{v}"\n' for k, v in values.items())
    message = _error(f"[entities.account]\n{lines}")
    where = "table" if field == "schema" else field
    assert f"entities.account.{where}: " in message
    assert "longer than 63 bytes" in message


def test_63_bytes_is_the_longest_name() -> None:
    """Exactly 63 bytes is fine."""
    (spec,) = parse_registry(f'[entities.account]\ntable = "{"t" * 63}"\nkey = "id"\n', SOURCE)
    assert spec.table == "t" * 63


def test_long_entity_name_is_rejected() -> None:
    """The entity name is bounded too."""
    message = _error(f'[entities.{"e" * 64}]\ntable = "a"\nkey = "id"\n')
    assert "entity name: " in message
    assert "longer than 63 bytes" in message


def test_multibyte_name_is_measured_in_bytes() -> None:
    """The limit is PostgreSQL's: bytes, not characters (non-ASCII is refused anyway)."""
    message = _error(f'[entities.account]\ntable = "{"é" * 32}"\nkey = "id"\n')
    assert "longer than 63 bytes" in message


@pytest.mark.parametrize("table", ["a.b.c", ".account", "account.", "public..x"])
def test_table_with_more_than_one_dot_or_empty_parts(table: str) -> None:
    """table is 'table' or 'schema.table'."""
    message = _error(f'[entities.account]\ntable = "{table}"\nkey = "id"\n')
    assert "entities.account.table: " in message


@pytest.mark.parametrize(("field", "value"), [("table", "1"), ("key", "1"), ("table", "[]")])
def test_non_string_names(field: str, value: str) -> None:
    """Names must be strings."""
    values = {"table": '"account"', "key": '"id"', field: value}
    lines = "".join(f"{k} = {v}\n" for k, v in values.items())
    assert f"entities.account.{field}: expected a string" in _error(f"[entities.account]\n{lines}")


def test_optimistic_concurrency_must_be_a_boolean() -> None:
    """'yes' is not true."""
    message = _error('[entities.a]\ntable = "a"\nkey = "id"\noptimistic_concurrency = "yes"\n')
    assert "entities.a.optimistic_concurrency: expected true or false" in message


@pytest.mark.parametrize("value", ['"Default"', '"ifrowversionmatches"', "1", '"Never"'])
def test_default_behavior_must_be_a_concrete_behavior(value: str) -> None:
    """Default cannot resolve to itself; numbers and misspellings are refused."""
    message = _error(f'[entities.a]\ntable = "a"\nkey = "id"\ndefault_behavior = {value}\n')
    assert "entities.a.default_behavior: " in message
    assert "is not 'AlwaysOverwrite' or 'IfRowVersionMatches'" in message


def test_if_row_version_matches_default_needs_optimistic_concurrency() -> None:
    """An entity cannot default to a check it has switched off."""
    message = _error(
        '[entities.a]\ntable = "a"\nkey = "id"\noptimistic_concurrency = false\n'
        'default_behavior = "IfRowVersionMatches"\n'
    )
    assert "entities.a.default_behavior: IfRowVersionMatches needs optimistic_concurrency" in (
        message
    )


def test_always_overwrite_default_without_optimistic_concurrency_is_fine() -> None:
    """The combination that makes sense parses."""
    (spec,) = parse_registry(
        '[entities.a]\ntable = "a"\nkey = "id"\noptimistic_concurrency = false\n'
        'default_behavior = "AlwaysOverwrite"\n',
        SOURCE,
    )
    assert not spec.optimistic_concurrency


@pytest.mark.parametrize("value", ["[]", '"name"', "1"])
def test_attributes_must_be_a_non_empty_list(value: str) -> None:
    """An empty allowlist would make the entity useless; a string is not a list."""
    message = _error(f'[entities.a]\ntable = "a"\nkey = "id"\nattributes = {value}\n')
    assert "entities.a.attributes: expected a non-empty list of columns" in message


def test_attributes_listing_a_column_twice() -> None:
    """Duplicates are a mistake worth reporting."""
    message = _error('[entities.a]\ntable = "a"\nkey = "id"\nattributes = ["x", "y", "x"]\n')
    assert "entities.a.attributes: lists a column twice" in message


def test_first_bad_entity_is_named_among_good_ones() -> None:
    """With several entities, the error is about the one that is wrong."""
    message = _error(
        '[entities.good]\ntable = "g"\nkey = "id"\n'
        '[entities.bad]\ntable = "b"\nkey = "Id"\n'
        '[entities.also_good]\ntable = "h"\nkey = "id"\n'
    )
    assert "entities.bad.key: " in message


def _toml_string(value: str) -> str:
    """A TOML basic string holding ``value`` exactly."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
