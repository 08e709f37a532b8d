"""Generate the published contract in ``schemas/`` from the code (``processor schemas``).

Files, all derived from :mod:`processor.contract`, :mod:`processor.errors` and the default
topic names in :class:`processor.config.Settings`:

- ``request.schema.json``: JSON Schema (2020-12) of the request union, tagged on ``type``;
- ``reply.schema.json``: JSON Schema of the reply every request gets;
- ``dead-letter.schema.json``: JSON Schema of a dead-letter record's value;
- ``asyncapi.json``: an AsyncAPI 3.0 document of the three topics and the processor's
  operations on them;
- ``faults.md``: the table of every fault code.

Output is deterministic (sorted keys, two-space indent, a trailing newline), so the
committed files can be compared with :func:`generate`; ``--check`` exits 1 on drift.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import msgspec

from processor.config import Settings
from processor.contract import (
    AttributeMetadata,
    DeadLetter,
    DeleteRequest,
    EntityMetadata,
    ExecuteMultipleRequest,
    ExecuteTransactionRequest,
    FaultDetail,
    Reply,
    Request,
    RetrieveEntityRequest,
    RetrieveRequest,
    UpdateRequest,
)
from processor.errors import FAULT_TYPES

__all__ = ["DEFAULT_DIR", "generate", "main"]

#: ``schemas/`` at the repository root (next to the ``processor`` package).
DEFAULT_DIR: Final = Path(__file__).resolve().parents[2] / "schemas"

_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
#: Processor-specific fault codes live in this block, which Dataverse does not use.
_PROCESSOR_BLOCK: Final = (0x80FF0000, 0x80FFFFFF)
_KAFKA_BINDING: Final = "0.5.0"


def _dump(document: object) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _json_schema(
    type_: Any, title: str, description: str, examples: Sequence[object] = ()
) -> dict[str, Any]:
    schema: dict[str, Any] = msgspec.json.schema(type_)
    document = {"$schema": _DIALECT, "title": title, "description": description, **schema}
    if examples:
        document["examples"] = [msgspec.to_builtins(e) for e in examples]
    return document


_AT: Final = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
_UPDATE: Final = UpdateRequest(
    request_id="7f6c1e2a-upd",
    entity="account",
    id=42,
    attributes={"balance": 90},
    row_version="918273",
    concurrency_behavior="IfRowVersionMatches",
)
_DELETE: Final = DeleteRequest(
    request_id="7f6c1e2a-del", entity="account", id=43, concurrency_behavior="AlwaysOverwrite"
)

#: One example of each request that needs more than its schema to read (name, summary, it).
REQUEST_EXAMPLES: Final[list[tuple[str, str, Request]]] = [
    (
        "routedUpdate",
        "An update whose reply goes to partition 3 of the caller's own reply topic.",
        msgspec.structs.replace(_UPDATE, reply_to="billing.replies", reply_partition=3),
    ),
    (
        "retrieveEntity",
        "Dataverse's RetrieveEntityRequest: the entity's metadata.",
        RetrieveEntityRequest(request_id="7f6c1e2a-meta", entity="account"),
    ),
    (
        "executeTransaction",
        "Dataverse's ExecuteTransactionRequest: in order, all or nothing.",
        ExecuteTransactionRequest(request_id="7f6c1e2a-tx", requests=[_UPDATE, _DELETE]),
    ),
    (
        "executeMultiple",
        "Dataverse's ExecuteMultipleRequest: each on its own, faults only in the reply.",
        ExecuteMultipleRequest(
            request_id="7f6c1e2a-multi",
            requests=[_UPDATE, RetrieveRequest(request_id="7f6c1e2a-get", entity="account", id=7)],
            continue_on_error=True,
            return_responses=False,
        ),
    ),
]
_MISMATCH: Final = FaultDetail(
    code=-2147088254,
    name="ConcurrencyVersionMismatch",
    message="the version of the existing record doesn't match the row_version provided",
    retryable=True,
    expected_version="918273",
    current_version="918301",
)
REPLY_EXAMPLES: Final[list[tuple[str, str, Reply]]] = [
    (
        "entityMetadata",
        "The reply to retrieve_entity.",
        Reply(
            request_id="7f6c1e2a-meta",
            type="retrieve_entity",
            entity="account",
            id=None,
            status="success",
            processed_at=_AT,
            entity_metadata=EntityMetadata(
                logical_name="account",
                is_optimistic_concurrency_enabled=True,
                default_behavior="AlwaysOverwrite",
                row_version="xmin",
                row_version_column=None,
                key=AttributeMetadata(logical_name="id", type="integer", nullable=False),
                attributes=[
                    AttributeMetadata(logical_name="name", type="text", nullable=False),
                    AttributeMetadata(logical_name="balance", type="numeric(12,2)", nullable=False),
                ],
            ),
        ),
    ),
    (
        "transactionRolledBack",
        "execute_transaction: request 0 conflicted, nothing was applied.",
        Reply(
            request_id="7f6c1e2a-tx",
            type="execute_transaction",
            entity=None,
            id=None,
            status="fault",
            processed_at=_AT,
            fault=_MISMATCH,
            faulted_request_index=0,
        ),
    ),
    (
        "transactionApplied",
        "execute_transaction: every reply, in order, each with its request_index.",
        Reply(
            request_id="7f6c1e2a-tx",
            type="execute_transaction",
            entity=None,
            id=None,
            status="success",
            processed_at=_AT,
            responses=[
                Reply(
                    request_id="7f6c1e2a-upd",
                    type="update",
                    entity="account",
                    id=42,
                    status="success",
                    processed_at=_AT,
                    row_version="918301",
                    behavior_applied="IfRowVersionMatches",
                    request_index=0,
                ),
                Reply(
                    request_id="7f6c1e2a-del",
                    type="delete",
                    entity="account",
                    id=43,
                    status="success",
                    processed_at=_AT,
                    behavior_applied="AlwaysOverwrite",
                    request_index=1,
                ),
            ],
        ),
    ),
    (
        "multipleWithAFault",
        "execute_multiple without return_responses: only the faults, by request_index.",
        Reply(
            request_id="7f6c1e2a-multi",
            type="execute_multiple",
            entity=None,
            id=None,
            status="success",
            processed_at=_AT,
            is_faulted=True,
            responses=[
                Reply(
                    request_id="7f6c1e2a-upd",
                    type="update",
                    entity="account",
                    id=42,
                    status="fault",
                    processed_at=_AT,
                    behavior_applied="IfRowVersionMatches",
                    fault=_MISMATCH,
                    request_index=0,
                )
            ],
        ),
    ),
]


def _message_examples(examples: Sequence[tuple[str, str, object]]) -> list[dict[str, Any]]:
    return [
        {"name": name, "summary": summary, "payload": msgspec.to_builtins(value)}
        for name, summary, value in examples
    ]


def _hex(code: int) -> str:
    """The code as Dataverse prints it: the 32-bit two's complement in hex."""
    return f"0x{code & 0xFFFFFFFF:08X}"


def _is_processor_code(code: int) -> bool:
    low, high = _PROCESSOR_BLOCK
    return low <= code & 0xFFFFFFFF <= high


def _faults_markdown() -> str:
    lines = [
        "# Fault codes",
        "",
        "Generated from `processor.errors.FAULT_TYPES` by `processor schemas`; do not edit.",
        "",
        "A fault reply carries `fault.code`, `fault.name`, `fault.message` and"
        " `fault.retryable`, and where it applies `fault.path` (e.g. `related[1]`,"
        " `attributes.balance`), `fault.expected_version` and `fault.current_version`."
        " Codes that Dataverse defines keep Dataverse's numbers and names (the Python"
        " exception's name is in parentheses where it differs); the processor's own codes"
        f" live in {_hex(_PROCESSOR_BLOCK[0])}-{_hex(_PROCESSOR_BLOCK[1])}, a block"
        " Dataverse does not use. Retryable: resending (with a new request_id after a"
        " version mismatch) can succeed. Dead-lettered: the request is bad input and the"
        " message is also written to the dead-letter topic.",
        "",
        "| code | hex | name | origin | retryable | dead-lettered | meaning |",
        "|---:|---|---|---|---|---|---|",
    ]
    for code, cls in FAULT_TYPES.items():
        name = f"`{cls.name}`"
        if cls.__name__ != cls.name:
            name += f" (`{cls.__name__}`)"
        origin = "processor" if _is_processor_code(code) else "Dataverse"
        meaning = " ".join(cls.summary.split()).replace("|", "\\|")
        lines.append(
            f"| {code} | {_hex(code)} | {name} | {origin} | "
            f"{'yes' if cls.retryable else 'no'} | {'yes' if cls.dead_letter else 'no'} | "
            f"{meaning} |"
        )
    return "\n".join(lines) + "\n"


def _header_schema(properties: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"type": "object", "properties": properties}


_REQUEST_ID_HEADER: Final = {
    "type": "string",
    "description": "The request's request_id (UTF-8). On a request: optional, used only to "
    "address the fault reply when the value is too large to decode.",
    "maxLength": 128,
}
_TRACEPARENT_HEADER: Final = {
    "type": "string",
    "description": "W3C Trace Context; copied from the request to its reply and dead letter.",
}
_TRACESTATE_HEADER: Final = {
    "type": "string",
    "description": "W3C Trace Context vendor state; copied like traceparent.",
}
_RECORD_KEY: Final = {
    "type": "string",
    "description": "`<entity>:<id>` (e.g. `account:42`): Kafka keeps a key's requests in one "
    "partition, in order, and the processor applies them in that order.",
    "pattern": "^[^:]+:.+$",
}


# Long on purpose (~180 lines): one literal, the AsyncAPI document as published; split, it
# would no longer read as the document it writes.
def _asyncapi() -> dict[str, Any]:
    settings = Settings()
    refs, components = msgspec.json.schema_components(
        [Request, Reply, DeadLetter], ref_template="#/components/schemas/{name}"
    )
    # AsyncAPI's schema dialect (a JSON Schema draft-07 superset) takes the discriminator
    # as the property's name, not OpenAPI's object that msgspec writes.
    request = {k: v for k, v in refs[0].items() if k != "discriminator"}
    components["Request"] = {
        "description": "One request, tagged on `type`: update, delete or retrieve.",
        "discriminator": refs[0]["discriminator"]["propertyName"],
        **request,
    }
    schemas = dict(sorted(components.items()))

    def kafka_channel(topic: str) -> dict[str, Any]:
        return {"topic": topic, "bindingVersion": _KAFKA_BINDING}

    messages: dict[str, Any] = {
        "Request": {
            "name": "Request",
            "title": "Request",
            "summary": "An update, delete or retrieve of one row (plus related rows), an "
            "entity's metadata, or a batch of row requests (execute_transaction, "
            "execute_multiple).",
            "contentType": "application/json",
            "payload": {"$ref": "#/components/schemas/Request"},
            "examples": _message_examples(REQUEST_EXAMPLES),
            "headers": _header_schema(
                {"request_id": _REQUEST_ID_HEADER, "traceparent": _TRACEPARENT_HEADER}
            ),
            "correlationId": {"$ref": "#/components/correlationIds/RequestId"},
            "bindings": {"kafka": {"key": _RECORD_KEY, "bindingVersion": _KAFKA_BINDING}},
        },
        "Reply": {
            "name": "Reply",
            "title": "Reply",
            "summary": "The one reply every request gets: success, or a fault (see faults.md).",
            "contentType": "application/json",
            "payload": {"$ref": "#/components/schemas/Reply"},
            "examples": _message_examples(REPLY_EXAMPLES),
            "headers": _header_schema(
                {
                    "request_id": {**_REQUEST_ID_HEADER, "description": "The request's id."},
                    "traceparent": _TRACEPARENT_HEADER,
                    "tracestate": _TRACESTATE_HEADER,
                }
            ),
            "correlationId": {"$ref": "#/components/correlationIds/RequestId"},
            "bindings": {
                "kafka": {
                    "key": {
                        **_RECORD_KEY,
                        "description": "The request's Kafka key, or `<entity>:<id>` when "
                        "it had none.",
                    },
                    "bindingVersion": _KAFKA_BINDING,
                }
            },
        },
        "DeadLetter": {
            "name": "DeadLetter",
            "title": "Dead letter",
            "summary": "A request that was bad input: the original record, bounded, and why.",
            "description": (
                "The record keeps the original key and headers, plus a `dlq.error` header. "
                "Its value holds the original key and headers (base64), the first bytes "
                "of the original value (`value_prefix`, base64, at most 4096 bytes), its "
                "`value_length` and `value_sha256`, the `error` text and `fault_code`, "
                "the `request_id` when it could be read, and where the record came from "
                "(`source_topic`, `source_partition`, `source_offset`)."
            ),
            "contentType": "application/json",
            "payload": {"$ref": "#/components/schemas/DeadLetter"},
            "headers": {
                "type": "object",
                "description": "The original record's headers, plus dlq.error.",
                "properties": {
                    "dlq.error": {
                        "type": "string",
                        "description": "`<fault name>: <message>`, at most 200 bytes.",
                    },
                    "request_id": _REQUEST_ID_HEADER,
                    "traceparent": _TRACEPARENT_HEADER,
                },
            },
            "bindings": {
                "kafka": {
                    "key": {
                        "type": "string",
                        "description": "The original record's key, unchanged (any bytes).",
                    },
                    "bindingVersion": _KAFKA_BINDING,
                }
            },
        },
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "processor",
            "version": _package_version(),
            "description": (
                "Kafka -> PostgreSQL request processor with Dataverse-style optimistic "
                "concurrency. Requests arrive on the request topic; each gets exactly one "
                "reply (on its `reply_to` topic, or the reply topic; on its "
                "`reply_partition` of that topic when given), correlated by "
                "request_id; bad input is also written to the dead-letter topic. Topic "
                "names are the defaults (PROCESSOR_REQUEST_TOPIC, PROCESSOR_REPLY_TOPIC, "
                "PROCESSOR_DLQ_TOPIC). Fault codes: faults.md."
            ),
        },
        "defaultContentType": "application/json",
        "channels": {
            "requests": {
                "address": settings.request_topic,
                "title": "Requests",
                "description": "Requests, keyed `<entity>:<id>`.",
                "messages": {"request": {"$ref": "#/components/messages/Request"}},
                "bindings": {"kafka": kafka_channel(settings.request_topic)},
            },
            "replies": {
                "address": settings.reply_topic,
                "title": "Replies",
                "description": (
                    "Replies of requests without `reply_to`; read it with "
                    "isolation.level=read_committed (replies are published in Kafka "
                    "transactions)."
                ),
                "messages": {"reply": {"$ref": "#/components/messages/Reply"}},
                "bindings": {"kafka": kafka_channel(settings.reply_topic)},
            },
            "deadLetters": {
                "address": settings.dlq_topic,
                "title": "Dead letters",
                "description": "Requests that were bad input, with the reason.",
                "messages": {"deadLetter": {"$ref": "#/components/messages/DeadLetter"}},
                "bindings": {"kafka": kafka_channel(settings.dlq_topic)},
            },
        },
        "operations": {
            "receiveRequest": {
                "action": "receive",
                "title": "Apply a request",
                "summary": "Consume a request, apply it in PostgreSQL, reply once.",
                "channel": {"$ref": "#/channels/requests"},
                "messages": [{"$ref": "#/channels/requests/messages/request"}],
                "reply": {
                    "address": {
                        "description": "The request's `reply_to`, else the reply topic; "
                        "partition `reply_partition` when given (a partition the topic "
                        "lacks: a fault reply on the reply topic and a dead letter).",
                        "location": "$message.payload#/reply_to",
                    },
                    "channel": {"$ref": "#/channels/replies"},
                    "messages": [{"$ref": "#/channels/replies/messages/reply"}],
                },
            },
            "sendReply": {
                "action": "send",
                "title": "Publish a reply",
                "summary": "One reply per request, in a Kafka transaction with the offset.",
                "channel": {"$ref": "#/channels/replies"},
                "messages": [{"$ref": "#/channels/replies/messages/reply"}],
            },
            "sendDeadLetter": {
                "action": "send",
                "title": "Dead-letter a request",
                "summary": "Bad input, besides its fault reply, goes to the dead-letter topic.",
                "channel": {"$ref": "#/channels/deadLetters"},
                "messages": [{"$ref": "#/channels/deadLetters/messages/deadLetter"}],
            },
        },
        "components": {
            "messages": messages,
            "schemas": schemas,
            "correlationIds": {
                "RequestId": {
                    "description": "The request_id, echoed in the reply's payload and header.",
                    "location": "$message.payload#/request_id",
                }
            },
        },
    }


def _package_version() -> str:
    """The project's version: pyproject.toml in a checkout, else the installed metadata.

    The checkout wins so that the output does not depend on how the package is installed.
    """
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        with pyproject.open("rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return metadata.version("processor")


def generate() -> dict[str, str]:
    """Every generated file: name -> content (deterministic, ending in a newline)."""
    return {
        "asyncapi.json": _dump(_asyncapi()),
        "dead-letter.schema.json": _dump(
            _json_schema(
                DeadLetter,
                "DeadLetter",
                "The value of a record on the dead-letter topic.",
            )
        ),
        "faults.md": _faults_markdown(),
        "reply.schema.json": _dump(
            _json_schema(
                Reply,
                "Reply",
                "The one reply every request gets, success or fault.",
                [e for _, _, e in REPLY_EXAMPLES],
            )
        ),
        "request.schema.json": _dump(
            _json_schema(
                Request,
                "Request",
                "A request on the request topic, tagged on `type`: update, delete, retrieve, "
                "retrieve_entity, execute_transaction or execute_multiple.",
                [e for _, _, e in REQUEST_EXAMPLES],
            )
        ),
    }


def drifted(directory: Path = DEFAULT_DIR) -> list[str]:
    """Names of the generated files that are missing from ``directory`` or differ."""
    stale = []
    for name, content in generate().items():
        path = directory / name
        try:
            current = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current != content:
            stale.append(name)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="processor schemas", description="Generate schemas/ from the code."
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 listing files that drifted"
    )
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="output directory")
    args = parser.parse_args(argv)
    directory: Path = args.dir
    if args.check:
        stale = drifted(directory)
        for name in stale:
            print(f"{directory / name}: out of date; run `processor schemas`")
        return 1 if stale else 0
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in generate().items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != content:
            path.write_text(content, encoding="utf-8")
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
