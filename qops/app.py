"""App: settings, the task registry, routing and sending (finding the app for -A: loading.py)."""

from __future__ import annotations

import datetime as dt
import fnmatch
import importlib
import os
import threading
import traceback as tb_mod
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

from qops import protocol
from qops.backends.base import FAILURE, SUCCESS, ResultBackend, backend_from_url
from qops.errors import ConfigError, NoResultBackend, PublishManyError, UsageError
from qops.outgoing import Outgoing, Recent, Sending
from qops.result import AsyncResult
from qops.settings import Settings, default_broker_url
from qops.signing import Signer, task_signer
from qops.task import Context, Signature, Task, bulk_send, send_options
from qops.transports.base import Transport, TransportOptions, from_url
from qops.transports.declare import Declarations

if TYPE_CHECKING:
    from qops.control import Control

# Names on the wire for each compatibility preset (docs/protocol.md).
NAMES = {
    "qops": {"queue": "qops", "mailbox": "qops.pidbox", "events": "qopsev",
             "result_prefix": "qops-task-meta-", "registry": "qops.nodes"},
    "celery": {"queue": "celery", "mailbox": "celery.pidbox", "events": "celeryev",
               "result_prefix": "celery-task-meta-", "registry": "qops.nodes.celery"},
}

_apps: list[App] = []
_UNSET = object()  # a lazily made attribute not made yet
_running = threading.local()  # stack of Context for tasks running in this thread


def app_for_task(name: str) -> App:
    """The newest app that has task ``name`` registered, else the current app."""
    for app in reversed(_apps):
        if name in app.tasks:
            return app
    return current_app()


def all_apps() -> list[App]:
    """Every App made in this process, oldest first."""
    return list(_apps)


def current_app() -> App:
    if not _apps:
        return App("default")
    return _apps[-1]


class App:
    """A qops application: ``app = App('proj', broker='redis://...')``."""

    def __init__(self, main: str | None = None, *, broker: str | None = None,
                 backend: str | None = None, include: Iterable[str] | None = None,
                 config_source: Any = None, namespace: str | None = None,
                 **settings: Any) -> None:
        self.main = main or "__main__"
        self.conf = Settings()
        self.tasks: dict[str, Task] = {}
        if config_source is not None:
            self.conf.config_from_object(config_source, namespace=namespace)
        if broker:
            self.conf.set("broker_url", broker, source="App(broker=...)")
        if backend:
            self.conf.set("result_backend", backend, source="App(backend=...)")
        if include:
            self.conf.set("include", list(include), source="App(include=...)")
        self.conf.update(settings, source="App(...)", strict=True)
        self._transport: Transport | None = None
        self._backend: ResultBackend | None = None
        self._task_signer: object = _UNSET
        self._sending: Sending | None = None
        self._recent = Recent()
        self._pid = os.getpid()
        self._lock = threading.Lock()
        from qops.builtins import register_builtins
        from qops.signals import Signal

        self.on_after_configure = Signal("on_after_configure")
        self.on_after_finalize = Signal("on_after_finalize")
        register_builtins(self)
        #: what autodiscover_tasks() asked for: (packages, related_name), imported by
        #: import_modules()
        self._autodiscover: list[tuple[Any, str | None]] = []
        _apps.append(self)
        from qops.shared import attach_all

        attach_all(self)  # the @shared_task functions declared before this app

    def __repr__(self) -> str:
        return f"<qops.App {self.main}>"

    # -- configuration ---------------------------------------------------------------
    def config_from_object(self, obj: Any, namespace: str | None = None) -> None:
        self.conf.config_from_object(obj, namespace=namespace)
        self._reset_connections()

    @property
    def names(self) -> dict[str, str]:
        compat = self.conf.compat
        if compat not in NAMES:
            raise ConfigError(f"compat must be 'qops' or 'celery', not {compat!r}")
        return NAMES[compat]

    @property
    def default_queue(self) -> str:
        return str(self.conf.task_default_queue or self.names["queue"])

    @property
    def broker_url(self) -> str:
        url = self.conf.broker_url
        return default_broker_url() if url is None else str(url)  # "" is an error, later

    @property
    def result_backend_url(self) -> str | None:
        url = self.conf.result_backend
        if url:
            return str(url)
        if self.broker_url.startswith("sqlite:"):
            return self.broker_url  # results live in the same file
        return None

    def transport_options(self) -> TransportOptions:
        c = self.conf
        interval, ttl = float(c.worker_heartbeat_interval), float(c.worker_heartbeat_ttl)
        if interval >= ttl:  # each node would look dead between two of its heartbeats
            raise ConfigError(f"setting 'worker_heartbeat_interval' ({interval:g}, "
                              f"{c.source('worker_heartbeat_interval')}) must be less than "
                              f"'worker_heartbeat_ttl' ({ttl:g}, {c.source('worker_heartbeat_ttl')})")
        return TransportOptions(
            heartbeat_interval=interval,
            heartbeat_ttl=ttl,
            max_message_size=int(c.task_max_message_size),
            connect_timeout=float(c.broker_connection_timeout),
            extra=dict(c.broker_transport_options or {}),
            failover_strategy=str(c.broker_failover_strategy),
            declarations=self.declarations(),
            registry=self.names["registry"],
        )

    def declarations(self) -> Declarations:
        """How this app's work queues are declared on RabbitMQ: as Celery (kombu) would
        with the same settings under the celery preset (docs/protocol.md §3.1)."""
        c = self.conf
        celery = self.names is NAMES["celery"]
        return Declarations(
            default_queue=self.default_queue,
            default_type=str(c.task_default_queue_type),
            other_type=str(c.task_create_missing_queue_type),
            max_priority=c.task_queue_max_priority or None,
            exchanges=celery,
            default_exchange=c.task_default_exchange or None,
            default_exchange_type=str(c.task_default_exchange_type),
            default_routing_key=c.task_default_routing_key or None,
            detect_quorum=bool(c.worker_detect_quorum_queues),
        )

    # -- connections (made on first use, again after a fork) -------------------------------
    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            # A forked child must not share the parent's sockets.
            self._transport = None
            self._backend = None
            self._pid = os.getpid()

    def _reset_connections(self) -> None:
        self.close()

    @property
    def transport(self) -> Transport:
        self._check_fork()
        with self._lock:
            if self._transport is None:
                self._transport = from_url(self.broker_url, self.transport_options())
            return self._transport

    @property
    def backend(self) -> ResultBackend:
        self._check_fork()
        with self._lock:
            if self._backend is None:
                url = self.result_backend_url
                if not url:
                    raise NoResultBackend(
                        "no result backend is configured: set result_backend "
                        "(e.g. App(..., backend='redis://localhost:6379/1'), "
                        "QOPS_RESULT_BACKEND or --result-backend)")
                transport = None
                if url.startswith("rpc:"):
                    transport = self._transport_unlocked()
                self._backend = backend_from_url(
                    url, expires=self.conf.result_expires,
                    prefix=self.names["result_prefix"], transport=transport,
                    options=dict(self.conf.result_backend_transport_options or {}))
            return self._backend

    def _transport_unlocked(self) -> Transport:
        if self._transport is None:
            self._transport = from_url(self.broker_url, self.transport_options())
        return self._transport

    def preload(self) -> None:
        """Import the transport and backend modules without connecting (before a
        privilege drop that may make the Python installation unreadable)."""
        from qops.backends.base import backend_class
        from qops.transports.base import transport_class

        cls = transport_class(self.broker_url)
        getattr(cls, "preload", lambda: None)()
        if self.result_backend_url:
            backend_class(self.result_backend_url)

    @property
    def has_backend(self) -> bool:
        return bool(self.result_backend_url)

    @property
    def task_signer(self) -> Signer | None:
        """The signer of this app's task messages (None unless ``task_signing``): made
        once, like the transport, and again after ``close()``."""
        if self._task_signer is _UNSET:
            self._task_signer = task_signer(self)
        return cast("Signer | None", self._task_signer)

    def close(self) -> None:
        self._task_signer = _UNSET
        self._recent.clear()
        with self._lock:
            if self._transport is not None:
                self._transport.close()
            if self._backend is not None:
                self._backend.close()
            self._transport = None
            self._backend = None

    # -- tasks ---------------------------------------------------------------------------
    def task(self, *args: Any, **options: Any) -> Any:
        """``@app.task`` or ``@app.task(name=..., bind=True, queue=..., ...)``."""

        def register(fun: Callable[..., Any]) -> Task:
            name = options.pop("name", None) or self.gen_task_name(fun)
            task = Task(self, fun, name=name, **options)
            self.tasks[name] = task
            return task

        if len(args) == 1 and callable(args[0]) and not options:
            return register(args[0])
        if args:
            raise UsageError("@app.task takes keyword options only")
        return register

    def add_periodic_task(self, schedule: Any, sig: Any, args: Any = (), kwargs: Any = (),
                          name: str | None = None, **options: Any) -> str:
        """Add a beat entry from code (``@app.on_after_configure.connect`` style)."""
        from qops.beat import add_periodic_task

        return add_periodic_task(self, schedule, sig, args, kwargs, name, **options)

    def gen_task_name(self, fun: Callable[..., Any]) -> str:
        module = fun.__module__
        if module == "__main__":
            module = self.main
        return f"{module}.{fun.__name__}"

    def import_modules(self) -> list[str]:
        """Import ``imports`` and ``include``, then what ``autodiscover_tasks`` asked
        for, so their tasks register (Django set up first when DJANGO_SETTINGS_MODULE
        is set). Returns the module names."""
        from qops.discovery import discover, django_setup

        django_setup()
        names = [*self.conf.imports, *self.conf.include]
        for name in names:
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise ConfigError(f"cannot import task module {name!r}: {exc}") from exc
        for packages, related_name in self._autodiscover:
            names += discover(packages, related_name)
        return names

    def autodiscover_tasks(self, packages: Any = None, related_name: str | None = "tasks",
                           force: bool = False) -> None:
        """Import ``<package>.tasks`` of each package (a list, or a callable returning
        one), as Celery: lazily, when a worker imports the task modules, unless
        ``force``. No packages: those of Django's installed apps."""
        if force:
            from qops.discovery import discover

            discover(packages, related_name)
        else:
            self._autodiscover.append((packages, related_name))

    def rate_limit_for(self, task: Task) -> str | None:
        ann = self._annotation(task.name)
        if "rate_limit" in ann:
            return str(ann["rate_limit"])
        return task.rate_limit or self.conf.task_default_rate_limit

    def _annotation(self, name: str) -> dict[str, Any]:
        anns = self.conf.task_annotations or {}
        merged: dict[str, Any] = {}
        if isinstance(anns, dict):
            merged.update(anns.get("*", {}))
            merged.update(anns.get(name, {}))
        return merged

    def option_for(self, task: Task, key: str, setting: str) -> Any:
        """A task option: annotation > the task's own value > the app setting."""
        ann = self._annotation(task.name)
        if key in ann:
            return ann[key]
        value = getattr(task, key, None)
        return self.conf.get(setting) if value is None else value

    # -- routing and sending ---------------------------------------------------------------
    def _sending_conf(self) -> Sending:
        """The settings every send reads, read again only when a setting changed."""
        sc = self._sending
        version = self.conf.version
        if sc is None or sc.version != version:
            c = self.conf
            sc = self._sending = Sending(
                version, bool(c.task_always_eager), c.task_default_priority,
                bool(c.task_ignore_result), c.task_routes, self.default_queue,
                self.has_backend, c.task_compression)
        return sc

    def route(self, name: str, queue: str | None = None, task: Task | None = None) -> str:
        return self._route(self._sending_conf(), name, queue, task)

    @staticmethod
    def _route(sc: Sending, name: str, queue: str | None, task: Task | None) -> str:
        if queue:
            return queue
        routes = sc.routes or {}
        for pattern, target in routes.items():
            if pattern == name or fnmatch.fnmatchcase(name, pattern):
                if isinstance(target, str):
                    return target
                if isinstance(target, dict) and target.get("queue"):
                    return str(target["queue"])
        if task is not None and task.queue:
            return task.queue
        return sc.default_queue

    def send_task(self, name: str, args: Iterable[Any] | None = None,
                  kwargs: dict[str, Any] | None = None, **options: Any) -> AsyncResult:
        """Send a task by name; returns its AsyncResult. ``options``: those of
        ``outgoing``. Never drops silently: raises PublishError/BrokerUnreachable
        when the broker did not take the message."""
        return self.publish(self.task_message(name, args, kwargs, **options))

    def publish(self, built: tuple[str, protocol.Message] | AsyncResult) -> AsyncResult:
        """Publish one ``task_message`` result (an eager result is returned as it is)."""
        if isinstance(built, AsyncResult):  # task_always_eager: it ran here
            return built
        queue, message = built
        self.transport.publish(queue, message)
        return AsyncResult(message.headers["id"], app=self)

    def send_many(self, signatures: Iterable[Signature | dict[str, Any]],
                  **options: Any) -> list[AsyncResult]:
        """Send many tasks at once: each signature as ``sig.apply_async(**options)``
        would, in one batch (Redis: pipelined; RabbitMQ: published together, then
        confirmed; SQLite: one transaction). Returns their AsyncResults in order once
        the broker has confirmed every message, or raises PublishManyError naming the
        ones it did not confirm (docs/guarantees.md). Plain task signatures only: send
        a chain, group or chord with its own ``apply_async``."""
        def build(sig: Signature | dict[str, Any]) -> tuple[str, protocol.Message] | AsyncResult:
            sig = sig if isinstance(sig, Signature) else Signature(sig, app=self)
            if sig.get("subtask_type") in ("chain", "group", "chord"):
                raise UsageError(f"send_many sends task signatures, not a "
                                 f"{sig['subtask_type']}: use its apply_async()")
            return sig.message(**options)

        return bulk_send(self, lambda: [build(sig) for sig in signatures])

    def publish_many(self, built: list[tuple[str, protocol.Message] | AsyncResult]
                     ) -> list[AsyncResult]:
        """Publish ``task_message`` results in one batch; their AsyncResults in order
        (eager results as they are). PublishManyError's ``unconfirmed`` are indexes
        into ``built``, its ``task_ids`` their ids."""
        items: list[tuple[str, protocol.Message]] = []
        where: list[int] = []  # index in built of each item
        for index, b in enumerate(built):
            if not isinstance(b, AsyncResult):
                items.append(b)
                where.append(index)
        if items:
            try:
                self.transport.publish_many(items)
            except PublishManyError as exc:
                exc.task_ids = [items[i][1].headers["id"] for i in exc.unconfirmed]
                exc.unconfirmed = [where[i] for i in exc.unconfirmed]
                raise
        return [b if isinstance(b, AsyncResult) else AsyncResult(b[1].headers["id"], app=self)
                for b in built]

    def task_message(self, name: str, args: Iterable[Any] | None = None,
                     kwargs: dict[str, Any] | None = None,
                     **options: Any) -> tuple[str, protocol.Message] | AsyncResult:
        """The (queue, message) ``send_task`` publishes for these options (those of
        ``outgoing``), signed when ``task_signing`` is on; with ``task_always_eager``,
        the AsyncResult of the task run here instead."""
        return self.outgoing(name, **options).build(list(args or ()), dict(kwargs or {}))

    def outgoing(self, name: str, *, countdown: float | None = None,
                 eta: dt.datetime | None = None, expires: float | dt.datetime | None = None,
                 queue: str | None = None, priority: int | None = None,
                 task_id: str | None = None, link: Any = None, link_error: Any = None,
                 time_limit: float | None = None, soft_time_limit: float | None = None,
                 ignore_result: bool | None = None, parent_id: str | None = None,
                 root_id: str | None = None, chain: list[dict[str, Any]] | None = None,
                 group: str | None = None, group_index: int | None = None,
                 chord: dict[str, Any] | None = None, shadow: str | None = None,
                 retries: int = 0, reply_to: str | None = None, task: Task | None = None,
                 compression: str | None = None, **unknown: Any) -> Outgoing:
        """The messages of task ``name`` sent with these options: settings, routing, the
        result backend's reply queue, countdown and expiry resolved once (a bulk send
        builds each message from one of these)."""
        if unknown:
            raise UsageError(f"unknown option(s) for sending {name}: {', '.join(sorted(unknown))}")
        task = task or self.tasks.get(name)
        if countdown is not None or isinstance(expires, (int, float)):
            now = dt.datetime.now(dt.timezone.utc)
            if countdown is not None:
                eta = now + dt.timedelta(seconds=float(countdown))
            if isinstance(expires, (int, float)):
                expires = now + dt.timedelta(seconds=float(expires))
        sc = self._sending_conf()
        target = self._route(sc, name, queue, task)
        if sc.always_eager and task is not None:
            return Outgoing(self, target, None, task_id, eager=task)
        if ignore_result is None:
            ignore_result = sc.ignore_result
        # A worker re-sending a task (retry, chain link) passes the original client's
        # reply_to along; only a new send asks the backend (rpc opens its reply queue).
        if reply_to is None and sc.has_backend and not ignore_result:
            reply_to = self.backend.prepare_send()
        priority = sc.default_priority if priority is None else priority
        compression = compression or sc.compression
        # a plain send (a delay() in a loop) gets the Outgoing of the last one like it
        key = None
        if eta is expires is task_id is link is link_error is chain is chord is \
                parent_id is root_id is group is group_index is None and not retries:
            key = (name, target, priority, time_limit, soft_time_limit, ignore_result,
                   shadow, reply_to, compression, sc.version, os.getpid())
            out = self._recent.get(key)
            if out is not None:
                return out
        messages = protocol.TaskMessages(
            name, task_id=task_id, eta=eta, expires=expires, retries=retries,
            time_limit=time_limit, soft_time_limit=soft_time_limit, root_id=root_id,
            parent_id=parent_id, group=group, group_index=group_index,
            callbacks=_sig_list(link), errbacks=_sig_list(link_error), chain=chain,
            chord=chord, reply_to=reply_to, priority=priority, shadow=shadow,
            ignore_result=ignore_result)
        out = Outgoing(self, target, messages, task_id, signer=self.task_signer,
                       compression=compression)
        if key is not None:
            self._recent.put(key, out)
        return out

    def send_signature(self, sig: Signature | dict[str, Any], **extra: Any) -> AsyncResult:
        sig = sig if isinstance(sig, Signature) else Signature(sig, app=self)
        options = send_options(sig.options)
        options.update(extra)
        return self.send_task(sig.name, sig.args, sig.kwargs, task=self.tasks.get(sig.name),
                              **options)

    def _apply_eager(self, task: Task, args: list[Any], kwargs: dict[str, Any],
                     task_id: str | None) -> AsyncResult:
        from qops.backends.memory import MemoryBackend

        tid = task_id or protocol.build_task_message(task.name).headers["id"]
        backend = MemoryBackend(f"memory://eager-{id(self)}", expires=None)
        self.push_request(Context(id=tid, args=args, kwargs=kwargs, is_eager=True))
        task.push_request(Context(id=tid, args=args, kwargs=kwargs, is_eager=True))
        try:
            value = task(*args, **kwargs)
            backend.store(tid, SUCCESS, value)
        except Exception as exc:
            backend.store(tid, FAILURE, exc, tb_mod.format_exc())
        finally:
            task.pop_request()
            self.pop_request()
        return AsyncResult(tid, app=self, backend=backend)

    def AsyncResult(self, task_id: str) -> AsyncResult:  # noqa: N802 - Celery's name
        return AsyncResult(task_id, app=self)

    @property
    def control(self) -> Control:
        """Remote control from code: ``app.control.revoke(task_id)`` (qops/control.py)."""
        from qops.control import Control

        return Control(self)

    def signature(self, name: str, args: Iterable[Any] | None = None,
                  kwargs: dict[str, Any] | None = None, **options: Any) -> Signature:
        return Signature(name, args, kwargs, options=options, app=self)

    # -- the task running in this thread (for child tasks' parent_id) ---------------------
    @staticmethod
    def push_request(ctx: Context) -> None:
        if not hasattr(_running, "stack"):
            _running.stack = []
        _running.stack.append(ctx)

    @staticmethod
    def pop_request() -> None:
        _running.stack.pop()

    @staticmethod
    def current_request() -> Context | None:
        stack = getattr(_running, "stack", None)
        return stack[-1] if stack else None


def _sig_list(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return [dict(value)]
    return [dict(v) for v in value]
