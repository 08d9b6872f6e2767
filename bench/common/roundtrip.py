"""Round trip: ``python roundtrip.py WARMUP N`` calls ``rt_add.delay(1, 1).get()`` WARMUP
times (the first waits for the worker to be up), then N times one after another, each
timed alone, and prints ``{"n": N, "us": [...]}`` (microseconds, in call order). The
same file serves every system: ``benchapp`` is whichever side's module is on PYTHONPATH,
and its ``rt_add`` has a result backend.
"""

from __future__ import annotations

import json
import sys
import time

from benchapp import rt_add


def main() -> None:
    warmup, n = int(sys.argv[1]), int(sys.argv[2])
    for i in range(warmup):
        got = rt_add.delay(1, i).get(timeout=120 if i == 0 else 30)
        if got != 1 + i:
            raise SystemExit(f"rt_add(1, {i}) returned {got!r}")
    us = []
    clock = time.perf_counter
    for i in range(n):
        start = clock()
        got = rt_add.delay(1, i).get(timeout=30)
        us.append((clock() - start) * 1e6)
        if got != 1 + i:
            raise SystemExit(f"rt_add(1, {i}) returned {got!r}")
    print(json.dumps({"n": n, "us": [round(u, 1) for u in us]}), flush=True)


if __name__ == "__main__":
    main()
