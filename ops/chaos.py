"""``ops/chaos``'s entry point; the code is in :mod:`ops.lib.chaos`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ops.lib.chaos.cli import main  # (after the root is on sys.path)

if __name__ == "__main__":
    sys.exit(main())
