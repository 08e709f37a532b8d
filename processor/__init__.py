"""Kafka -> PostgreSQL request processor with Dataverse-style optimistic concurrency.

The public API is small: the wire contract, the fault tree, the registry, the engine, the
settings and the producer client (:class:`Client`, and its :class:`ServiceContext`).
Everything else (worker, intake, Kafka and database plumbing) is reached through the
``processor`` command.
"""

from processor.client import Client
from processor.config import Settings
from processor.context import ServiceContext
from processor.contract import (
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
    decode_request,
    encode_reply,
)
from processor.db.ledger import Ledger
from processor.db.registry import Registry, load_registry
from processor.engine.engine import Engine
from processor.engine.envelope import Envelope, Outcome, Source
from processor.errors import (
    FAULT_TYPES,
    AttributeNotFound,
    ConcurrencyVersionMismatch,
    ConcurrencyVersionNotProvided,
    ConfigError,
    DuplicateRequest,
    EntityNotFound,
    Fault,
    InvalidArgument,
    ObjectDoesNotExist,
    OptimisticConcurrencyNotEnabled,
    ProcessorError,
    ReplyTimeout,
    RequestExpired,
    RequestTooLarge,
    ServiceUnreachable,
    TransientError,
    UnexpectedError,
)

__all__ = [
    "FAULT_TYPES",
    "AttributeNotFound",
    "Client",
    "ConcurrencyVersionMismatch",
    "ConcurrencyVersionNotProvided",
    "ConfigError",
    "DeadLetter",
    "DeleteRequest",
    "DuplicateRequest",
    "Engine",
    "EntityMetadata",
    "EntityNotFound",
    "Envelope",
    "ExecuteMultipleRequest",
    "ExecuteTransactionRequest",
    "Fault",
    "FaultDetail",
    "InvalidArgument",
    "Ledger",
    "ObjectDoesNotExist",
    "OptimisticConcurrencyNotEnabled",
    "Outcome",
    "ProcessorError",
    "Registry",
    "Reply",
    "ReplyTimeout",
    "Request",
    "RequestExpired",
    "RequestTooLarge",
    "RetrieveEntityRequest",
    "RetrieveRequest",
    "ServiceContext",
    "ServiceUnreachable",
    "Settings",
    "Source",
    "TransientError",
    "UnexpectedError",
    "UpdateRequest",
    "decode_request",
    "encode_reply",
    "load_registry",
]
