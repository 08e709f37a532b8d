"""``processor loadtest``, kept at its old import path: the code is in
:mod:`processor.tools.loadtest` (the tools apart from the runtime)."""

from processor.tools.loadtest import *  # noqa: F403  (every public name, the same objects)
from processor.tools.loadtest import __all__ as __all__
