"""The built-in tasks every App registers: Celery's ``celery.*`` tasks, by Celery's names
and arguments (celery/app/builtins.py), written for qops. A Celery client sends some of
them (``chord_unlock``, ``map``, ``starmap``, ``chunks``, ``backend_cleanup``, ...), and a
chain step that is a group or chord may arrive as one by name.

Where Celery's version is a stub (``celery.chain`` raises NotImplementedError), qops's
runs the workflow: the signature dicts it gets carry everything needed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qops.app import App

CHAIN, GROUP, CHORD = "celery.chain", "celery.group", "celery.chord"
CHORD_UNLOCK = "celery.chord_unlock"
MAP, STARMAP, CHUNKS = "celery.map", "celery.starmap", "celery.chunks"
ACCUMULATE, BACKEND_CLEANUP = "celery.accumulate", "celery.backend_cleanup"
NAMES = frozenset({CHAIN, GROUP, CHORD, CHORD_UNLOCK, MAP, STARMAP, CHUNKS, ACCUMULATE,
                   BACKEND_CLEANUP})


def is_builtin(name: str) -> bool:
    """Whether ``name`` is one of these built-in tasks (left out of task listings)."""
    return name in NAMES


def _local_task(app: App, sig: Any) -> Any:
    """The registered task a map signature names (it runs here, in this task)."""
    from qops.errors import NotRegistered
    from qops.task import Signature

    name = Signature(sig).name if isinstance(sig, dict) else str(sig)
    task = app.tasks.get(name)
    if task is None:
        raise NotRegistered(f"unknown task {name!r} (not registered on this worker)")
    return task


def _chunked(it: Iterable[Any], n: int) -> list[list[Any]]:
    items = list(it)
    return [items[i:i + n] for i in range(0, len(items), max(1, int(n)))]


def register_builtins(app: App) -> None:
    """Register the ``celery.*`` built-in tasks on ``app`` (App.__init__ calls this)."""
    if CHORD_UNLOCK in app.tasks:
        return
    from qops import chords
    from qops.canvas import chain, chord, group, maybe_signature

    def run_chain(*args: Any, tasks: list[dict[str, Any]], **_: Any) -> None:
        chain(*[maybe_signature(t, app) for t in tasks], app=app).apply_async(args)

    def run_group(self: Any, *args: Any, tasks: list[dict[str, Any]], result: Any = None,
                  group_id: str | None = None, partial_args: Any = (),
                  add_to_parent: bool = True, **_: Any) -> Any:
        gid = group_id or self.request.id
        g = group([maybe_signature(t, app) for t in tasks], app=app)
        return g.apply_async([*args, *(partial_args or ())], task_id=gid).id

    def run_chord(*args: Any, header: Any, body: Any = None, partial_args: Any = (),
                  kwargs: dict[str, Any] | None = None, **_: Any) -> Any:
        head = maybe_signature(header, app) if isinstance(header, dict) else \
            group([maybe_signature(t, app) for t in header], app=app)
        c = chord(head, body and maybe_signature(body, app), app=app)
        return c.apply_async([*args, *(partial_args or ())], kwargs).id

    def chord_unlock(self: Any, group_id: str, callback: dict[str, Any],
                     interval: float | None = None, max_retries: int | None = None,
                     result: list[Any] | None = None, **_: Any) -> None:
        from qops.errors import MaxRetriesExceeded

        if chords.unlock_step(app, group_id, callback, result or []):
            return
        try:
            raise self.retry(countdown=chords.unlock_delay(interval, self.request.retries),
                             max_retries=max_retries)
        except MaxRetriesExceeded as exc:
            chords.chord_error(app, callback, chords.chord_error_meta(
                app, f"chord_unlock could not be retried: {exc!r}"))
            raise

    def xmap(task: Any, it: Iterable[Any]) -> list[Any]:
        fun = _local_task(app, task)
        return [fun(item) for item in it]

    def xstarmap(task: Any, it: Iterable[Any]) -> list[Any]:
        fun = _local_task(app, task)
        return [fun(*item) for item in it]

    def chunks(task: Any, it: Iterable[Any], n: int) -> Any:
        parts: list[dict[str, Any]] = [{"task": STARMAP, "args": [task, part], "kwargs": {}, "options": {},
                  "subtask_type": None, "immutable": False} for part in _chunked(it, n)]
        return group([maybe_signature(p, app) for p in parts], app=app).apply_async().id

    def accumulate(*args: Any, index: int | None = None, **_: Any) -> Any:
        return args[index] if index is not None else list(args)

    def backend_cleanup() -> None:
        app.backend.cleanup()

    app.task(name=CHAIN, typing=False)(run_chain)
    app.task(name=GROUP, bind=True, typing=False)(run_group)
    app.task(name=CHORD, typing=False)(run_chord)
    app.task(name=CHORD_UNLOCK, bind=True, max_retries=None, ignore_result=True,
             typing=False)(chord_unlock)
    app.task(name=MAP, typing=False)(xmap)
    app.task(name=STARMAP, typing=False)(xstarmap)
    app.task(name=CHUNKS, typing=False)(chunks)
    app.task(name=ACCUMULATE, typing=False)(accumulate)
    app.task(name=BACKEND_CLEANUP, typing=False)(backend_cleanup)
