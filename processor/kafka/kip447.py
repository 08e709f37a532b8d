"""KIP-447 for aiokafka: group-fenced transactional offsets and stable offset fetches.

aiokafka 0.14 speaks the transaction protocol of Kafka 0.11. Two pieces of KIP-447
(Kafka 2.5) are what exactly-once with one producer per worker rests on, and this
module adds them at the edge, without forking aiokafka:

* **TxnOffsetCommit v3** carries the consumer's generation id, member id and group
  instance id (:func:`send_offsets_to_transaction`). The group coordinator then refuses
  the offsets of a member that is no longer the partition's owner (a zombie: paused past
  its session, then woken) with ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID or
  FENCED_INSTANCE_ID. v0, which aiokafka sends, carries none of these and is accepted from
  anyone holding the transactional id. Those errors make the transaction abortable (not
  fatal): :class:`GroupFenced` is raised, the caller aborts, and the producer stays usable.
  aiokafka's own abortable-error path forgets the partitions already added to the
  transaction, so its abort ends nothing on the broker and the next transaction would
  silently join the old one; here the abort really sends EndTxn(ABORT).
* **OffsetFetch v7 with require_stable** for every consumer of the process. While a
  transaction holding offsets of a partition is open, the broker answers
  UNSTABLE_OFFSET_COMMIT (error 88, which aiokafka does not know) instead of the offset
  from before that transaction; :class:`UnstableOffsetCommit` is retriable, so aiokafka's
  own loops (``committed()``, the position refresh after an assignment) wait until the
  transaction ends. Each such answer is counted (:data:`counters`) and logged at debug.
  The response's group-level error (OffsetFetch v2+, e.g. COORDINATOR_LOAD_IN_PROGRESS
  after a broker restart) raises too: aiokafka read it as "no committed offset" and a
  new owner started the partition from ``auto_offset_reset``.

The module refuses to import under an aiokafka version it was not written against
(it replaces two aiokafka internals), and :func:`check_broker` refuses a broker that
lacks these versions. Wire formats: apache/kafka's ``TxnOffsetCommitRequest.json``
(v3: flexible, adds GenerationId, MemberId, GroupInstanceId) and
``OffsetFetchRequest.json`` (v7: flexible, adds RequireStable).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import aiokafka
import aiokafka.errors as errors
import aiokafka.producer.sender as _sender
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.producer.transaction_manager import TransactionManager, TransactionState
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.commit import (
    OffsetFetchRequest_v1,
    OffsetFetchRequest_v2,
    OffsetFetchRequest_v3,
)
from aiokafka.protocol.group import HeartbeatRequest
from aiokafka.protocol.transaction import TxnOffsetCommitRequest_v0
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Int64,
    Schema,
    TaggedFields,
)
from aiokafka.structs import OffsetAndMetadata

from processor.errors import ConfigError

__all__ = [
    "GroupFenced",
    "GroupMetadata",
    "UnstableOffsetCommit",
    "check_broker",
    "counters",
    "group_metadata",
    "install",
    "membership_problem",
    "send_offsets_to_transaction",
]

#: The aiokafka versions whose internals (the sender's TxnOffsetCommitHandler, the
#: transaction manager's state, GroupCoordinator._do_fetch_commit_offsets) this module
#: was written and tested against.
SUPPORTED_AIOKAFKA = ("0.14.0",)

if aiokafka.__version__ not in SUPPORTED_AIOKAFKA:  # pragma: no cover - an install problem
    raise ImportError(
        f"processor.kip447 patches aiokafka internals and was written for aiokafka "
        f"{', '.join(SUPPORTED_AIOKAFKA)}; found {aiokafka.__version__}: re-check the patch "
        "against the new version (tests/integration/test_kip447.py) before allowing it"
    )

log = logging.getLogger("processor.kip447")

_TXN_OFFSET_COMMIT = 28
_OFFSET_FETCH = 9
#: Error codes of TxnOffsetCommit v3 that mean "not the owner any more".
_GROUP_FENCED_CODES = {22: "ILLEGAL_GENERATION", 25: "UNKNOWN_MEMBER_ID", 82: "FENCED_INSTANCE_ID"}
_UNSTABLE_OFFSET_COMMIT = 88
#: Group-level OffsetFetch errors after which the coordinator must be looked up again.
_COORDINATOR_MOVED = (errors.NotCoordinatorForGroupError, errors.GroupCoordinatorNotAvailableError)

#: Events counted since start, for metrics: "unstable_offset_fetch", "group_fenced".
counters: collections.Counter[str] = collections.Counter()


class GroupFenced(errors.KafkaError):  # type: ignore[misc]
    """The group refused this member's transactional offsets: it no longer owns them.

    The transaction must be aborted; whoever owns the partitions now redoes the records.
    """

    retriable = False


class UnstableOffsetCommit(errors.KafkaError):  # type: ignore[misc]
    """A transaction holding this partition's offsets is still open: ask again."""

    errno = _UNSTABLE_OFFSET_COMMIT
    message = "UNSTABLE_OFFSET_COMMIT"
    retriable = True


@dataclass(frozen=True, slots=True)
class GroupMetadata:
    """Who commits: Java's ``ConsumerGroupMetadata``. Take it when a batch is fetched."""

    group_id: str
    generation_id: int
    member_id: str
    group_instance_id: str | None = None

    @property
    def is_member(self) -> bool:
        """In a group generation: aiokafka resets both after a refused heartbeat."""
        return self.generation_id >= 0 and bool(self.member_id)


def group_metadata(consumer: AIOKafkaConsumer) -> GroupMetadata:
    """The consumer's current membership (generation -1 and no member id outside a group)."""
    coordinator = consumer._coordinator
    if coordinator is None or not hasattr(coordinator, "generation"):
        raise RuntimeError("the consumer is not in a group (started, with a group_id?)")
    return GroupMetadata(
        group_id=coordinator.group_id,
        generation_id=coordinator.generation,
        member_id=coordinator.member_id,
        group_instance_id=coordinator._group_instance_id,
    )


async def membership_problem(consumer: AIOKafkaConsumer) -> str | None:
    """Why this consumer is not (or no longer) a current member of its group, or None.

    One Heartbeat with the consumer's generation and member id, answered by the group
    coordinator. For a worker that was stalled (paused, starved) longer than a heartbeat
    interval: before it applies records fetched before the stall, it asks whether it still
    owns them. aiokafka's own heartbeat task finds out too, but later and not in order with
    the worker's loop.
    """
    group = group_metadata(consumer)
    if not group.is_member:
        return "not in the group"
    coordinator = consumer._coordinator
    try:
        response = await coordinator._send_req(
            HeartbeatRequest(group.group_id, group.generation_id, group.member_id)
        )
    except errors.KafkaError as exc:
        return f"the group coordinator did not answer ({exc!r})"
    if response.error_code:
        name: str = errors.for_code(response.error_code).__name__
        return name
    return None


async def send_offsets_to_transaction(
    producer: AIOKafkaProducer,
    offsets: Mapping[TopicPartition, int],
    group: GroupMetadata,
    *,
    unfenced: bool = False,
) -> None:
    """``producer.send_offsets_to_transaction`` with the group's generation (v3).

    Raises :class:`GroupFenced` when the group refuses them; then abort the transaction.
    Also, without asking, for a membership with no generation or no member id: the group
    coordinator validates a TxnOffsetCommit only if it names a member, and accepts one
    with generation -1 and an empty member id from anyone (what v0 clients send). aiokafka
    puts its consumer in exactly that state when a heartbeat is refused (a zombie waking,
    a coordinator restarted) and keeps the old assignment until the rejoin: offsets of
    records fetched then would overwrite the new owner's, unchecked. ``unfenced=True``
    sends such offsets on purpose (a tool committing outside group management).
    """
    if not group.is_member and not unfenced:
        counters["group_fenced"] += 1
        raise GroupFenced(
            f"not a member of group {group.group_id!r} (generation {group.generation_id}, "
            f"member id {group.member_id!r}): its offsets would be accepted unchecked"
        )
    install()
    producer._txn_manager.processor_group = group
    await producer.send_offsets_to_transaction(dict(offsets), group.group_id)


# -- TxnOffsetCommit v3 ----------------------------------------------------------------


class TxnOffsetCommitResponseV3(Response):  # type: ignore[misc]
    API_KEY = _TXN_OFFSET_COMMIT
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "errors",
            CompactArray(
                ("topic", CompactString("utf-8")),
                (
                    "partition_errors",
                    CompactArray(
                        ("partition", Int32), ("error_code", Int16), ("tags", TaggedFields)
                    ),
                ),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class TxnOffsetCommitRequestV3(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = _TXN_OFFSET_COMMIT
    API_VERSION = 3
    RESPONSE_TYPE = TxnOffsetCommitResponseV3
    SCHEMA = Schema(
        ("transactional_id", CompactString("utf-8")),
        ("group_id", CompactString("utf-8")),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("generation_id", Int32),
        ("member_id", CompactString("utf-8")),
        ("group_instance_id", CompactString("utf-8")),
        (
            "topics",
            CompactArray(
                ("topic", CompactString("utf-8")),
                (
                    "partitions",
                    CompactArray(
                        ("partition", Int32),
                        ("offset", Int64),
                        ("leader_epoch", Int32),
                        ("metadata", CompactString("utf-8")),
                        ("tags", TaggedFields),
                    ),
                ),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


_TxnStruct: TypeAlias = TxnOffsetCommitRequest_v0 | TxnOffsetCommitRequestV3


class _TxnOffsetCommitRequest(Request[_TxnStruct]):  # type: ignore[misc]
    API_KEY = _TXN_OFFSET_COMMIT

    def __init__(
        self,
        txn: TransactionManager,
        group: GroupMetadata,
        offsets: Mapping[TopicPartition, OffsetAndMetadata],
    ) -> None:
        self._txn = txn
        self._group = group
        self._offsets = offsets

    def build(self, request_struct_class: type[_TxnStruct]) -> _TxnStruct:
        by_topic: dict[str, list[tuple[int, OffsetAndMetadata]]] = collections.defaultdict(list)
        for tp, offset in sorted(self._offsets.items()):
            by_topic[tp.topic].append((tp.partition, offset))
        txn, group = self._txn, self._group
        if request_struct_class is TxnOffsetCommitRequest_v0:
            # check_broker refuses such brokers for the worker; kept for other producers.
            topics0 = [
                (t, [(p, o.offset, o.metadata) for p, o in ps]) for t, ps in by_topic.items()
            ]
            return TxnOffsetCommitRequest_v0(
                txn.transactional_id, group.group_id, txn.producer_id, txn.producer_epoch, topics0
            )
        topics: list[Any] = [
            (t, [(p, o.offset, -1, o.metadata, {}) for p, o in ps], {})
            for t, ps in by_topic.items()
        ]
        return TxnOffsetCommitRequestV3(
            txn.transactional_id,
            group.group_id,
            txn.producer_id,
            txn.producer_epoch,
            group.generation_id,
            group.member_id,
            group.group_instance_id,
            topics,
            {},
        )


def _abortable(txn: TransactionManager, exc: BaseException) -> None:
    """aiokafka's ``error_transaction`` without forgetting what the transaction holds.

    ``error_transaction`` clears the partitions and the group already added, so the
    following abort looks empty and sends no EndTxn: the broker keeps the transaction
    open (its records pending) and the next transaction joins it. Keeping them makes
    the abort real.
    """
    txn._transition_to(TransactionState.ABORTABLE_ERROR)
    for _, _, fut in txn._pending_txn_offsets:
        if not fut.done():
            fut.set_exception(exc)
    txn._pending_txn_offsets.clear()
    waiter = txn._transaction_waiter
    if waiter is not None and not waiter.done():
        waiter.set_exception(exc)
        waiter.exception()  # retrieved here: the caller gets exc from its offsets future


class _TxnOffsetCommitHandler(_sender.TxnOffsetCommitHandler):  # type: ignore[misc]
    """aiokafka's handler, sending v3 with the group's generation and handling its errors."""

    def create_request(self) -> _TxnOffsetCommitRequest:
        txn = self._sender._txn_manager
        group = getattr(txn, "processor_group", None)
        if group is None or group.group_id != self._group_id:
            group = GroupMetadata(self._group_id, -1, "")  # v0's meaning: no fencing
        return _TxnOffsetCommitRequest(txn, group, self._offsets)

    def handle_response(self, resp: Any) -> float | None:
        txn = self._sender._txn_manager
        answers = [
            (TopicPartition(topic, partition), code)
            for topic, partitions, *_ in resp.errors  # v3 adds tagged fields: ignored
            for partition, code, *_ in partitions
        ]
        # Fencing first: no partition is marked committed in a transaction to be aborted.
        for tp, code in answers:
            name = _GROUP_FENCED_CODES.get(code)
            if name is not None:
                counters["group_fenced"] += 1
                _abortable(
                    txn,
                    GroupFenced(
                        f"{name}: group {self._group_id!r} refused the offset of {tp.topic}-"
                        f"{tp.partition}: this member does not own it (any more)"
                    ),
                )
                return None
        for tp, code in answers:
            error_type = errors.for_code(code)
            if error_type is errors.NoError:
                txn.offset_committed(tp, self._offsets[tp].offset, self._group_id)
            elif error_type in (
                errors.CoordinatorNotAvailableError,
                errors.NotCoordinatorError,
                errors.RequestTimedOutError,
            ):
                self._sender._coordinator_dead(_sender.CoordinationType.GROUP)
                return float(self._default_backoff)
            elif error_type in (
                errors.CoordinatorLoadInProgressError,
                errors.UnknownTopicOrPartitionError,
            ):
                return float(self._default_backoff)
            elif error_type is errors.ConcurrentTransactions:
                return float(_sender.BACKOFF_OVERRIDE)  # the previous EndTxn's markers
            elif error_type is errors.InvalidProducerEpoch:
                raise errors.ProducerFenced()
            elif error_type is errors.TransactionalIdAuthorizationFailed:
                raise error_type(txn.transactional_id)
            elif error_type is errors.GroupAuthorizationFailedError:
                _abortable(txn, error_type(self._group_id))
                return None
            else:
                raise error_type()
        return None


# -- OffsetFetch v7, require_stable -------------------------------------------------------


class OffsetFetchResponseV7(Response):  # type: ignore[misc]
    API_KEY = _OFFSET_FETCH
    API_VERSION = 7
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "topics",
            CompactArray(
                ("topic", CompactString("utf-8")),
                (
                    "partitions",
                    CompactArray(
                        ("partition", Int32),
                        ("offset", Int64),
                        ("leader_epoch", Int32),
                        ("metadata", CompactString("utf-8")),
                        ("error_code", Int16),
                        ("tags", TaggedFields),
                    ),
                ),
                ("tags", TaggedFields),
            ),
        ),
        ("error_code", Int16),
        ("tags", TaggedFields),
    )


class OffsetFetchRequestV7(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = _OFFSET_FETCH
    API_VERSION = 7
    RESPONSE_TYPE = OffsetFetchResponseV7
    SCHEMA = Schema(
        ("group_id", CompactString("utf-8")),
        (
            "topics",
            CompactArray(
                ("topic", CompactString("utf-8")),
                ("partitions", CompactArray(Int32)),
                ("tags", TaggedFields),
            ),
        ),
        ("require_stable", Boolean),
        ("tags", TaggedFields),
    )


_FetchStruct: TypeAlias = (
    OffsetFetchRequest_v1 | OffsetFetchRequest_v2 | OffsetFetchRequest_v3 | OffsetFetchRequestV7
)


class _StableOffsetFetchRequest(Request[_FetchStruct]):  # type: ignore[misc]
    API_KEY = _OFFSET_FETCH

    def __init__(self, group_id: str, partitions: list[tuple[str, list[int]]]) -> None:
        self._group_id = group_id
        self._partitions = partitions

    def build(self, request_struct_class: type[_FetchStruct]) -> _FetchStruct:
        if request_struct_class is OffsetFetchRequestV7:
            topics: list[Any] = [(t, ps, {}) for t, ps in self._partitions]
            return OffsetFetchRequestV7(self._group_id, topics, True, {})
        return request_struct_class(self._group_id, self._partitions)


async def _do_fetch_commit_offsets(
    self: GroupCoordinator, partitions: list[TopicPartition]
) -> dict[TopicPartition, OffsetAndMetadata]:
    """aiokafka's ``_do_fetch_commit_offsets``, with require_stable and group-level errors."""
    by_topic: dict[str, list[int]] = collections.defaultdict(list)
    for tp in partitions:
        by_topic[tp.topic].append(tp.partition)
    response = await self._send_req(
        _StableOffsetFetchRequest(self.group_id, list(by_topic.items()))
    )
    code = getattr(response, "error_code", 0)  # absent before v2
    if code:
        error_type = errors.for_code(code)
        if issubclass(error_type, _COORDINATOR_MOVED):
            self.coordinator_dead()
        raise error_type()
    offsets: dict[TopicPartition, OffsetAndMetadata] = {}
    for topic, topic_partitions, *_ in response.topics:
        for partition, offset, *rest in topic_partitions:
            # v1-v3: (metadata, error_code); v7: (leader_epoch, metadata, error_code, tags)
            metadata, error_code = (rest[0], rest[1]) if len(rest) == 2 else (rest[1], rest[2])
            tp = TopicPartition(topic, partition)
            if error_code == _UNSTABLE_OFFSET_COMMIT:
                counters["unstable_offset_fetch"] += 1
                log.debug("offset of %s is unstable (a transaction is open): retrying", tp)
                raise UnstableOffsetCommit(f"{tp}: a transaction holding its offset is open")
            if error_code:
                error_type = errors.for_code(error_code)
                if error_type is errors.GroupLoadInProgressError:
                    raise error_type()
                if error_type is errors.NotCoordinatorForGroupError:
                    self.coordinator_dead()
                    raise error_type()
                if error_type is errors.UnknownTopicOrPartitionError:
                    continue
                if error_type is errors.GroupAuthorizationFailedError:
                    raise error_type(self.group_id)
                raise errors.KafkaError(f"fetching the offset of {tp}: {error_type.__name__}")
            if offset != -1:
                offsets[tp] = OffsetAndMetadata(offset, metadata or "")
    return offsets


# -- installing and checking ---------------------------------------------------------------


def install() -> None:
    """Patch aiokafka (idempotent; every client of the process)."""
    _sender.TxnOffsetCommitHandler = _TxnOffsetCommitHandler
    GroupCoordinator._do_fetch_commit_offsets = _do_fetch_commit_offsets


#: API key -> (name, the version this module needs at least).
REQUIRED_VERSIONS: Mapping[int, tuple[str, int]] = {
    _TXN_OFFSET_COMMIT: ("TxnOffsetCommit", 3),
    _OFFSET_FETCH: ("OffsetFetch", 7),
}


def broker_problem(versions: Mapping[int, tuple[int, int]]) -> str | None:
    """What a broker with these API versions (key -> (min, max)) lacks, or None."""
    missing = [
        f"{name} v{need} (it offers {versions[key][1] if key in versions else 'none'})"
        for key, (name, need) in REQUIRED_VERSIONS.items()
        if key not in versions or not versions[key][0] <= need <= versions[key][1]
    ]
    if not missing:
        return None
    return (
        "the Kafka broker is too old for exactly-once with group fencing (KIP-447, "
        f"Kafka >= 2.5): it lacks {', '.join(missing)}"
    )


async def check_broker(client: Any) -> None:
    """Raise :class:`ConfigError` unless the brokers speak what this module sends.

    ``client`` is a started producer's or consumer's ``AIOKafkaClient``.
    """
    install()
    for broker in client.cluster.brokers():
        conn = await client._get_conn(broker.nodeId)
        if conn is None:
            continue  # unreachable now: the clients retry; another broker answers
        problem = broker_problem(conn._versions)
        if problem is not None:
            raise ConfigError(f"broker {broker.host}:{broker.port}: {problem}")
