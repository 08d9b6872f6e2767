"""Per-task rate limits: a token bucket per task name, per worker (as Celery)."""

from __future__ import annotations

import threading
import time

from qops.rates import parse_rate


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
