"""The qops side of the throughput benchmark: ``qops -A benchapp worker``.

Configured from the environment by bench/throughput.py (BENCH_BROKER_URL, BENCH_QUEUE).
Everything else is qops's default (acks_late=True, prefetch multiplier 4).
"""

from __future__ import annotations

import os

from benchcounter import count

from qops import App

app = App("benchapp", broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/14"),
          task_default_queue=os.environ.get("BENCH_QUEUE", "bench"),
          task_ignore_result=True)


@app.task(name="bench.add", ignore_result=True)
def add(x: int, y: int) -> int:
    count()
    return x + y
