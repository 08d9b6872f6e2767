"""The Celery side of the benchmarks: ``celery -A benchapp worker``.

Runs in the benchmark's own Celery venv (bench/.celery-venv). Configured from the
environment by bench/throughput.py and bench/latency.py (BENCH_BROKER_URL, BENCH_QUEUE,
BENCH_ACKS_LATE, BENCH_RESULT_URL). Everything else is Celery's default (prefetch
multiplier 4, no -O fair, acks early unless BENCH_ACKS_LATE=1). ``add`` and ``noop``
store no result; ``rt_add`` (the round trip) stores its result in BENCH_RESULT_URL.
"""

from __future__ import annotations

import os

from benchcounter import count, tick
from celery import Celery

app = Celery("benchapp", broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/14"),
             backend=os.environ.get("BENCH_RESULT_URL") or None)
app.conf.update(
    task_default_queue=os.environ.get("BENCH_QUEUE", "bench"),
    task_ignore_result=True,
    task_acks_late=os.environ.get("BENCH_ACKS_LATE", "0") == "1",
    broker_connection_retry_on_startup=True,  # only silences a start-up warning
)


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
