"""The chaos run: a contended load through a worker group while faults are injected, then
a Jepsen-style check of the whole history.

Run it through ``ops/chaos`` (the project's .venv python)::

    ops/chaos --short                      # CI: every fault kind once (~3-4 min in all)
    ops/chaos --duration 600 --workers 3   # the long form: rounds of faults for 10 min

It always runs on a **private stack** (its own state dir under the workdir and its own
free ports, started and stopped with ``ops/stack``): it kills the broker and the database,
so it never touches the shared ``.stack/``.

1. Starts the stack, the demo schema, ledger and topics, the counter rows, a TCP proxy
   between the workers and PostgreSQL (the network faults), and ``--workers`` workers.
2. Drives a closed-loop load through :class:`processor.client.Client`: read-modify-write
   increments (retrieve, then update IfRowVersionMatches with the version read; retried on
   ConcurrencyVersionMismatch) on a few hundred rows with a Zipf-like skew, updates with a
   known stale version (must fault ConcurrencyVersionMismatch), deletes of a separate range
   of rows, and hostile records produced straight to the request topic. A request without
   a reply in time is resent as is (same request_id) until it gets one: the ledger makes
   that safe, and every request ends with a known outcome.
3. Meanwhile injects faults one after another, waiting after each for the service to
   recover: worker-kill9, worker-zombie, worker-add, worker-remove, kafka-kill9,
   postgres-immediate, postgres-fast, net-latency, net-reset, net-partition.
4. The quiet period: the load stops, everything is healed, and the run waits until the
   group has consumed the whole request topic and no transaction is open on the reply and
   dead-letter topics (last stable offset = high watermark), then stops the workers.
5. The checker (:mod:`processor.tools.chaos_check`): the audit over everything
   (:mod:`processor.audit`) plus the model checks; anomalies by name, figures, a JSON
   file. Exit status: 0 clean, 1 any anomaly, 2 bad arguments or a stack/setup failure
   (the message says which).

Recovery time of a fault: from its heal (the restart returned, SIGCONT, the proxy healed,
the worker started or signalled) until every partition of the request topic has delivered
a reply to the clients again. Disruption: the same, from the fault's injection.

The modules: :mod:`.config` (the command line, fault orders, exit codes),
:mod:`.private_stack`, :mod:`.proxy` (the network faults' TCP proxy), :mod:`.workers`,
:mod:`.load` (the virtual clients), :mod:`.faults`, :mod:`.check` (the quiet period and
what was observed), :mod:`.run`, :mod:`.report`, :mod:`.cli`.
"""
