"""The Kafka edge: how to reach the brokers, the clients, the aiokafka patches.

- ``access``: bootstrap, TLS, SASL and ``Secret`` (no client imported: ``config`` builds it).
- ``clients``: producers and consumers with safe settings, topics, reading a topic to its end.
- ``kip447``: generation-fenced transactional offset commits for aiokafka.

The package re-exports ``access``'s names only (``from processor.kafka import KafkaAccess,
Secret``, as docs/security-kafka.md shows), so importing the settings never loads aiokafka.
"""

from processor.kafka.access import (
    KAFKA_SECURITY_VARS,
    SASL_MECHANISMS,
    SECURITY_PROTOCOLS,
    KafkaAccess,
    Secret,
    kafka_security_problem,
    read_secret_file,
    ssl_reason,
)

__all__ = [
    "KAFKA_SECURITY_VARS",
    "SASL_MECHANISMS",
    "SECURITY_PROTOCOLS",
    "KafkaAccess",
    "Secret",
    "kafka_security_problem",
    "read_secret_file",
    "ssl_reason",
]
