"""schemas/ is generated from the code: drift fails, and the schemas agree with the decoder."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from processor.config import Settings
from processor.contract import (
    DeadLetter,
    DeadLetterHeader,
    FaultDetail,
    Reply,
    decode_request,
    encode_reply,
)
from processor.errors import FAULT_TYPES, InvalidArgument
from processor.tools.schemas import DEFAULT_DIR, generate, main

jsonschema = pytest.importorskip("jsonschema")

GOOD_REQUESTS: list[dict[str, Any]] = [
    {
        "type": "update",
        "request_id": "r-1",
        "entity": "account",
        "id": 42,
        "attributes": {"name": "A", "balance": 10.5, "tags": ["x"], "extra": None},
        "row_version": "1234",
        "concurrency_behavior": "IfRowVersionMatches",
        "expires_at": "2030-01-01T00:00:00Z",
        "reply_to": "my.replies-1",
        "related": [
            {"entity": "item", "id": "sku-1", "attributes": {"qty": 1}, "row_version": "7"}
        ],
    },
    {"type": "update", "request_id": "r-2", "entity": "item", "id": "x", "attributes": {"q": 1}},
    {"type": "delete", "request_id": "r-3", "entity": "account", "id": 1, "row_version": "9"},
    {
        "type": "delete",
        "request_id": "r-4",
        "entity": "account",
        "id": 1,
        "concurrency_behavior": 2,
    },
    {"type": "retrieve", "request_id": "r-5", "entity": "account", "id": "a"},
]

BAD_REQUESTS: dict[str, dict[str, Any]] = {
    "unknown type": {"type": "upsert", "request_id": "r", "entity": "e", "id": 1},
    "no type": {"request_id": "r", "entity": "e", "id": 1},
    "unknown field": {"type": "delete", "request_id": "r", "entity": "e", "id": 1, "x": 1},
    "unknown related field": {
        "type": "update",
        "request_id": "r",
        "entity": "e",
        "id": 1,
        "attributes": {"a": 1},
        "related": [{"entity": "f", "id": 2, "attributes": {"b": 1}, "extra": True}],
    },
    "missing id": {"type": "delete", "request_id": "r", "entity": "e"},
    "update without attributes": {"type": "update", "request_id": "r", "entity": "e", "id": 1},
    "empty attributes": {
        "type": "update",
        "request_id": "r",
        "entity": "e",
        "id": 1,
        "attributes": {},
    },
    "empty request_id": {"type": "delete", "request_id": "", "entity": "e", "id": 1},
    "request_id of 129": {"type": "delete", "request_id": "r" * 129, "entity": "e", "id": 1},
    "NUL in request_id": {"type": "delete", "request_id": "a\x00", "entity": "e", "id": 1},
    "entity of 64": {"type": "delete", "request_id": "r", "entity": "e" * 64, "id": 1},
    "float id": {"type": "delete", "request_id": "r", "entity": "e", "id": 1.5},
    "behavior 3": {
        "type": "delete",
        "request_id": "r",
        "entity": "e",
        "id": 1,
        "concurrency_behavior": 3,
    },
    "behavior misspelt": {
        "type": "delete",
        "request_id": "r",
        "entity": "e",
        "id": 1,
        "concurrency_behavior": "ifrowversionmatches",
    },
    "row_version of 41": {
        "type": "delete",
        "request_id": "r",
        "entity": "e",
        "id": 1,
        "row_version": "1" * 41,
    },
    "reply_to with a space": {
        "type": "delete",
        "request_id": "r",
        "entity": "e",
        "id": 1,
        "reply_to": "a b",
    },
    "attribute name of 64": {
        "type": "update",
        "request_id": "r",
        "entity": "e",
        "id": 1,
        "attributes": {"a" * 64: 1},
    },
}


def _validator(schema: dict[str, Any]) -> Any:
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    return generate()


@pytest.fixture(scope="module")
def request_schema(files: dict[str, str]) -> Any:
    return _validator(json.loads(files["request.schema.json"]))


def test_committed_files_equal_the_generated_ones(files: dict[str, str]) -> None:
    """schemas/ is what `processor schemas` writes: edit the code, not the files."""
    drifted = [
        name
        for name, content in files.items()
        if not (DEFAULT_DIR / name).exists()
        or (DEFAULT_DIR / name).read_text(encoding="utf-8") != content
    ]
    assert drifted == [], f"run `processor schemas`; drifted: {drifted}"


def test_generate_is_deterministic_sorted_and_newline_terminated(files: dict[str, str]) -> None:
    """Two runs give the same bytes; JSON keys are sorted; each file ends in one newline."""
    assert generate() == files
    assert set(files) >= {
        "request.schema.json",
        "reply.schema.json",
        "asyncapi.json",
        "faults.md",
    }
    for name, content in files.items():
        assert content.endswith("\n"), name
        assert not content.endswith("\n\n"), name
        if name.endswith(".json"):
            assert json.dumps(json.loads(content), indent=2, sort_keys=True) + "\n" == content


def test_check_exits_1_naming_drifted_files_and_write_fixes_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--check writes nothing and lists stale or missing files; a plain run rewrites them."""
    assert main(["--dir", str(tmp_path)]) == 0
    assert main(["--check", "--dir", str(tmp_path)]) == 0
    (tmp_path / "faults.md").write_text("edited by hand\n", encoding="utf-8")
    (tmp_path / "reply.schema.json").unlink()
    capsys.readouterr()
    assert main(["--check", "--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "faults.md" in out
    assert "reply.schema.json" in out
    assert "request.schema.json" not in out
    assert not (tmp_path / "reply.schema.json").exists()
    assert main(["--dir", str(tmp_path)]) == 0
    assert main(["--check", "--dir", str(tmp_path)]) == 0


@pytest.mark.parametrize("example", GOOD_REQUESTS, ids=lambda e: f"{e['type']}-{e['request_id']}")
def test_contract_examples_validate_against_the_request_schema(
    request_schema: Any, example: dict[str, Any]
) -> None:
    """What the decoder accepts, the published schema accepts too."""
    decode_request(json.dumps(example).encode())
    request_schema.validate(example)


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_malformed_requests_fail_both_the_schema_and_the_decoder(
    request_schema: Any, name: str
) -> None:
    """A request the schema rejects is also rejected by decode_request (InvalidArgument)."""
    example = BAD_REQUESTS[name]
    assert not request_schema.is_valid(example)
    with pytest.raises(InvalidArgument):
        decode_request(json.dumps(example).encode())


def test_real_replies_validate_against_the_reply_schema(files: dict[str, str]) -> None:
    """Replies as the engine encodes them (success and fault) match reply.schema.json."""
    validator = _validator(json.loads(files["reply.schema.json"]))
    now = datetime(2030, 1, 1, tzinfo=UTC)
    success = Reply(
        request_id="r",
        type="update",
        entity="account",
        id=1,
        status="success",
        processed_at=now,
        row_version="77",
        behavior_applied="AlwaysOverwrite",
    )
    fault = Reply(
        request_id="r",
        type=None,
        entity=None,
        id=None,
        status="fault",
        processed_at=now,
        fault=FaultDetail(
            code=-2147088254,
            name="ConcurrencyVersionMismatch",
            message="m",
            retryable=True,
            expected_version="1",
            current_version="2",
            path="related[0]",
        ),
    )
    for reply in (success, fault):
        validator.validate(json.loads(encode_reply(reply)))
    assert not validator.is_valid({**json.loads(encode_reply(success)), "status": "maybe"})


def test_dead_letter_schema_matches_the_struct(files: dict[str, str]) -> None:
    """The dead-letter record value documented in schemas/ is the DeadLetter struct's."""
    validator = _validator(json.loads(files["dead-letter.schema.json"]))
    letter = DeadLetter(
        error="InvalidArgument: malformed JSON",
        fault_code=-2147220989,
        request_id=None,
        source_topic="requests",
        source_partition=0,
        source_offset=12,
        key="YWNjb3VudDox",
        headers=[DeadLetterHeader("traceparent", "MDA=")],
        value_prefix="e30=",
        value_length=2,
        value_sha256="44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
        dead_lettered_at=datetime(2030, 1, 1, tzinfo=UTC),
    )
    validator.validate(json.loads(msgspec.json.encode(letter)))
    schema = json.loads(files["dead-letter.schema.json"])
    assert schema["$ref"] == "#/$defs/DeadLetter"
    required = set(schema["$defs"]["DeadLetter"]["required"])
    assert {
        "key",
        "headers",
        "value_prefix",
        "value_sha256",
        "value_length",
        "error",
        "fault_code",
        "source_topic",
        "source_partition",
        "source_offset",
    } <= required


def test_faults_table_has_one_row_per_fault_code(files: dict[str, str]) -> None:
    """faults.md lists every code of FAULT_TYPES once, decimal and hex, with its flags."""
    rows = [line for line in files["faults.md"].splitlines() if line.startswith("| -")]
    assert len(rows) == len(FAULT_TYPES)
    for code, cls in FAULT_TYPES.items():
        (row,) = [r for r in rows if r.startswith(f"| {code} |")]
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[1] == f"0x{code & 0xFFFFFFFF:08X}"
        assert f"`{cls.name}`" in cells[2]
        assert cells[4] == ("yes" if cls.retryable else "no")
        assert cells[5] == ("yes" if cls.dead_letter else "no")
    assert "| -2147220969 | 0x80040217 | `ObjectDoesNotExist` | Dataverse |" in files["faults.md"]
    assert "| -2130771967 | 0x80FF0001 | `RequestExpired` | processor |" in files["faults.md"]


def test_asyncapi_document_describes_the_three_topics(files: dict[str, str]) -> None:
    """Channels for requests, replies and the DLQ at the default topics; the payload
    schemas it embeds accept the same requests as request.schema.json."""
    doc = json.loads(files["asyncapi.json"])
    assert doc["asyncapi"] == "3.0.0"
    settings = Settings()
    addresses = {c["address"] for c in doc["channels"].values()}
    assert addresses == {settings.request_topic, settings.reply_topic, settings.dlq_topic}
    assert addresses == {"requests", "replies", "requests.dlq"}
    actions = {(op["action"], op["channel"]["$ref"]) for op in doc["operations"].values()}
    assert actions == {
        ("receive", "#/channels/requests"),
        ("send", "#/channels/replies"),
        ("send", "#/channels/deadLetters"),
    }
    messages = doc["components"]["messages"]
    assert set(messages["Request"]["headers"]["properties"]) == {"request_id", "traceparent"}
    assert messages["Request"]["bindings"]["kafka"]["key"]["pattern"] == "^[^:]+:.+$"
    assert set(doc["components"]["schemas"]["DeadLetter"]["properties"]) >= {
        "value_prefix",
        "value_sha256",
        "value_length",
        "source_offset",
    }

    def payload_validator(message: str) -> Any:
        ref = messages[message]["payload"]["$ref"]
        schema = {"$ref": ref, "components": doc["components"]}
        return jsonschema.Draft7Validator(schema)

    request = payload_validator("Request")
    for example in GOOD_REQUESTS:
        request.validate(example)
    for example in BAD_REQUESTS.values():
        assert not request.is_valid(example)


def test_every_published_example_validates_and_decodes(files: dict[str, str]) -> None:
    """The examples of each new message (schemas and AsyncAPI) are real: valid under the
    schema, and decoded by the processor's own decoders to the same document."""
    request_schema = json.loads(files["request.schema.json"])
    reply_schema = json.loads(files["reply.schema.json"])
    request_examples = request_schema["examples"]
    reply_examples = reply_schema["examples"]
    assert {e["type"] for e in request_examples} >= {
        "retrieve_entity",
        "execute_transaction",
        "execute_multiple",
    }
    assert any("reply_partition" in e for e in request_examples)
    assert {e["type"] for e in reply_examples} >= {
        "retrieve_entity",
        "execute_transaction",
        "execute_multiple",
    }
    for example in request_examples:
        jsonschema.validate(example, request_schema)
        decoded = decode_request(json.dumps(example).encode())
        assert msgspec.to_builtins(decoded) == example
    for example in reply_examples:
        jsonschema.validate(example, reply_schema)
        assert msgspec.to_builtins(msgspec.json.decode(json.dumps(example), type=Reply)) == example
    asyncapi = json.loads(files["asyncapi.json"])
    messages = asyncapi["components"]["messages"]
    assert [e["payload"] for e in messages["Request"]["examples"]] == request_examples
    assert [e["payload"] for e in messages["Reply"]["examples"]] == reply_examples
