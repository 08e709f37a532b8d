"""``ops/bench``'s entry point; the code is in :mod:`ops.lib.bench`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ops.lib.bench.cli import main  # (after the root is on sys.path)

if __name__ == "__main__":
    sys.exit(main())
