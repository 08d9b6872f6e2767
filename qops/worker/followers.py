"""What a finished task sends next: the rest of its chain and its ``link`` callbacks on
success, its ``link_error`` errbacks on failure, and its next attempt on ``retry()``. The
consumer loop calls these after a task ends and before it settles the message, so a crash
in between sends them twice rather than never."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qops.app import App
    from qops.protocol import TaskRequest
    from qops.task import Context, Task

log = logging.getLogger("qops.worker")


def send_followers(app: App, req: TaskRequest, result: Any) -> None:
    """Continue a chain and call ``link`` callbacks with the result."""
    if not req.callbacks and not req.chain:
        return
    extra = {"parent_id": req.id, "root_id": req.root_id, "reply_to": req.reply_to or ""}
    try:
        for cb in req.callbacks or []:
            apply_signature(app, cb, result, **extra)
        if req.chain:
            rest = list(req.chain)
            apply_signature(app, rest.pop(), result, chain=rest or None, **extra)
    except Exception as exc:
        log.error("Task %s[%s]: could not send the next task: %s", req.name, req.id, exc)


def apply_signature(app: App, sig: dict[str, Any], result: Any, **options: Any) -> None:
    """Send ``sig`` with ``result`` before its arguments: a task as one message; a group,
    chord or chain through the canvas, as a Celery worker does (not by its task name)."""
    from qops.canvas import maybe_signature
    from qops.task import Signature

    if sig.get("subtask_type") in ("chain", "group", "chord"):
        maybe_signature(sig, app).apply_async((result,), **options)
    else:
        app.send_signature(Signature(sig, app=app).clone([result]), **options)


def _called_here(app: App, errback: dict[str, Any]) -> Task | None:
    """The task of ``errback`` when it is called in this process with ``(request, exc,
    traceback)``, as Celery calls an errback whose function takes more than one
    positional argument (not bound, not immutable); None: it is sent as a task with the
    failed task's id (the older form; an immutable one with its own arguments alone)."""
    if errback.get("immutable") or errback.get("subtask_type"):  # .si(), a canvas
        return None
    task = app.tasks.get(str(errback.get("task")))
    if task is None or task.bind or task.positional is None:
        return None
    most = task.positional[1]  # (the bounds Task worked out for its argument checks)
    return task if most is None or most > 1 else None


def call_errbacks(app: App, request: Context, exc: BaseException,
                  traceback: str | None) -> list[int]:
    """Call here the errbacks of ``request`` that take ``(request, exc, traceback)``
    (before their own arguments); the indexes of those called."""
    called = []
    for i, errback in enumerate(request.errbacks or []):
        task = _called_here(app, errback)
        if task is None:
            continue
        called.append(i)
        try:
            task(request, exc, traceback, *errback.get("args") or (),
                 **errback.get("kwargs") or {})
        except Exception as error:
            log.error("Task %s[%s]: its errback %s raised: %r", request.get("task"),
                      request.id, task.name, error)
    return called


def send_errbacks(app: App, req: TaskRequest, exc: BaseException,
                  traceback: str | None = None, called: Sequence[int] = ()) -> None:
    """The ``link_error`` errbacks of a failed task not ``called`` already (where it ran):
    those taking ``(request, exc, traceback)`` called here, the others sent with the
    task's id."""
    from qops.task import Context, Signature

    left = [eb for i, eb in enumerate(req.errbacks or []) if i not in called]
    if not left:
        return
    request = Context(**{**req.context(), "errbacks": left})
    here = set(call_errbacks(app, request, exc, traceback))
    for eb in (eb for i, eb in enumerate(left) if i not in here):
        try:
            app.send_signature(Signature(eb, app=app).clone([req.id]),
                               parent_id=req.id, root_id=req.root_id,
                               reply_to=req.reply_to or "")
        except Exception as error:
            log.error("Task %s[%s]: could not send errback: %s", req.name, req.id, error)


def send_retry(app: App, req: TaskRequest, queue: str, when: float,
               outcome: dict[str, Any]) -> None:
    """The task's next attempt, ``when`` seconds from now, on the queue it came from, with
    everything the message carried (new args/kwargs when ``retry()`` gave them)."""
    args = outcome["args"] if outcome.get("args") is not None else req.args
    kwargs = outcome["kwargs"] if outcome.get("kwargs") is not None else req.kwargs
    app.send_task(
        req.name, args, kwargs, task_id=req.id, countdown=when, queue=queue,
        retries=req.retries + 1, expires=req.expires, time_limit=req.time_limit,
        soft_time_limit=req.soft_time_limit, root_id=req.root_id,
        parent_id=req.parent_id, group=req.group, group_index=req.group_index,
        link=req.callbacks, link_error=req.errbacks, chain=req.chain, chord=req.chord,
        priority=req.priority, ignore_result=req.ignore_result,
        reply_to=req.reply_to or "")
