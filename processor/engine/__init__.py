"""The engine: one batch of requests applied with compare-and-set in one transaction.

- ``envelope``: what the engine and intake exchange (``Source``, ``Envelope``, ``Outcome``),
  no I/O.
- ``engine``: ``Engine``, the rounds of row requests and the ledger lookups.
- ``batches``: execute_multiple, execute_transaction and retrieve_entity.
- ``metadata``: an entity's metadata for retrieve_entity and ``processor metadata``.

Nothing is imported here, so ``envelope`` loads without asyncpg (intake has no I/O).
"""
