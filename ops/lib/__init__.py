"""The Python behind the ops commands: ``ops/stack`` (:mod:`ops.lib.stack`), ``ops/chaos``
(:mod:`ops.lib.chaos`) and ``ops/bench`` (:mod:`ops.lib.bench`), and what more than one of
them needs (:mod:`ops.lib.common`; the rest they share lives in :mod:`processor.tools`:
processes, worker subprocesses, percentiles and Zipf weights).

Each command's ``ops/<name>.py`` is only its entry point: it puts the repository root on
``sys.path`` (the command runs as a script, from any directory) and calls ``main``.
"""
