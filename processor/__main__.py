"""``python -m processor``: the same as the ``processor`` command."""

from processor.cli import main

raise SystemExit(main())
