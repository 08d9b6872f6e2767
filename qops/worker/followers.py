"""What a finished task sends next: the rest of its chain and its ``link`` callbacks on
success, its ``link_error`` errbacks on failure, and its next attempt on ``retry()``. The
consumer loop calls these after a task ends and before it settles the message, so a crash
in between sends them twice rather than never."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qops.app import App
    from qops.protocol import TaskRequest

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


def send_errbacks(app: App, req: TaskRequest) -> None:
    """Call the ``link_error`` errbacks with the failed task's id."""
    from qops.task import Signature

    for eb in req.errbacks or []:
        try:
            app.send_signature(Signature(eb, app=app).clone([req.id]),
                               parent_id=req.id, root_id=req.root_id,
                               reply_to=req.reply_to or "")
        except Exception as exc:
            log.error("Task %s[%s]: could not send errback: %s", req.name, req.id, exc)


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
