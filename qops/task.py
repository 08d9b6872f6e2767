"""Task and Signature."""

from __future__ import annotations

import datetime as dt
import gc
import inspect
import random
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from qops.errors import MaxRetriesExceeded, Retry, UsageError
from qops.rates import parse_rate
from qops.values import time_limits

if TYPE_CHECKING:
    from qops.app import App
    from qops.outgoing import Outgoing
    from qops.protocol import Message
    from qops.result import AsyncResult

#: the sending options a user gives apply_async, and that travel in a signature's
#: "options" (the one list: App.send_signature and beat entries take theirs from here)
SEND_OPTIONS = frozenset({
    "countdown", "eta", "expires", "queue", "priority", "task_id", "link", "link_error",
    "time_limit", "soft_time_limit", "ignore_result", "shadow", "compression"})
#: what the worker and the canvas add when they send on a user's behalf (retries, chain
#: and chord links, the workflow ids, the rpc reply queue)
INTERNAL_SEND_OPTIONS = frozenset({
    "parent_id", "root_id", "chain", "group", "group_index", "chord", "retries", "reply_to"})


def send_options(options: dict[str, Any]) -> dict[str, Any]:
    """The sending options among a signature's ``options``, as ``send_task`` takes them.
    Signatures travel between Celery and qops: Celery's ``group_id`` is ``group`` here, and
    what qops does not send by (``stamped_headers``, ``exchange``, ...) is left out."""
    out = {k: v for k, v in options.items() if k in SEND_OPTIONS or k in INTERNAL_SEND_OPTIONS}
    if options.get("group_id") is not None and out.get("group") is None:
        out["group"] = options["group_id"]
    return out


def bulk_send(app: App, build: Callable[[], list[tuple[str, Message] | AsyncResult]]
              ) -> list[AsyncResult]:
    """``app.publish_many(build())`` with the cyclic garbage collector paused (left off
    if it was off). Building 20,000 messages makes some 300,000 container objects, none
    of them garbage, and the collector's passes over them were a fifth of the CPU of the
    send. The built list is gone (freed by reference counting) before the collector
    resumes: its first pass would otherwise walk every message once more."""
    if not gc.isenabled():
        return app.publish_many(build())
    gc.disable()
    try:
        return app.publish_many(build())
    finally:
        gc.enable()


class Context:
    """``task.request`` while a task runs."""

    def __init__(self, **values: Any) -> None:
        self.id: str | None = None
        self.args: list[Any] = []
        self.kwargs: dict[str, Any] = {}
        self.retries = 0
        self.is_eager = False
        self.hostname: str | None = None
        self.delivery_info: dict[str, Any] = {}
        self.root_id: str | None = None
        self.parent_id: str | None = None
        self.group: str | None = None
        self.chain: list[Any] | None = None
        self.callbacks: list[Any] | None = None
        self.errbacks: list[Any] | None = None
        self.eta: str | None = None
        self.expires: str | None = None
        self.timelimit: list[Any] = [None, None]
        self.__dict__.update(values)

    def get(self, key: str, default: Any = None) -> Any:
        return self.__dict__.get(key, default)

    def __repr__(self) -> str:
        return f"<Context {self.__dict__!r}>"


class Task:
    """A registered task. Made by ``@app.task``; calling it runs the function here."""

    name: str
    max_retries: int | None = 3
    default_retry_delay: float = 180
    autoretry_for: tuple[type[BaseException], ...] = ()
    retry_backoff: bool | float = False
    retry_backoff_max: float = 600
    retry_jitter: bool = True
    queue: str | None = None
    rate_limit: str | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    acks_late: bool | None = None
    ignore_result: bool | None = None
    priority: int | None = None
    reject_on_worker_lost: bool | None = None
    max_worker_lost: int | None = None
    typing: bool = True

    def __init__(self, app: App, fun: Callable[..., Any], *, name: str, bind: bool = False,
                 **options: Any) -> None:
        self.app = app
        self.run = fun
        self.name = name
        self.bind = bind
        for key, value in options.items():
            if not hasattr(Task, key) or key.startswith("_"):
                raise UsageError(f"unknown task option {key!r} for {name}")
            setattr(self, key, value)
        try:  # the checks remote control applies (qops/values.py): no crash loops
            time_limits(self.soft_time_limit, self.time_limit)
            parse_rate(self.rate_limit)
        except UsageError as exc:
            raise UsageError(f"task {name}: {exc}") from None
        if isinstance(self.autoretry_for, type):
            self.autoretry_for = (self.autoretry_for,)
        self._local = threading.local()
        self.__doc__ = fun.__doc__
        self.__name__ = getattr(fun, "__name__", name)
        self.__module__ = getattr(fun, "__module__", "")
        self.__wrapped__ = fun
        self._signature = inspect.signature(fun)
        #: (fewest, most) positional arguments, most None for ``*args``; None when a
        #: keyword-only argument is required
        self.positional = _positional_bounds(self._signature, skip=1 if bind else 0)

    def __repr__(self) -> str:
        return f"<@task: {self.name}>"

    # -- running ---------------------------------------------------------------------
    @property
    def request(self) -> Context:
        stack = getattr(self._local, "stack", None)
        return stack[-1] if stack else Context()

    def push_request(self, context: Context) -> None:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        self._local.stack.append(context)

    def pop_request(self) -> None:
        self._local.stack.pop()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.bind:
            return self.run(self, *args, **kwargs)
        return self.run(*args, **kwargs)

    def check_arguments(self, args: Iterable[Any], kwargs: dict[str, Any]) -> None:
        """Raise TypeError when ``args``/``kwargs`` don't fit the function."""
        if not self.typing:
            return
        if not kwargs and self.positional is not None:
            # the common case, checked without building a BoundArguments
            low, high = self.positional
            n = len(args) if isinstance(args, (list, tuple)) else len(list(args))
            if low <= n and (high is None or n <= high):
                return
        pre = (None,) if self.bind else ()
        self._signature.bind(*pre, *args, **kwargs)

    # -- sending ---------------------------------------------------------------------
    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Iterable[Any] | None = None,
                    kwargs: dict[str, Any] | None = None, **options: Any) -> AsyncResult:
        return self.app.publish(self.message(args, kwargs, **options))

    def message(self, args: Iterable[Any] | None = None, kwargs: dict[str, Any] | None = None,
                **options: Any) -> tuple[str, Message] | AsyncResult:
        """The (queue, message) ``apply_async`` would publish (``App.task_message``)."""
        return self._outgoing(options).build(*self._arguments(args, kwargs))

    def apply_many(self, calls: Iterable[tuple[Any, ...]], **options: Any) -> list[AsyncResult]:
        """Send many calls of this task in one batch (``App.send_many``): each item of
        ``calls`` is ``(args, kwargs)`` or ``(args, kwargs, options)``; ``options``
        apply to all, an item's own options win. Returns the AsyncResults in order once
        the broker confirmed every message, else raises PublishManyError."""
        shared = self._outgoing(dict(options))

        def build(index: int, call: Any) -> tuple[str, Message] | AsyncResult:
            if not isinstance(call, (tuple, list)) or len(call) not in (2, 3):
                raise UsageError(f"{self.name}.apply_many takes (args, kwargs) or (args, "
                                 f"kwargs, options) items: item {index} is {call!r:.60}")
            out = self._outgoing({**options, **call[2]}) if len(call) == 3 and call[2] \
                else shared
            return out.build(*self._arguments(call[0], call[1]))

        return bulk_send(self.app, lambda: [build(i, c) for i, c in enumerate(calls)])

    def delay_many(self, calls: Iterable[Iterable[Any]], **options: Any) -> list[AsyncResult]:
        """``apply_many`` for positional arguments only: ``add.delay_many([(1, 2),
        (3, 4)])`` sends ``add(1, 2)`` and ``add(3, 4)`` in one batch."""
        out = self._outgoing(options)

        def build(index: int, args: Any) -> tuple[str, Message] | AsyncResult:
            if isinstance(args, (str, bytes)) or not isinstance(args, Iterable):
                raise UsageError(f"{self.name}.delay_many takes an iterable of argument "
                                 f"tuples, e.g. [(1,), (2,)]: item {index} is {args!r:.60}")
            return out.build(*self._arguments(args, None))

        return bulk_send(self.app, lambda: [build(i, a) for i, a in enumerate(calls)])

    def _arguments(self, args: Iterable[Any] | None, kwargs: dict[str, Any] | None
                   ) -> tuple[list[Any], dict[str, Any]]:
        """(args, kwargs) to send, checked against the function."""
        args = list(args or ())
        kwargs = dict(kwargs or {})
        if self.typing:
            try:
                self.check_arguments(args, kwargs)
            except TypeError as exc:
                raise TypeError(f"{self.name}: {exc}") from None
        return args, kwargs

    def _outgoing(self, options: dict[str, Any]) -> Outgoing:
        """``App.outgoing`` for ``options`` (changed in place) with the task's own
        defaults and the parent task (if any) added."""
        for key, attr in (("time_limit", self.time_limit),
                          ("soft_time_limit", self.soft_time_limit),
                          ("priority", self.priority)):
            if attr is not None:
                options.setdefault(key, attr)
        if self.ignore_result is not None:
            options.setdefault("ignore_result", self.ignore_result)
        # Called from inside a running task: the new task is its child.
        parent = self.app.current_request()
        if parent is not None and parent.id:
            options.setdefault("parent_id", parent.id)
            options.setdefault("root_id", parent.root_id or parent.id)
        options["task"] = self
        return self.app.outgoing(self.name, **options)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        return Signature(self.name, args, kwargs, app=self.app)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        return Signature(self.name, args, kwargs, immutable=True, app=self.app)

    def signature(self, args: Iterable[Any] | None = None, kwargs: dict[str, Any] | None = None,
                  **options: Any) -> Signature:
        return Signature(self.name, args, kwargs, options=options, app=self.app)

    subtask = signature

    def delay_on_commit(self, *args: Any, **kwargs: Any) -> None:
        """``delay`` once the current Django transaction commits; never if it rolls back
        (Celery 5.4's ``delay_on_commit``). Needs Django; returns None (no id yet)."""
        self.apply_async_on_commit(args, kwargs)

    def apply_async_on_commit(self, args: Iterable[Any] | None = None,
                              kwargs: dict[str, Any] | None = None,
                              using: str | None = None, **options: Any) -> None:
        """``apply_async`` once the current Django transaction (of database ``using``)
        commits. Bad arguments raise here, not at the commit."""
        args, kwargs = list(args or ()), dict(kwargs or {})
        if self.typing:
            try:
                self.check_arguments(args, kwargs)
            except TypeError as exc:
                raise TypeError(f"{self.name}: {exc}") from None
        _on_commit(lambda: self.apply_async(args, kwargs, **options), using)

    def AsyncResult(self, task_id: str) -> AsyncResult:  # noqa: N802 - Celery's name
        return self.app.AsyncResult(task_id)

    def retry(self, args: Iterable[Any] | None = None, kwargs: dict[str, Any] | None = None,
              exc: BaseException | None = None, throw: bool = True,
              countdown: float | None = None, eta: dt.datetime | None = None,
              max_retries: int | None = None) -> Retry:
        """Ask the worker to run this task again later (raises Retry)."""
        req = self.request
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and req.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceeded(
                f"Can't retry {self.name}[{req.id}] args:{req.args} kwargs:{req.kwargs}")
        if eta is not None:
            if eta.tzinfo is None:
                eta = eta.replace(tzinfo=dt.timezone.utc)
            when = max(0.0, (eta - dt.datetime.now(dt.timezone.utc)).total_seconds())
        else:
            when = self.default_retry_delay if countdown is None else countdown
        err = Retry(exc=exc, when=when)
        err.args_override = None if args is None else list(args)  # type: ignore[attr-defined]
        err.kwargs_override = None if kwargs is None else dict(kwargs)  # type: ignore[attr-defined]
        if throw:
            raise err
        return err

    def backoff_delay(self, retries: int) -> float:
        """Countdown for autoretry: exponential when retry_backoff is set."""
        if not self.retry_backoff:
            return self.default_retry_delay
        factor = 1.0 if self.retry_backoff is True else float(self.retry_backoff)
        delay = min(factor * (2 ** retries), float(self.retry_backoff_max))
        if self.retry_jitter:
            delay = random.uniform(0, delay)
        return delay


def _on_commit(fun: Callable[[], Any], using: str | None = None) -> None:
    """Django's ``transaction.on_commit(fun)``: run ``fun`` once the current transaction
    commits (at once outside one; never if it rolls back)."""
    try:
        from django.db import transaction
    except ImportError:
        raise UsageError("delay_on_commit and apply_async_on_commit need Django "
                         "(django.db.transaction.on_commit); without Django, use delay "
                         "or apply_async") from None
    try:
        transaction.on_commit(fun, using=using)
    except Exception as exc:  # ImproperlyConfigured: settings not configured
        if type(exc).__name__ != "ImproperlyConfigured":
            raise
        raise UsageError(f"delay_on_commit: Django is not configured: "
                         f"{str(exc).splitlines()[0]}") from None


def _positional_bounds(sig: inspect.Signature, skip: int) -> tuple[int, int | None] | None:
    """(fewest, most) positional arguments the function takes, or None when keyword-only
    parameters without defaults make positional calls alone insufficient."""
    params = list(sig.parameters.values())[skip:]
    low, high = 0, 0
    unbounded = False
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            high += 1
            if p.default is p.empty:
                low = high
        elif p.kind is p.VAR_POSITIONAL:
            unbounded = True
        elif p.kind is p.KEYWORD_ONLY and p.default is p.empty:
            return None
    return low, None if unbounded else high


class Signature(dict[str, Any]):
    """A task call that can be sent later: ``add.s(2, 2)``. It is a dict so it travels
    in messages as docs/protocol.md §1.3 describes."""

    def __init__(self, task: str | dict[str, Any], args: Iterable[Any] | None = None,
                 kwargs: dict[str, Any] | None = None, options: dict[str, Any] | None = None,
                 immutable: bool = False, subtask_type: str | None = None,
                 app: App | None = None, **extra: Any) -> None:
        if isinstance(task, dict):
            super().__init__(task)
            self.setdefault("args", [])
            self.setdefault("kwargs", {})
            self.setdefault("options", {})
            self.setdefault("subtask_type", None)
            self.setdefault("immutable", False)
        else:
            super().__init__(task=task, args=list(args or ()), kwargs=dict(kwargs or {}),
                             options=dict(options or {}, **extra), subtask_type=subtask_type,
                             immutable=immutable)
        self._app = app

    @property
    def name(self) -> str:
        return str(self["task"])

    @property
    def task(self) -> str:
        return str(self["task"])

    @property
    def args(self) -> list[Any]:
        return list(self["args"])

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self["kwargs"])

    @property
    def options(self) -> dict[str, Any]:
        return dict(self["options"])

    @property
    def immutable(self) -> bool:
        return bool(self["immutable"])

    @property
    def app(self) -> App:
        if self._app is None:
            from qops.app import app_for_task

            self._app = app_for_task(self.name)
        return self._app

    def clone(self, args: Iterable[Any] | None = None, kwargs: dict[str, Any] | None = None,
              **options: Any) -> Signature:
        """A copy with ``args`` prepended (unless immutable) and options merged."""
        new_args = self.args if self.immutable else [*(args or ()), *self.args]
        new_kwargs = self.kwargs if self.immutable else {**self.kwargs, **(kwargs or {})}
        return Signature(self.name, new_args, new_kwargs, options={**self.options, **options},
                         immutable=self.immutable, subtask_type=self.get("subtask_type"),
                         app=self._app)

    def set(self, **options: Any) -> Signature:
        self["options"] = {**self.options, **options}
        return self

    def set_immutable(self, immutable: bool) -> None:
        self["immutable"] = immutable

    def link(self, callback: dict[str, Any]) -> dict[str, Any]:
        self["options"].setdefault("link", []).append(dict(callback))
        return callback

    def link_error(self, errback: dict[str, Any]) -> dict[str, Any]:
        self["options"].setdefault("link_error", []).append(dict(errback))
        return errback

    def apply_async(self, args: Iterable[Any] | None = None,
                    kwargs: dict[str, Any] | None = None, **options: Any) -> AsyncResult:
        return self.app.publish(self.message(args, kwargs, **options))

    def message(self, args: Iterable[Any] | None = None, kwargs: dict[str, Any] | None = None,
                **options: Any) -> tuple[str, Message] | AsyncResult:
        """The (queue, message) ``apply_async`` would publish (``App.task_message``)."""
        sig = self.clone(args, kwargs)
        opts = {**send_options(sig.options), **options}
        task = self.app.tasks.get(sig.name)
        if task is not None:
            return task.message(sig.args, sig.kwargs, **opts)
        return self.app.task_message(sig.name, sig.args, sig.kwargs, **opts)

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return self.apply_async(args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sig = self.clone(args, kwargs)
        return self.app.tasks[sig.name](*sig.args, **sig.kwargs)

    def __or__(self, other: Any) -> Any:
        from qops.canvas import chain

        return chain(self, other)

    def __repr__(self) -> str:
        args = ", ".join([*map(repr, self["args"]),
                          *(f"{k}={v!r}" for k, v in self["kwargs"].items())])
        return f"{self.name}({args}){'!' if self.immutable else ''}"


def signature(varies: Any, *args: Any, **kwargs: Any) -> Signature:
    """``signature('proj.add', args=(2, 2))`` or a signature dict -> Signature."""
    if isinstance(varies, Signature):
        return varies
    if isinstance(varies, dict) and not args and not kwargs:
        return _from_dict(varies)
    return Signature(varies, *args, **kwargs)


def _from_dict(d: dict[str, Any], app: App | None = None) -> Signature:
    if d.get("subtask_type") == "chain":
        from qops.canvas import chain

        return chain.from_dict(d, app=app)
    return Signature(d, app=app)


def new_task_id() -> str:
    from qops.ids import new_id

    return new_id()
