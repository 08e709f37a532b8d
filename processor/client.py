"""An async client for producer services: send a request, await its reply, typed.

::

    async with Client("127.0.0.1:19092") as client:
        row = await client.retrieve("counter", 1)
        await client.update("counter", 1, {"n": 2}, row_version=row.row_version)
        await client.read_modify_write("counter", 1, lambda a: {"n": a["n"] + 1})

The first argument is a bootstrap list (plaintext) or a :class:`~processor.kafka.KafkaAccess`
(TLS, SASL), e.g. ``Settings.from_env(os.environ).kafka_access()``: the same
``KAFKA_*`` variables as the workers (docs/security-kafka.md).

Each call returns the success :class:`~processor.contract.Reply` or raises the fault's
type from :mod:`processor.errors` (``FAULT_TYPES[code]``, with ``expected_version``,
``current_version``, ``path`` and the reply as ``exc.reply``); a code this version does not
know raises :class:`~processor.errors.UnexpectedError`. No reply in time raises
:class:`~processor.errors.ReplyTimeout`: the outcome is unknown, and resending the same
request (``exc.request``, or the same ``request_id``) is safe, since the workers' ledger
answers a known request_id with its stored reply and applies nothing again.

One client serves any number of concurrent callers: one producer, and one reply consumer
(``read_committed``, from the reply topic's end) that hands each reply to the caller
waiting for its ``request_id``. Every request is stamped with ``reply_to`` = the client's
``reply_topic``. Which partitions of it the client reads:

- by default all of them (every client reads every reply: fine for a few instances);
- ``reply_partitions=[3]``: only those; each request is stamped with one of them
  (``reply_partition``), so the workers publish its reply there;
- ``reply_group="billing"``: the partitions the client's own consumer group on the reply
  topic assigns it (one group per service: its instances share the topic's partitions).
  ``start()`` returns once the client owns partitions, so no reply can be published to a
  partition nobody reads yet. When the group rebalances, each request whose reply
  partition moved to another instance is resent with the same request_id to a partition
  the client now owns: the workers' ledger answers it with the stored reply (published to
  the new partition) and applies nothing again.

An instance reading only its own partitions reads ~1/N of the replies of N instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self, TypeAlias

import msgspec
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError

from processor.contract import (
    Behavior,
    Reply,
    Request,
    decode_reply,
    request_key,
)
from processor.errors import (
    ConfigError,
    ProcessorError,
    ReplyTimeout,
    TransientError,
)
from processor.kafka import clients as kafka
from processor.log import get_logger
from processor.requests import RequestMethods, fault_of, new_request_id, raise_for_fault

if TYPE_CHECKING:
    from processor.context import ServiceContext

__all__ = ["Client", "Observer", "fault_of", "new_request_id", "raise_for_fault"]

#: Called once per request sent: (request, its reply or None if none came, seconds taken).
Observer: TypeAlias = Callable[[Request, Reply | None, float], None]

log = get_logger("processor.client")
_encoder: Final = msgspec.json.Encoder()


class Waiters:
    """The futures of the callers awaiting a reply, by request_id (one id may have several)."""

    def __init__(self) -> None:
        self._by_id: dict[str, list[asyncio.Future[Reply]]] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, rid: str) -> bool:
        return rid in self._by_id

    def add(self, rid: str) -> asyncio.Future[Reply]:
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._by_id.setdefault(rid, []).append(future)
        return future

    def forget(self, rid: str, future: asyncio.Future[Reply]) -> None:
        waiters = self._by_id.get(rid)
        if waiters is not None:
            with contextlib.suppress(ValueError):
                waiters.remove(future)
            if not waiters:
                del self._by_id[rid]
        future.cancel()

    def deliver(self, reply: Reply) -> None:
        for future in self._by_id.pop(reply.request_id, ()):
            if not future.done():
                future.set_result(reply)

    def fail_all(self, error: ProcessorError) -> None:
        for waiters in self._by_id.values():
            for future in waiters:
                if not future.done():
                    future.set_exception(error)
        self._by_id.clear()


# Over the ~250-line budget on purpose: one object owns the producer, the reply consumer
# and the reply-partition state that a rebalance changes (owned, sent, resent,
# start_positions, all read by tools and tests); split further, that state would be shared
# between objects and forwarded. The callers' futures are apart (Waiters), and so are the
# request types (requests.py).
class Client(RequestMethods):
    """Requests to the workers and their replies; use ``async with`` (or start/close)."""

    def __init__(
        self,
        bootstrap: str | kafka.KafkaAccess,
        *,
        request_topic: str = "requests",
        reply_topic: str = "replies",
        timeout: float = 30.0,
        observer: Observer | None = None,
        reply_partitions: Sequence[int] | None = None,
        reply_group: str | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if reply_partitions is not None and reply_group is not None:
            raise ValueError("reply_partitions and reply_group exclude each other")
        if reply_partitions is not None and (
            not reply_partitions
            or any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in reply_partitions)
        ):
            raise ValueError(
                f"reply_partitions must be partition numbers, got {reply_partitions!r}"
            )
        if reply_group is not None and not reply_group:
            raise ValueError("reply_group must not be empty")
        #: Fixed reply partitions (None: all of them, or the group's assignment).
        self.reply_partitions = sorted(set(reply_partitions)) if reply_partitions else None
        self.reply_group = reply_group
        #: How the client reaches the brokers (a plain string: PLAINTEXT to that list).
        self.access = (
            bootstrap if isinstance(bootstrap, kafka.KafkaAccess) else kafka.KafkaAccess(bootstrap)
        )
        self.bootstrap = self.access.bootstrap
        self.request_topic = request_topic
        self.reply_topic = reply_topic
        self.timeout = timeout
        #: Called after every request sent (settable, e.g. by the load test).
        self.observer = observer
        #: The reply topic's (read_committed) end when the client started, per partition:
        #: every reply to a request sent by this client comes after it.
        self.start_positions: dict[TopicPartition, int] = {}
        self._producer: Any = None
        self._consumer: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._pending = Waiters()
        self._broken: ProcessorError | None = None
        #: The reply partitions this client reads now.
        self.owned: frozenset[int] = frozenset()
        self._owns = asyncio.Event()  # set while ``owned`` is not empty
        #: Requests awaiting a reply as last sent (stamped), by request_id: resent when
        #: their reply partition moves to another member of the group.
        self._sent: dict[str, Request] = {}
        self._turn = 0
        self._background: set[asyncio.Task[None]] = set()
        #: Reply records this client has read (its own and others'), and requests resent
        #: after a rebalance moved their reply partition.
        self.replies_read = 0
        self.resent = 0

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def pending(self) -> int:
        """Request ids awaiting a reply (for tests and metrics)."""
        return len(self._pending)

    async def start(self) -> None:
        """Start the producer and the reply consumer, positioned at the reply topic's end.

        Returns only once every reply partition's position is resolved, so no reply to a
        request sent afterwards can be missed.
        """
        if self._producer is not None:
            raise RuntimeError("client already started")
        producer = kafka.make_producer(self.access)
        consumer = kafka.make_consumer(self.access, self.reply_group, auto_offset_reset="latest")
        try:
            await asyncio.wait_for(producer.start(), kafka.CALL_TIMEOUT)
            await _partitions(producer, self.request_topic)
            existing = sorted(await _partitions(producer, self.reply_topic))
            missing = sorted(set(self.reply_partitions or ()) - set(existing))
            if missing:
                raise ConfigError(
                    f"reply_partitions {missing} do not exist: topic {self.reply_topic!r} has "
                    f"{len(existing)} partitions"
                )
            if self.reply_group is not None:
                self._producer, self._consumer = producer, consumer
                consumer.subscribe([self.reply_topic], listener=_ReplyRebalance(self))
                await asyncio.wait_for(consumer.start(), kafka.CALL_TIMEOUT)
                # The group assigns partitions in the background; a reader must poll.
                self._reader = asyncio.create_task(self._read(), name="processor-client-replies")
                await self._await_partitions()
                return
            await asyncio.wait_for(consumer.start(), kafka.CALL_TIMEOUT)
            parts = self.reply_partitions or existing
            tps = [TopicPartition(self.reply_topic, p) for p in parts]
            consumer.assign(tps)
            await asyncio.wait_for(consumer.seek_to_end(*tps), kafka.CALL_TIMEOUT)
            positions = {
                tp: await asyncio.wait_for(consumer.position(tp), kafka.CALL_TIMEOUT) for tp in tps
            }
        except KafkaConnectionError as exc:  # aiokafka logs the cause, raises "Unable to ..."
            await self._abort_start(producer, consumer)
            raise await kafka.explain_unreachable(self.access, exc) from exc
        except BaseException:
            await self._abort_start(producer, consumer)
            raise
        self._producer, self._consumer = producer, consumer
        self.start_positions = positions
        self.owned = frozenset(parts)
        self._owns.set()
        self._reader = asyncio.create_task(self._read(), name="processor-client-replies")

    async def _abort_start(self, producer: Any, consumer: Any) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        self._producer = self._consumer = None
        await _stop(producer, consumer)

    async def _await_partitions(self) -> None:
        """Until the group gave this client reply partitions (read from their end)."""
        try:
            async with asyncio.timeout(max(self.timeout, 30.0)):
                await self._owns.wait()
        except TimeoutError:
            raise ConfigError(
                f"reply group {self.reply_group!r} assigned no partition of "
                f"{self.reply_topic!r} in {max(self.timeout, 30.0):g} s (more instances "
                "than partitions?)"
            ) from None

    async def adopt(self, assigned: Sequence[TopicPartition]) -> None:
        """The group's new assignment: read it from its end, then resend what moved."""
        tps = [tp for tp in assigned if tp.topic == self.reply_topic]
        consumer = self._consumer
        if consumer is None:
            return
        if tps:
            await asyncio.wait_for(consumer.seek_to_end(*tps), kafka.CALL_TIMEOUT)
            for tp in tps:
                self.start_positions[tp] = await asyncio.wait_for(
                    consumer.position(tp), kafka.CALL_TIMEOUT
                )
        self.owned = frozenset(tp.partition for tp in tps)
        log.info("reply partitions assigned", partitions=sorted(self.owned))
        if self.owned:
            self._owns.set()
            self._resend_moved()

    def revoke(self) -> None:
        self.owned = frozenset()
        self._owns.clear()

    def _resend_moved(self) -> None:
        for rid, request in list(self._sent.items()):
            if request.reply_partition is None or request.reply_partition in self.owned:
                continue
            moved = msgspec.structs.replace(request, reply_partition=self._pick())
            self._sent[rid] = moved
            self.resent += 1
            task = asyncio.create_task(self._resend(moved), name=f"resend-{rid}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _resend(self, request: Request) -> None:
        try:
            await self._produce(request, _headers(request.request_id, None))
        except (KafkaError, TimeoutError) as exc:  # the caller's timeout reports it
            log.warning("resend failed", request_id=request.request_id, error=repr(exc))

    def _pick(self) -> int:
        owned = sorted(self.owned)
        self._turn += 1
        return owned[self._turn % len(owned)]

    async def _produce(self, request: Request, headers: list[tuple[str, bytes]]) -> None:
        await self._producer.send_and_wait(
            self.request_topic, _encoder.encode(request), key=request_key(request), headers=headers
        )

    async def close(self) -> None:
        """Stop reading replies (waiting callers get a ProcessorError) and the clients."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        self._pending.fail_all(ProcessorError("client closed"))
        for task in list(self._background):
            task.cancel()
        await _stop(self._producer, self._consumer)
        self._producer = self._consumer = None

    async def send(
        self, request: Request, *, timeout: float | None = None, traceparent: str | None = None
    ) -> Reply:
        """Send one request and return its reply, success or fault (no exception for those).

        Raises :class:`ReplyTimeout` when no reply came within ``timeout`` (the client's
        by default), :class:`TransientError` when Kafka refused the request.
        """
        self._check_usable()
        if request.reply_to not in (None, self.reply_topic):
            raise ValueError(f"this client reads replies on {self.reply_topic!r} only")
        if request.reply_partition is not None and (
            self.reply_partitions is None and self.reply_group is None
        ):
            raise ValueError("reply_partition is the client's to stamp (reply_partitions=...)")
        limit = self.timeout if timeout is None else timeout
        rid = request.request_id
        headers = _headers(rid, traceparent)
        future = self._pending.add(rid)  # before sending: a reply can be fast
        started = time.monotonic()
        reply: Reply | None = None
        try:
            async with asyncio.timeout(limit):
                request = await self._stamped(request)
                self._sent[rid] = request
                await self._produce(request, headers)
                reply = await future
        except TimeoutError:
            raise ReplyTimeout(request, limit) from None
        except KafkaError as exc:
            raise TransientError(f"cannot send {rid!r} (resending it is safe): {exc!r}") from exc
        finally:
            self._pending.forget(rid, future)
            if rid not in self._pending:
                self._sent.pop(rid, None)
            if self.observer is not None:
                self.observer(request, reply, time.monotonic() - started)
        return reply

    async def send_raw(
        self,
        value: bytes,
        *,
        request_id: str,
        key: bytes | None = None,
        timeout: float | None = None,
        traceparent: str | None = None,
    ) -> Reply | None:
        """Send ``value`` unchecked, with the ``request_id`` header; its reply, or None when
        none came within ``timeout`` (the outcome is unknown, as for :class:`ReplyTimeout`).

        For tools that want the workers' own verdict on any input (``processor send
        --no-validate``): a reply comes when a worker can read the request_id (from the
        body, or from the header). Nothing is stamped: the reply goes where the value says
        (the workers' default reply topic if it names none), so read that topic.
        """
        self._check_usable()
        limit = self.timeout if timeout is None else timeout
        headers = _headers(request_id, traceparent)
        future = self._pending.add(request_id)
        try:
            async with asyncio.timeout(limit):
                await self._producer.send_and_wait(
                    self.request_topic, value, key=key, headers=headers
                )
                return await future
        except TimeoutError:
            return None
        except KafkaError as exc:
            raise TransientError(f"cannot send {request_id!r}: {exc!r}") from exc
        finally:
            self._pending.forget(request_id, future)

    def _check_usable(self) -> None:
        if self._producer is None:
            raise RuntimeError("client not started (use `async with Client(...)`)")
        if self._broken is not None:
            raise self._broken

    def context(
        self, concurrency_behavior: Behavior = "Default", *, continue_on_error: bool = False
    ) -> ServiceContext:
        """A :class:`~processor.context.ServiceContext` (Dataverse's
        OrganizationServiceContext) on this client: retrieve, record changes, save them."""
        from processor.context import ServiceContext

        return ServiceContext(
            self, concurrency_behavior=concurrency_behavior, continue_on_error=continue_on_error
        )

    async def _stamped(self, request: Request) -> Request:
        """The request with this client's reply topic, and one of its reply partitions."""
        fields: dict[str, Any] = {}
        if request.reply_to is None:
            fields["reply_to"] = self.reply_topic
        if self.reply_group is not None or self.reply_partitions is not None:
            await self._owns.wait()  # a rebalance in progress: until partitions come back
            if request.reply_partition not in self.owned:
                fields["reply_partition"] = self._pick()
        return msgspec.structs.replace(request, **fields) if fields else request

    async def _read(self) -> None:
        try:
            while True:
                try:
                    batch = await self._consumer.getmany(timeout_ms=1000)
                except KafkaError as exc:  # the consumer reconnects by itself
                    log.warning("reply consumer error", error=repr(exc))
                    await asyncio.sleep(0.5)
                    continue
                for records in batch.values():
                    self.replies_read += len(records)
                    for record in records:
                        self._deliver(record.headers, record.value)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("reply consumer failed")
            self._broken = ProcessorError(f"the client's reply consumer failed: {exc!r}")
            self._pending.fail_all(self._broken)

    def _deliver(self, headers: Sequence[tuple[str, bytes]], value: bytes | None) -> None:
        for key, raw in headers:
            # Not ours (the topic is shared): skip without decoding.
            if key == "request_id" and raw and raw.decode(errors="replace") not in self._pending:
                return
        if value is None:
            return
        try:
            reply = decode_reply(value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        self._pending.deliver(reply)


class _ReplyRebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, client: Client) -> None:
        self._client = client

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self._client.revoke()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self._client.adopt(assigned)


def _headers(request_id: str, traceparent: str | None) -> list[tuple[str, bytes]]:
    headers = [("request_id", request_id.encode())]
    if traceparent:
        headers.append(("traceparent", traceparent.encode()))
    return headers


async def _partitions(producer: Any, topic: str) -> set[int]:
    try:  # all topics' metadata: a missing topic is known at once, without waiting
        cluster = await asyncio.wait_for(producer.client.fetch_all_metadata(), kafka.CALL_TIMEOUT)
        if not cluster.partitions_for_topic(topic):
            raise ConfigError(f"topic {topic!r} does not exist")
        parts: set[int] = await asyncio.wait_for(producer.partitions_for(topic), kafka.CALL_TIMEOUT)
    except (KafkaError, TimeoutError) as exc:
        raise ConfigError(f"topic {topic!r} is not available: {exc!r}") from exc
    return parts


async def _stop(*clients: Any) -> None:
    for client in clients:
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.stop(), kafka.CALL_TIMEOUT)
