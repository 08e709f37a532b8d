"""Platform checks: what the processor relies on from PostgreSQL and Kafka (+ aiokafka).

These test the services, not the product: xmin as a compare-and-set row version, Kafka
transactions and read_committed. They run against the same services as the integration
tests and carry the ``platform`` marker (and ``integration``) automatically; a failure
here means the platform changed under the product (a new PostgreSQL, Kafka or aiokafka).
"""
