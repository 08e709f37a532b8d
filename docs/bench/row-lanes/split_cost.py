"""Time `lanes.split` on 1,000-request batches, 4 lanes: the common path (one row per
request), related rows in disjoint pairs, and one chain of related rows linking every
request (the batch collapses to one lane). Run: PYTHONPATH=. python <this file>."""

from __future__ import annotations

import timeit

from processor.worker.lanes import split

N = 1000
LANES = 4
items = list(range(N))
cases = {
    "one row each (common path)": [[("counter", i % 700)] for i in range(N)],
    "related rows, disjoint pairs": [
        [("counter", 2 * i), ("counter", 2 * i + 1)] for i in range(N)
    ],
    "related rows, one chain linking all": [[("counter", i), ("counter", i + 1)] for i in range(N)],
}
for name, rows in cases.items():
    seconds = min(timeit.repeat(lambda rows=rows: split(items, rows, LANES), number=200, repeat=5))
    sizes = [len(lane) for lane in split(items, rows, LANES)]
    print(f"{name:38s} {seconds / 200 * 1e6:7.0f} us per batch, lane sizes {sizes}")
