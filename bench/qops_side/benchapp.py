"""The qops side of the benchmarks: ``qops -A benchapp worker``.

Configured from the environment by bench/throughput.py and bench/latency.py
(BENCH_BROKER_URL, BENCH_QUEUE, BENCH_RESULT_URL). Everything else is qops's default
(acks_late=True, prefetch multiplier 4). ``add`` and ``noop`` store no result;
``rt_add`` (the round trip) stores its result in BENCH_RESULT_URL.
"""

from __future__ import annotations

import os

from benchcounter import count, tick

from qops import App

app = App("benchapp", broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/14"),
          backend=os.environ.get("BENCH_RESULT_URL") or None,
          task_default_queue=os.environ.get("BENCH_QUEUE", "bench"),
          task_ignore_result=True)


@app.task(name="bench.add", ignore_result=True)
def add(x: int, y: int) -> int:
    count()
    return x + y


@app.task(name="bench.noop", ignore_result=True)
def noop(x: int, y: int) -> None:
    tick()


@app.task(name="bench.rt_add", ignore_result=False)
def rt_add(x: int, y: int) -> int:
    return x + y
