"""The benchmark: the processor against the database's and Kafka's ceilings and two contenders.

Run it through ``ops/bench`` (the project's .venv python)::

    ops/bench                 # full run: BENCHMARKS.md and docs/bench/*.png (~20-30 min)
    ops/bench --quick         # CI-sized (< 3 min): .cache/bench/quick/BENCHMARKS.md

    # the old commit path (a8821c1, in a git worktree) against the current one, 6 then 48
    # partitions; the second report holds both runs ("Old vs new commit path"):
    ops/bench --only processor,kafka --baseline a8821c1 --partitions 6 \
        --report /tmp/b6/BENCHMARKS.md --plots /tmp/b6
    ops/bench --only processor,kafka --baseline a8821c1 --partitions 48 \
        --compare-with /tmp/b6/results.json --report /tmp/b48/BENCHMARKS.md --plots /tmp/b48

Every contender drains the *same* preloaded backlog (same requests, same keys, same
conflicts, same table) one after another, then serves an open-loop load at half its own
drain rate for the latency figures:

- ``pgbench-cas`` / ``pgbench-batch``: the database ceiling. pgbench runs the
  compare-and-set (one row per transaction, at its best client count), and the batched
  form (one statement over unnest arrays per transaction);
- ``kafka`` / ``kafka-txn``: the Kafka ceiling, no database (ops/bench_contenders.py);
- ``naive``: consume one message, one transaction, send_and_wait, commit the offset;
- ``faststream``: a FastStream handler doing the same work with asyncpg;
- ``processor-<w>w-l<lanes>``: real ``processor run`` subprocesses; with ``--baseline REV``
  each also as ``processor-<w>w-l<lanes>@REV``, the same run from that commit's tree. Each
  processor contender also gets an idle run: one closed-loop client.

The workload: update requests on ``bench.counter(id, n, version)`` with
IfRowVersionMatches. The row version is the bigint ``version`` column (not xmin): a backlog
produced in advance must carry each request's expected version, and only a version column
is predictable. A share of the requests carries a stale version and must fault
(ConcurrencyVersionMismatch); the others must succeed with exactly the predicted new
version. Every run is checked: one reply per request (no loss, no duplicate), each reply's
status and version as predicted, every counter's final n and version, the ledger's row
count. A fast wrong answer is reported as a failure (and the exit status is 1).

The backlog is produced inside an open Kafka transaction and committed only when the
contender's consumer group is stable: every worker starts on a full backlog at once.

The services: ``KAFKA_BOOTSTRAP_SERVERS`` and ``DATABASE_URL`` if both are set, else the
local stack (``ops/stack up``; ``PROCESSOR_STACK_DIR`` and the port variables select a
private one, recommended for measurements). The bench works in its own database
(``<database>_bench``) so that ``pg_stat_database`` counts only its own commits.

The modules: :mod:`.workload` (schema, registry, pgbench scripts, the plan of a run),
:mod:`.costs` (CPU and memory from /proc), :mod:`.environment` (the services and the
bench database), :mod:`.topics` (topics, the backlog, the reply collector),
:mod:`.contenders`, :mod:`.runs` (drain, load, idle), :mod:`.pgbench` (the database's
ceiling, the baseline worktree), :mod:`.whole` (every run in order), :mod:`.report` +
:mod:`.commit_path` + :mod:`.text` (BENCHMARKS.md), :mod:`.plots`, :mod:`.cli`.
"""
