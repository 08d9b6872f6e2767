"""``@shared_task``: a task that belongs to no app in particular, as Celery's.

Reusable code (a Django app's ``tasks.py``) cannot import the project's app, so it
declares its tasks with ``@shared_task``. Each is registered on every App, those that
exist now and those made later, and the name it returns stands for the task of the
current app (``qops.current_app``: the newest App), looked up at each use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qops.errors import UsageError

if TYPE_CHECKING:
    from qops.app import App
    from qops.task import Task

#: every shared task declared so far: (function, its @shared_task options)
_declared: list[tuple[Callable[..., Any], dict[str, Any]]] = []
_lock = threading.Lock()


def shared_task(*args: Any, **options: Any) -> Any:
    """``@shared_task`` or ``@shared_task(bind=True, name=..., queue=..., ...)``: the
    options are those of ``@app.task``."""

    def declare(fun: Callable[..., Any]) -> SharedTask:
        from qops.app import all_apps

        with _lock:
            _declared.append((fun, dict(options)))
        for app in all_apps():
            attach(app, fun, options)
        return SharedTask(fun, options)

    if len(args) == 1 and callable(args[0]) and not options:
        return declare(args[0])
    if args:
        raise UsageError("@shared_task takes keyword options only")
    return declare


def attach(app: App, fun: Callable[..., Any], options: dict[str, Any]) -> Task:
    """Register a shared task on ``app`` (once: an app keeps the one it has)."""
    name = options.get("name") or app.gen_task_name(fun)
    task = app.tasks.get(name)
    if task is None or task.run is not fun:
        task = app.task(**options)(fun) if options else app.task(fun)
    return task


def attach_all(app: App) -> None:
    """Register every shared task declared so far on a new ``app`` (App.__init__)."""
    with _lock:
        declared = list(_declared)
    for fun, options in declared:
        attach(app, fun, options)


class SharedTask:
    """What ``@shared_task`` returns: the current app's task of that function. Calling
    it runs the function here; every other attribute (``delay``, ``apply_async``,
    ``s``, ``name``, ``delay_on_commit``...) is the current app's task's."""

    def __init__(self, fun: Callable[..., Any], options: dict[str, Any]) -> None:
        self.__wrapped__ = fun
        self.__doc__ = fun.__doc__
        self.__name__ = getattr(fun, "__name__", "task")
        self.__module__ = getattr(fun, "__module__", "")
        self._options = options

    def _get_current_object(self) -> Task:
        """The task on the current app (registered there now if the app was made
        in a way that skipped it)."""
        from qops.app import current_app

        return attach(current_app(), self.__wrapped__, self._options)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._get_current_object(), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._get_current_object()(*args, **kwargs)

    def __repr__(self) -> str:
        return repr(self._get_current_object())
