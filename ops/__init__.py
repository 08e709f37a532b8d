"""The operations tooling: the local stack, the chaos run, the benchmark (see :mod:`ops.lib`)."""
