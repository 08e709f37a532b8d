"""Kafka -> PostgreSQL request processor with Dataverse-style optimistic concurrency.

The public API is small: the wire contract, the fault tree, the registry, the engine, the
settings and the producer client (:class:`Client`). Everything else (worker, intake, Kafka
and database plumbing) is reached through the ``processor`` command.
"""

from processor.client import Client
from processor.config import Settings
from processor.contract import (
    DeadLetter,
    DeleteRequest,
    FaultDetail,
    Reply,
    Request,
    RetrieveRequest,
    UpdateRequest,
    decode_request,
    encode_reply,
)
from processor.engine import Engine, Envelope, Outcome, Source
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
from processor.ledger import Ledger
from processor.registry import Registry, load_registry

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
    "EntityNotFound",
    "Envelope",
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
    "RetrieveRequest",
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
