"""What the benchmark task does, shared word for word by the qops and the Celery app.

``count()`` INCRs one Redis key (the same for every system). The task that brings the
counter to ``BENCH_START_AT`` (the last warm-up task) and the one that brings it to
``BENCH_END_AT`` (the last measured task) also push ``time.monotonic()`` to a marks list,
so the benchmark needs no polling: it BLPOPs the two marks. CLOCK_MONOTONIC is one
clock for the whole machine on Linux, so the two marks (taken in different pool
processes) and the benchmark's own clock compare directly.

``tick()`` is the no-op task of the solo measure: it only counts in the process (one
worker process, so the count is exact) and pushes the same two marks; its Redis client
is made once, by the first task, before the clock starts.

Environment (set by bench/throughput.py): BENCH_COUNTER_URL, BENCH_COUNTER_KEY,
BENCH_MARKS_KEY, BENCH_START_AT, BENCH_END_AT.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis

COUNTER_URL = os.environ.get("BENCH_COUNTER_URL", "redis://127.0.0.1:6379/14")
COUNTER_KEY = os.environ.get("BENCH_COUNTER_KEY", "bench.counter")
MARKS_KEY = os.environ.get("BENCH_MARKS_KEY", "bench.marks")
START_AT = int(os.environ.get("BENCH_START_AT", "0"))
END_AT = int(os.environ.get("BENCH_END_AT", "0"))

_client: Any = None
_pid = 0


def _redis() -> Any:
    """One client per process (pool children get their own after the fork)."""
    global _client, _pid
    if _client is None or _pid != os.getpid():
        _client = redis.Redis.from_url(COUNTER_URL)
        _pid = os.getpid()
    return _client


def count() -> None:
    client = _redis()
    value = client.incr(COUNTER_KEY)
    if value == START_AT:
        client.rpush(MARKS_KEY, f"start {time.monotonic():.6f}")
    elif value == END_AT:
        client.rpush(MARKS_KEY, f"end {time.monotonic():.6f}")


_ticks = 0


def tick() -> None:
    global _ticks
    _ticks += 1
    if _ticks == START_AT:
        _redis().rpush(MARKS_KEY, f"start {time.monotonic():.6f}")
    elif _ticks == END_AT:
        _redis().rpush(MARKS_KEY, f"end {time.monotonic():.6f}")
    elif _ticks == 1:
        _redis()  # the connection is made before the clock starts
