"""Waiting for replicas: the ``wait_replicas`` / ``wait_timeout_ms`` transport options.

Redis replicates asynchronously: a write the master has answered may not have reached
any replica yet, and when Sentinel promotes a replica after the master died, such a
write is gone. With ``wait_replicas: N`` qops follows the writes that matter with
``WAIT N wait_timeout_ms`` (Redis blocks until N replicas have acknowledged every
write of this connection so far, or the time is up):

- a publish (``apply_async``, ``send_task``, retries, chains) raises PublishError
  when fewer than N replicas have the message in time: the caller learns that the
  message may be lost at a failover (it is on the master, so sending it again may run
  it twice);
- a stored result (the result backend's ``result_backend_transport_options``) raises
  the same way.

Acks, reserves and dead-letterings do not wait: losing one of them at a failover puts
the message back in its queue (qops/transports/redis/consumer.py resyncs what its
in-flight lists hold), so the task runs again -- a duplicate, never a loss.

WAIT does not make Redis synchronous: the write stays on the master even when the
wait falls short (docs/guarantees.md says what that means).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qops.errors import ConfigError, PublishError

DEFAULT_TIMEOUT_MS = 1000


@dataclass(frozen=True)
class Replicas:
    count: int = 0  # 0: do not wait
    timeout_ms: int = DEFAULT_TIMEOUT_MS

    @classmethod
    def from_options(cls, options: dict[str, Any], setting: str) -> Replicas:
        count = options.get("wait_replicas", 0) or 0
        timeout = options.get("wait_timeout_ms", DEFAULT_TIMEOUT_MS)
        for key, value, low in (("wait_replicas", count, 0), ("wait_timeout_ms", timeout, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"setting '{setting}': {key} must be a whole number "
                                  f">= {low}, not {value!r}")
        return cls(count, timeout)

    @property
    def command(self) -> list[Any]:
        return ["WAIT", self.count, self.timeout_ms]

    def check(self, acked: Any, what: str) -> None:
        """PublishError when fewer than ``count`` replicas acknowledged ``what``."""
        got = int(acked)
        if got < self.count:
            raise PublishError(
                f"Redis took {what}, but only {got} of the {self.count} replica(s) asked "
                f"for (wait_replicas) confirmed the write within {self.timeout_ms} ms: "
                "the master failing now would lose it (sending again may run a task twice)")

    def wait(self, pipe: Any, what: str) -> list[Any]:
        """Run ``pipe`` (a redis-py pipeline, not a transaction, holding the writes)
        with WAIT at its end: WAIT counts the writes of its own connection, so it must
        follow them on the same one. The writes' replies; PublishError on a shortfall."""
        pipe.execute_command(*self.command)
        replies: list[Any] = pipe.execute()
        self.check(replies[-1], what)
        return replies[:-1]
