"""``processor loadtest``: read-modify-write load through the workers, then the invariants.

Virtual clients share one :class:`~processor.client.Client` and run a mix of operations
on the rows of a counter entity (``counter`` = ``demo.counter(id int, n bigint)``):

- **increment**: ``read_modify_write(n = n + 1)`` on a row drawn with a Zipf-like skew
  (``--skew``: weight of the i-th hottest row ~ 1/(i+1)^s; 0 = uniform, ``max`` = one row);
  version mismatches are retried with jittered backoff and counted as conflicts;
- **stale**: an update IfRowVersionMatches with a version known to be stale (read at setup,
  then every row was bumped), writing a poison value: must fault ConcurrencyVersionMismatch;
- **delete**: of a row of a separate range seeded for deletes (counters stay checkable),
  each row deleted once; if the range runs out, deletes of gone rows (ObjectDoesNotExist).

Closed loop (``--clients`` virtual clients, each starts its next operation when the last
ended) or open loop (``--rate`` operations per second on a fixed schedule, latency measured
from the scheduled start so a slow system is not hidden; at most ``--max-in-flight``).

The test writes the database directly only to reset its rows at the start, to read them at
the end and, after the checks, to delete them (unless ``keep_rows``). Then it checks, and
exits 1 loudly if any breaks:

- every counter equals the number of increments that got a success reply;
- no stale update was accepted; the delete range lost exactly the rows deleted with success;
- replies == requests: every request_id sent got its reply (a timeout is settled by
  resending the same request, which the ledger answers);
- the reply topic, read ``read_committed`` over the run, holds a reply for every request_id
  and no more copies of it than times it was sent (a resend gets the stored reply again),
  all copies byte-identical;
- the audit (``processor.audit``), when that module exists: see :func:`run_audit_hook`.

It needs a running worker group, or ``--with-worker N`` to start N ``processor run``
processes for the run (their logs: ``--worker-logs DIR``, else a temporary directory that
is named at the start and removed after a clean run). Results: a summary on stdout, and
only when asked, ``--json`` and a ``--plot`` PNG (needs matplotlib: the ``plot`` extra;
without it the plot is skipped with a message). The summary and the audit line count
requests alike: every request record the run sent (resends included), setup excluded.

**Modules.** :mod:`.model` (options, observations, invariants), :mod:`.load` (the virtual
clients), :mod:`.setup` (rows, workers, stale versions), :mod:`.run` (``run_loadtest``),
:mod:`.report` (summary, JSON, plot), :mod:`.cli` (``processor loadtest``).
"""

from processor.tools.loadtest.cli import add_arguments, run_from_args
from processor.tools.loadtest.model import (
    Invariant,
    LoadOptions,
    Observations,
    check_invariants,
)
from processor.tools.loadtest.report import dump, figure, summary, write_plot
from processor.tools.loadtest.run import run_audit_hook, run_loadtest
from processor.tools.stats import percentile, zipf_weights

__all__ = [
    "Invariant",
    "LoadOptions",
    "Observations",
    "add_arguments",
    "check_invariants",
    "dump",
    "figure",
    "percentile",
    "run_audit_hook",
    "run_from_args",
    "run_loadtest",
    "summary",
    "write_plot",
    "zipf_weights",
]
