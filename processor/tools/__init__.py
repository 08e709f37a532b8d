"""The tools, apart from the runtime: what measures, demonstrates and checks the processor.

Nothing in the runtime (contract, intake, engine, worker, ledger, the Kafka and database
edges) imports from here; the tools import the runtime. ``ops/`` scripts share these
helpers too (``ops/bench.py``, ``ops/chaos.py``, ``ops/stack.py``):

- :mod:`processor.tools.loadtest`: ``processor loadtest``.
- :mod:`processor.tools.demo`: ``processor demo``; its registry and tables in ``demo_data/``.
- :mod:`processor.tools.schemas`: ``processor schemas``, the published contract in ``schemas/``.
- :mod:`processor.tools.chaos_check`: the chaos run's checker (``ops/chaos``).
- :mod:`processor.tools.stats`: nearest-rank percentiles and Zipf weights.
- :mod:`processor.tools.procs`: processes seen through /proc.
- :mod:`processor.tools.workers`: ``processor run`` subprocesses: their environment, and
  waiting until the group answers.
"""
