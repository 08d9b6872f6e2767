"""Per-task rate limits: a token bucket per task name, per worker (as Celery)."""

from __future__ import annotations

import re
import threading
import time

from qops.errors import UsageError

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*([smh]))?\s*$")


def parse_rate(rate: str | float | int | None) -> float:
    """'10/m' -> tokens per second (0 = no limit). Raises UsageError on bad input."""
    if rate in (None, "", 0):
        return 0.0
    if isinstance(rate, (int, float)):
        return float(rate)
    m = _RATE.match(str(rate))
    if not m:
        raise UsageError(f"invalid rate limit {rate!r}: use N, N/s, N/m or N/h (e.g. 10/m)")
    return float(m.group(1)) / _UNITS[m.group(2) or "s"]


class TokenBucket:
    def __init__(self, rate: float, capacity: float = 1.0) -> None:
        self.rate = rate
        self.capacity = max(1.0, capacity)
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self) -> float:
        """Take a token: 0.0 when one was there, else the seconds until one will be."""
        with self._lock:
            self._refill()
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return 0.0
            return (1.0 - self.tokens) / self.rate


class RateLimits:
    """``share``: this many processes take the node's tasks, each on its own limits
    (pool children that consume for themselves): each gets that share of every rate."""

    def __init__(self, share: int = 1) -> None:
        self.buckets: dict[str, TokenBucket] = {}
        self.share = max(1, share)

    def set(self, task_name: str, rate: str | float | None) -> None:
        per_second = parse_rate(rate)
        if per_second <= 0:
            self.buckets.pop(task_name, None)
        else:
            self.buckets[task_name] = TokenBucket(per_second / self.share)

    def reshare(self, share: int) -> None:
        """As many processes as ``share`` take the node's tasks now (the pool grew or
        shrank): each bucket's rate becomes that share of the node's."""
        share = max(1, share)
        for bucket in self.buckets.values():
            bucket.rate = bucket.rate * self.share / share
        self.share = share

    def take(self, task_name: str) -> float:
        bucket = self.buckets.get(task_name)
        return 0.0 if bucket is None else bucket.take()
