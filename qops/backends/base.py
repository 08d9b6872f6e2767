"""Result backends: the public logic lives here; subclasses implement _get/_store/_delete
and, where the store can wake a waiter, _wait.

A result is Celery's meta dict (docs/protocol.md §6)::

    {"status": "SUCCESS", "result": 42, "traceback": null, "children": [],
     "date_done": "...", "task_id": "..."}
"""

from __future__ import annotations

import datetime as dt
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from qops import protocol
from qops.errors import ResultTimeout

PENDING = "PENDING"
RECEIVED = "RECEIVED"
STARTED = "STARTED"
RETRY = "RETRY"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
REVOKED = "REVOKED"
READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})
ALL_STATES = frozenset({PENDING, RECEIVED, STARTED, RETRY, SUCCESS, FAILURE, REVOKED})


def pending(task_id: str) -> dict[str, Any]:
    return {"status": PENDING, "result": None, "traceback": None, "children": [],
            "date_done": None, "task_id": task_id}


class ResultBackend(ABC):
    #: whether the worker that stores a chord header's last result joins the chord here
    #: (the counter join of docs/canvas.md); without it a ``celery.chord_unlock`` task
    #: polls the header's results
    native_join = False
    #: whether a prefork pool child may store its task's result itself (the backend is
    #: safe to use in a forked process: it connects again there); the result is then
    #: there before the parent hears of the task's end
    stored_by_children = False

    def __init__(self, url: str, *, expires: float | None = 86400,
                 prefix: str = "qops-task-meta-") -> None:
        self.url = url
        self.expires = expires or None  # 0 = keep forever
        self.prefix = prefix
        # Celery's group keys: celery-task-meta- -> celery-taskset-meta-
        self.group_prefix = prefix.replace("task-meta-", "taskset-meta-")

    @classmethod
    def check_url(cls, url: str) -> None:
        """Raise a one-line UsageError naming the expected form when ``url`` is not a
        valid URL for this backend (before anything is opened). Default: any URL."""
        return None

    # -- public ---------------------------------------------------------------------
    def store(self, task_id: str, state: str, result: Any = None, traceback: str | None = None,
              *, reply_to: str | None = None, children: list[Any] | None = None,
              extra: dict[str, Any] | None = None) -> None:
        """Record ``state`` for the task. A SUCCESS is never overwritten."""
        if state not in ALL_STATES:
            raise ValueError(f"unknown state {state!r}")
        if isinstance(result, BaseException):
            result = protocol.exception_to_dict(result)
        meta: dict[str, Any] = {
            "status": state,
            "result": result,
            "traceback": traceback,
            "children": children or [],
            "date_done": dt.datetime.now(dt.timezone.utc).isoformat()
            if state in READY_STATES else None,
            "task_id": task_id,
        }
        if extra:
            meta.update(extra)
        self._store(task_id, protocol.dumps(meta).encode(), state, reply_to=reply_to)

    def get_meta(self, task_id: str) -> dict[str, Any]:
        return _parse(task_id, self._get(task_id))

    def check(self) -> None:
        """One read, raising as reading a result would (BrokerUnreachable): done before
        sending a task whose result the caller waits for, so that an unreachable backend
        fails before the task runs -- a script trying again would run it twice."""
        self._get("qops-check-reachable")

    def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until the task is ready; raise ResultTimeout after ``timeout`` seconds.
        A wake-up that carries the stored meta (Redis publishes what it stores) is taken
        as read when it is ready: no read of the key after it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._watch(task_id) as pause:
            meta = self.get_meta(task_id)
            while meta["status"] not in READY_STATES:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise ResultTimeout(f"task {task_id} not ready after {timeout}s "
                                        f"(state {meta['status']})")
                woke = pause(1.0 if left is None else min(left, 1.0))
                try:  # (anyone may publish on the channel)
                    meta = _parse(task_id, woke)
                except ValueError:
                    meta = pending(task_id)
                if meta["status"] not in READY_STATES:
                    meta = self.get_meta(task_id)
            return meta

    def forget(self, task_id: str) -> None:
        self._delete(task_id)

    def close(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing
        """Release connections."""

    def cleanup(self) -> None:  # noqa: B027 - optional hook: most backends expire by themselves
        """Delete expired results now (the ``celery.backend_cleanup`` task)."""

    # -- the chord counter join (backends with ``native_join``; docs/canvas.md) ------------
    def set_chord_size(self, group_id: str, size: int) -> None:
        """Before a chord's header is sent: how many parts complete it."""
        raise NotImplementedError(f"{type(self).__name__} has no chord counter")

    def join_part(self, group_id: str, task_id: str, index: int | None, entry: bytes,
                  claim: int) -> tuple[str, list[bytes]] | None:
        """Record one header part's ``entry`` (JSON ``[1, id, state, result]``) once. When
        this part completes the chord and this caller wins the claim (held ``claim``
        seconds): (claim token, every entry in header order); else None."""
        raise NotImplementedError(f"{type(self).__name__} has no chord counter")

    def join_extend(self, group_id: str, token: str, seconds: int) -> bool:
        """Hold the claim ``seconds`` longer (taken again if it lapsed and the chord is
        still there); False when another worker holds it."""
        raise NotImplementedError(f"{type(self).__name__} has no chord counter")

    def join_done(self, group_id: str, token: str) -> bool:
        """The body was sent: drop the chord's keys, leave a 'done' mark for late copies."""
        raise NotImplementedError(f"{type(self).__name__} has no chord counter")

    def join_abandon(self, group_id: str) -> None:
        """The chord failed: forget its size so a late copy of a part can't fail it again."""
        raise NotImplementedError(f"{type(self).__name__} has no chord counter")

    def prepare_send(self) -> str | None:
        """The ``reply_to`` a producer should put in the messages it sends (rpc only)."""
        return None

    # -- for subclasses ---------------------------------------------------------------
    @abstractmethod
    def _get(self, task_id: str) -> bytes | None: ...

    @abstractmethod
    def _store(self, task_id: str, data: bytes, state: str, *, reply_to: str | None) -> None:
        """Save ``data`` unless a SUCCESS is already stored for the task."""

    @abstractmethod
    def _delete(self, task_id: str) -> None: ...

    @contextmanager
    def _watch(self, task_id: str) -> Iterator[Callable[[float], bytes | None]]:
        """While waiting for a task: yield a function that returns when its state may
        have changed, or after the seconds it is given: the meta that was stored, when
        it knows (else None: read it). Set up before the first read, so a result stored
        in between is not missed. Default: ``_wait`` (polling), its interval starting
        short again for each wait."""
        self._poll = POLL_FIRST

        def pause(seconds: float) -> None:
            self._wait(task_id, seconds)

        yield pause

    def _wait(self, task_id: str, timeout: float) -> None:
        """Return when the task's state may have changed, or after ``timeout``.

        Default: poll with a short, growing interval."""
        step = getattr(self, "_poll", POLL_FIRST)
        time.sleep(min(step, timeout))
        self._poll = min(step * 2, POLL_MAX)


def _parse(task_id: str, raw: bytes | None) -> dict[str, Any]:
    """A stored meta (JSON), or PENDING for none or for anything that is not a meta."""
    if raw is None:
        return pending(task_id)
    meta = protocol.loads(raw)
    return meta if isinstance(meta, dict) and "status" in meta else pending(task_id)


#: the polling interval of a wait (backends that cannot be woken): first, and longest
POLL_FIRST, POLL_MAX = 0.005, 0.1

# scheme -> (module, class): a module is imported only when its scheme is used
BACKENDS = {
    "sqlite": ("qops.backends.sqlite", "SQLiteBackend"),
    "redis": ("qops.backends.redis", "RedisBackend"),
    "rediss": ("qops.backends.redis", "RedisBackend"),
    "unix": ("qops.backends.redis", "RedisBackend"),
    "sentinel": ("qops.backends.redis", "RedisBackend"),
    "rpc": ("qops.backends.rpc", "RPCBackend"),
    "memory": ("qops.backends.memory", "MemoryBackend"),
}


def backend_class(url: str) -> type[ResultBackend]:
    """The ResultBackend class for ``url``'s scheme, once ``url`` is known to be well
    formed (imports its module only; the same checks as a broker URL's)."""
    import importlib

    from qops.transports.urls import url_scheme

    scheme = url_scheme(url, list(BACKENDS), "result backend URL")
    module, name = BACKENDS[scheme]
    cls: type[ResultBackend] = getattr(importlib.import_module(module), name)
    cls.check_url(url)
    return cls


def backend_from_url(url: str, *, expires: float | None = 86400,
                     prefix: str = "qops-task-meta-", transport: Any = None,
                     options: dict[str, Any] | None = None) -> ResultBackend:
    """``options``: ``result_backend_transport_options`` (read by the Redis backend:
    ``master_name``, ``sentinel_kwargs``, ``wait_replicas``, ...)."""
    cls = backend_class(url)
    scheme = url.split("://", 1)[0].lower()
    if scheme == "rpc":
        return cls(url, expires=expires, prefix=prefix, transport=transport)  # type: ignore[call-arg]
    if BACKENDS[scheme][1] == "RedisBackend":
        return cls(url, expires=expires, prefix=prefix, options=options or {})  # type: ignore[call-arg]
    return cls(url, expires=expires, prefix=prefix)
