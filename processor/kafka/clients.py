"""Kafka clients with safe settings, and the topics the processor needs.

aiokafka's defaults are unsafe for this product (auto-commit, read_uncommitted, no
idempotence); every client is made here so that no call site can forget an override.
Every factory takes a :class:`KafkaAccess` first: the bootstrap list and the security
options (TLS, SASL), so that no client can forget those either.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import aiokafka.errors as errors
import aiokafka.producer.sender as _aiokafka_sender
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import TopicAlreadyExistsError

from processor.errors import ConfigError, ProcessorError, ServiceUnreachable
from processor.kafka import kip447
from processor.kafka.access import KafkaAccess, Secret, ssl_reason

__all__ = [
    "KafkaAccess",
    "Secret",
    "admin_client",
    "check_access",
    "ensure_topics",
    "explain_unreachable",
    "find_problem",
    "group_offsets",
    "is_transient",
    "make_consumer",
    "make_producer",
    "offsets",
    "read_spans",
    "topic_partitions",
    "transactional_id",
]

#: Bound on any single client call that could otherwise hang while a broker is down.
CALL_TIMEOUT = 30.0

#: How long aiokafka waits before it retries adding the first partition to a transaction
#: that the broker refused with CONCURRENT_TRANSACTIONS because the previous transaction's
#: markers are still being written (KAFKA-5477). aiokafka hard-codes 20 ms; a worker runs
#: its transactions back to back, so batches paid it often. The markers take 1-2 ms on
#: a local broker: retry after 2 ms.
TXN_RETRY_BACKOFF = 0.002
#: retry_backoff_ms of the transactional producers (aiokafka's default: 100). The broker's
#: transaction verification (KIP-890) answers a TxnOffsetCommit that races the previous
#: transaction's completion with COORDINATOR_NOT_AVAILABLE (its code for
#: CONCURRENT_TRANSACTIONS to old clients), and a produce with NOT_ENOUGH_REPLICAS; both
#: are retried after this backoff. ops/bench measured ~10% of partition commits paying
#: 100 ms this way, most batches (6 partitions) with at least one.
TXN_RETRY_BACKOFF_MS = 10


def is_transient(exc: BaseException) -> bool:
    """Whether a Kafka client call that raised ``exc`` is worth another try."""
    return isinstance(exc, errors.KafkaError | TimeoutError | OSError)


#: transaction.timeout.ms of the worker's producer: how long the broker lets a transaction
#: stay open before aborting it. It bounds how long the partitions of a worker that died
#: mid-commit (and is not restarted under the same id) stay blocked: their new owners'
#: stable offset fetches wait for that transaction, and so do read_committed readers of
#: the reply topic. A batch's transaction lasts milliseconds (a broker failover: seconds);
#: 10 s is Kafka Streams' choice for exactly-once too, and equals the session timeout,
#: the time the group needs to notice a dead member anyway.
TRANSACTION_TIMEOUT_MS = 10_000


def transactional_id(group_id: str, worker_id: str) -> str:
    """One id per worker, the same across its restarts: a restart aborts its own open
    transaction at once (InitProducerId) instead of leaving it to the timeout."""
    return f"{group_id}-{worker_id}"


def make_consumer(access: KafkaAccess, group_id: str | None, **extra: Any) -> AIOKafkaConsumer:
    kip447.install()  # stable committed offsets; never "none" while the coordinator loads
    settings: dict[str, Any] = {
        **access.client_options(),
        "group_id": group_id,
        "enable_auto_commit": False,
        "isolation_level": "read_committed",
        "auto_offset_reset": "earliest",
        "max_poll_interval_ms": 300_000,
        "session_timeout_ms": 10_000,
        "heartbeat_interval_ms": 3_000,
        "max_partition_fetch_bytes": 1_048_576,
        "fetch_max_bytes": 16 * 1_048_576,
        "request_timeout_ms": 40_000,
    }
    settings.update(extra)
    return AIOKafkaConsumer(**settings)


def make_producer(
    access: KafkaAccess, *, txn_id: str | None = None, **extra: Any
) -> AIOKafkaProducer:
    settings: dict[str, Any] = {
        **access.client_options(),
        "enable_idempotence": True,
        "acks": "all",
        "linger_ms": 2,
        "request_timeout_ms": 30_000,
    }
    if txn_id is not None:
        kip447.install()  # TxnOffsetCommit v3: offsets fenced by the group's generation
        _aiokafka_sender.BACKOFF_OVERRIDE = TXN_RETRY_BACKOFF
        settings["transactional_id"] = txn_id
        settings["transaction_timeout_ms"] = TRANSACTION_TIMEOUT_MS
        settings["retry_backoff_ms"] = TXN_RETRY_BACKOFF_MS
    settings.update(extra)
    return AIOKafkaProducer(**settings)


#: A read that gets no record and no nearer its end for this long has stalled.
STALL_SECONDS = 60.0


async def read_spans(
    consumer: AIOKafkaConsumer,
    topic: str,
    spans: Mapping[int, tuple[int, int]],
    handle: Callable[[Any], None],
    *,
    progress: Callable[[int, int], None] | None = None,
    stall_seconds: float = STALL_SECONDS,
) -> None:
    """Every record of ``topic`` in ``spans`` ([start, end) offsets per partition) to
    ``handle``, in offset order per partition: the one way the tools read a topic to its end.

    ``consumer`` is started and has no group (it is assigned the partitions). With
    read_committed an end taken from ``end_offsets`` is the last stable offset, reached
    through aborted records too. ``progress(done, total)`` after each batch. Raises
    ProcessorError when ``stall_seconds`` pass without a record or a partition reaching
    its end.
    """
    todo = {p: span for p, span in spans.items() if span[0] < span[1]}
    if not todo:
        return
    tps = {p: TopicPartition(topic, p) for p in todo}
    consumer.assign(list(tps.values()))
    for p, tp in tps.items():
        consumer.seek(tp, todo[p][0])
    total = sum(end - start for start, end in todo.values())
    remaining = set(todo)
    stalled_since = time.monotonic()
    while remaining:
        batch = await consumer.getmany(
            *(tps[p] for p in remaining), timeout_ms=500, max_records=5000
        )
        for tp, records in batch.items():
            end = todo[tp.partition][1]
            for record in records:
                if record.offset >= end:
                    break
                handle(record)
        moved = False
        done = 0
        for p in list(todo):
            position = await consumer.position(tps[p]) if p in remaining else todo[p][1]
            done += min(position, todo[p][1]) - todo[p][0]
            if p in remaining and position >= todo[p][1]:
                remaining.discard(p)
                consumer.pause(tps[p])
                moved = True
        if batch or moved:
            stalled_since = time.monotonic()
        elif time.monotonic() - stalled_since > stall_seconds:
            raise ProcessorError(
                f"reading {topic} stalled: partitions {sorted(remaining)} did not reach "
                "their end offsets"
            )
        if progress is not None:
            progress(done, total)


async def offsets(
    consumer: AIOKafkaConsumer, topic: str, partitions: Iterable[int], *, end: bool
) -> dict[int, int]:
    """The first (``end=False``) or end offsets of ``topic``'s ``partitions``."""
    tps = [TopicPartition(topic, p) for p in partitions]
    call = consumer.end_offsets(tps) if end else consumer.beginning_offsets(tps)
    found = await asyncio.wait_for(call, CALL_TIMEOUT)
    return {tp.partition: offset for tp, offset in found.items()}


async def topic_partitions(admin: AIOKafkaAdminClient, topic: str) -> list[int] | None:
    """``topic``'s partitions, in order; None if the broker does not know the topic."""
    (described,) = await asyncio.wait_for(admin.describe_topics([topic]), CALL_TIMEOUT)
    if described["error_code"] != 0 or not described["partitions"]:
        return None
    return sorted(p["partition"] for p in described["partitions"])


async def group_offsets(
    admin: AIOKafkaAdminClient, group: str, topic: str, partitions: Iterable[int]
) -> dict[int, int]:
    """The offsets ``group`` committed on ``topic``'s ``partitions`` (those it committed)."""
    tps = [TopicPartition(topic, p) for p in partitions]
    call = admin.list_consumer_group_offsets(group, partitions=tps)
    found = await asyncio.wait_for(call, CALL_TIMEOUT)
    return {tp.partition: meta.offset for tp, meta in found.items() if meta.offset >= 0}


def admin_client(access: KafkaAccess) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**access.client_options(), request_timeout_ms=30_000)


#: Replicas per topic when the setting leaves it to the cluster: one per broker, at most
#: three (three copies with min.insync.replicas 2 survive the loss of a broker and still
#: take acks=all writes; more only costs).
MAX_DEFAULT_REPLICATION = 3


def min_insync_replicas(replication: int) -> int:
    """A topic's min.insync.replicas: 2 from three replicas up (an acknowledged record is on
    two brokers), else 1 (two replicas needing two in sync would stop at the first loss)."""
    return 2 if replication >= 3 else 1


async def ensure_topics(
    access: KafkaAccess,
    topics: Iterable[str],
    *,
    partitions: int,
    replication: int | None = None,
) -> list[str]:
    """Create the topics that do not exist yet; returns the names it created.

    ``replication``: replicas per partition; None: the live brokers', at most
    :data:`MAX_DEFAULT_REPLICATION`. More than the cluster's brokers is a
    :class:`ConfigError`.
    """
    admin = admin_client(access)
    await asyncio.wait_for(admin.start(), CALL_TIMEOUT)
    try:
        existing = set(await asyncio.wait_for(admin.list_topics(), CALL_TIMEOUT))
        wanted = [t for t in dict.fromkeys(topics) if t not in existing]
        created: list[str] = []
        if not wanted:
            return created
        cluster = await asyncio.wait_for(admin.describe_cluster(), CALL_TIMEOUT)
        brokers = len(cluster.get("brokers", []))
        factor = replication or max(1, min(MAX_DEFAULT_REPLICATION, brokers))
        if factor > brokers:
            raise ConfigError(
                f"PROCESSOR_REPLICATION_FACTOR={factor}: the cluster has {brokers} live "
                f"broker{'s' if brokers != 1 else ''}; a topic cannot have more replicas"
            )
        configs = {"min.insync.replicas": str(min_insync_replicas(factor))}
        for topic in wanted:
            try:
                await asyncio.wait_for(
                    admin.create_topics(
                        [
                            NewTopic(
                                topic,
                                num_partitions=partitions,
                                replication_factor=factor,
                                topic_configs=configs,
                            )
                        ]
                    ),
                    CALL_TIMEOUT,
                )
                created.append(topic)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        await admin.close()


async def check_access(access: KafkaAccess) -> None:
    """Fail fast on settings that cannot work: raise the :class:`ConfigError` of a bootstrap
    host that refuses the login or the TLS handshake. Stops at the first host that accepts;
    unreachable hosts are left to the clients (they retry, and may find another host).
    """
    for host, port, _family in collect_hosts(access.bootstrap, randomize=False):
        problem = await _probe(access, f"{host}:{port}", host, port)
        if problem is None:
            return
        if isinstance(problem, ConfigError):
            raise problem


async def explain_unreachable(access: KafkaAccess, error: BaseException) -> ProcessorError:
    """Why a client could not bootstrap (aiokafka only logs it): one connection per host.

    aiokafka's ``start()`` raises a bare "Unable to bootstrap" :class:`KafkaConnectionError`
    whatever went wrong. This retries one connection to each bootstrap host with the same
    options and returns the first cause found: a :class:`ConfigError` naming the settings
    to check (SASL login refused, certificate not trusted, TLS against a plaintext listener
    or the reverse), or a :class:`ServiceUnreachable` (unreachable, or no cause found).
    """
    found = await find_problem(access)
    return found or ServiceUnreachable(f"cannot use Kafka at {access.bootstrap}: {error}")


async def find_problem(access: KafkaAccess) -> ProcessorError | None:
    """One connection per bootstrap host: the first :class:`ConfigError`, else the first
    :class:`ServiceUnreachable`, else None (every host answers)."""
    found: ProcessorError | None = None
    for host, port, _family in collect_hosts(access.bootstrap, randomize=False):
        problem = await _probe(access, f"{host}:{port}", host, port)
        if problem is None:
            continue
        if isinstance(problem, ConfigError):
            return problem
        found = found or problem
    return found


async def _probe(access: KafkaAccess, where: str, host: str, port: int) -> ProcessorError | None:
    protocol = f"KAFKA_SECURITY_PROTOCOL={access.security_protocol}"
    try:
        conn = await asyncio.wait_for(
            create_conn(host, port, request_timeout_ms=10_000, **access.connection_options()),
            15,
        )
    except (errors.SaslAuthenticationFailed, errors.AuthenticationFailedError) as exc:
        return ConfigError(
            f"Kafka at {where} refused the SASL login of user {access.sasl_username!r} "
            f"({access.sasl_mechanism}): check KAFKA_SASL_USERNAME and the password "
            f"(KAFKA_SASL_PASSWORD_FILE or KAFKA_SASL_PASSWORD) [{_broker_message(exc)}]"
        )
    except errors.UnsupportedSaslMechanismError:
        return ConfigError(
            f"KAFKA_SASL_MECHANISM={access.sasl_mechanism}: the listener at {where} does not "
            "enable this mechanism (sasl.enabled.mechanisms)"
        )
    except ssl.SSLCertVerificationError as exc:
        return ConfigError(
            f"TLS: the certificate of Kafka at {where} failed verification "
            f"({exc.verify_message}): KAFKA_SSL_CAFILE must hold the CA that signed it, "
            "and the certificate must name the host the client connects to"
        )
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError) as exc:
        if access.ssl_context is None and not isinstance(exc, ssl.SSLError):
            return await _closed(access, where, host, port, exc)
        if await _answers(host, port, tls=False):
            return ConfigError(
                f"Kafka at {where} answers without TLS (a plaintext listener), but "
                f"{protocol}: use the TLS listener's port, or KAFKA_SECURITY_PROTOCOL="
                f"{'SASL_PLAINTEXT' if access.uses_sasl else 'PLAINTEXT'}"
            )
        return ServiceUnreachable(
            f"Kafka at {where} closed the connection during the TLS handshake ({protocol}): "
            "not a Kafka listener, or the broker is shutting down"
        )
    except ssl.SSLError as exc:
        return ConfigError(
            f"TLS handshake with Kafka at {where} failed ({ssl_reason(exc)}): "
            f"is it a TLS listener ({protocol})? Does it require a client certificate "
            "(KAFKA_SSL_CERTFILE)?"
        )
    except errors.KafkaConnectionError as exc:
        if access.ssl_context is None:
            return await _closed(access, where, host, port, exc)
        return ConfigError(
            f"Kafka at {where} closed the connection before answering ({exc}): does it "
            "require a client certificate (KAFKA_SSL_CERTFILE) or another protocol?"
        )
    except TimeoutError:
        return ServiceUnreachable(f"Kafka at {where} did not answer in time ({protocol})")
    except OSError as exc:
        return ServiceUnreachable(f"cannot connect to Kafka at {where}: {ssl_reason(exc)}")
    except errors.KafkaError as exc:
        return ServiceUnreachable(f"Kafka at {where}: {_broker_message(exc)}")
    conn.close()
    return None


async def _closed(
    access: KafkaAccess, where: str, host: str, port: int, exc: BaseException
) -> ProcessorError:
    """A plaintext client's connection closed before Kafka answered: a TLS listener (a
    setting to fix) or something that is not a broker taking connections (unreachable)."""
    if await _answers(host, port, tls=True):
        return ConfigError(
            f"Kafka at {where} closed the connection before answering: it is a TLS "
            f"listener, but KAFKA_SECURITY_PROTOCOL={access.security_protocol}"
        )
    return ServiceUnreachable(
        f"Kafka at {where} closed the connection before answering ({type(exc).__name__}): "
        "not a Kafka listener, or the broker is shutting down"
    )


async def _answers(host: str, port: int, *, tls: bool) -> bool:
    """Whether ``host:port`` completes a TLS handshake (any certificate: this only tells a
    TLS listener from a closed door), or, without ``tls``, answers Kafka in plaintext."""
    try:
        if not tls:
            conn = await asyncio.wait_for(create_conn(host, port, request_timeout_ms=5_000), 10)
            conn.close()
            return True
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # a probe: nothing is sent over it
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=context), 10)
        writer.close()
        # A TLS transport closes over a few loop turns (close_notify): unawaited, a caller
        # whose event loop ends first leaves the socket to the garbage collector.
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 5)
        return True
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
        return False
    except ssl.SSLError:  # a TLS alert (e.g. a client certificate required): TLS it is
        return tls
    except (OSError, TimeoutError, errors.KafkaError):
        return False


def _broker_message(exc: errors.KafkaError) -> str:
    text = str(exc)
    return text.split(": ", 1)[1] if text.startswith("[Error") and ": " in text else text
