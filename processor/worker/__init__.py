"""The worker: consume -> apply -> commit, one Kafka transaction per batch.

- ``loop``: ``Worker``, the loop that drives a batch through the parts below.
- ``ownership``: which fetched records this worker still owns; rewinds, checked against
  the committed offsets.
- ``accounting``: each request admitted, its outcome as records, counted and logged.
- ``intake``: records -> envelopes (or rejects) and outcomes -> reply records, no I/O.
- ``lanes``: a batch's requests grouped by the rows they touch.
- ``applier``: the database side of a batch (one connection per lane).
- ``commit``: the replies and the offsets in one transaction, fenced by the generation.
- ``reply_routes``: where the replies go (per-instance reply topics).
- ``retry``: the one retry policy.

Nothing is imported here: each part is imported from its module.
"""
