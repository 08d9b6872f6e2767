"""Producer: ``python produce.py WARMUP N`` publishes WARMUP + N ``bench.add`` tasks with
``add.delay`` from this one process and prints ``{"seconds": ..., "n": N}``: the time
taken by the N measured publishes (the warm-up ones open the connection, declare the
queue and warm the code paths). The same file serves qops and Celery: ``benchapp`` is
whichever side's module is on PYTHONPATH. ``BENCH_TASK`` names the task (``add``, the
default, or ``noop``).
"""

from __future__ import annotations

import json
import os
import sys
import time

import benchapp


def main() -> None:
    warmup, n = int(sys.argv[1]), int(sys.argv[2])
    add = getattr(benchapp, os.environ.get("BENCH_TASK", "add"))
    for i in range(warmup):
        add.delay(0, i)
    start = time.perf_counter()
    for i in range(n):
        add.delay(i, i)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "n": n}), flush=True)


if __name__ == "__main__":
    main()
