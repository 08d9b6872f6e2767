"""Running one task: what happens inside a pool process or thread.

``execute`` takes a job (plain data, so it can cross a pipe) and returns an outcome
(plain data too). The worker's main process turns the outcome into a stored result,
an ack, a retry or a callback.
"""

from __future__ import annotations

import signal
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from qops import discovery, protocol
from qops.errors import (
    MaxRetriesExceeded,
    Reject,
    Retry,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
)
from qops.task import Context

if TYPE_CHECKING:
    from qops.app import App

# outcome states besides the result states
REJECTED = "REJECTED"
LOST = "LOST"


def make_job(request: Any, hostname: str, delivery_info: dict[str, Any],
             soft_time_limit: float | None) -> dict[str, Any]:
    ctx = request.context()
    ctx["hostname"] = hostname
    ctx["delivery_info"] = delivery_info
    return {"id": request.id, "name": request.name, "args": request.args,
            "kwargs": request.kwargs, "context": ctx, "soft_time_limit": soft_time_limit}


class _HardLimit(BaseException):
    """Raised in the task at its hard time limit: not an Exception, so that task code
    catching Exception does not swallow it."""


def _arm_limits(soft: float | None, hard: float | None) -> None:
    """SIGALRM at the soft limit (SoftTimeLimitExceeded in the task), then, when the job
    enforces its hard limit in-process, at the hard one (_HardLimit)."""
    soft_at = float(soft) if soft and (not hard or soft < hard) else None
    hard_at = float(hard) if hard else None

    def on_alarm(signum: int, frame: Any) -> None:
        nonlocal soft_at
        if soft_at is not None:
            if hard_at is not None:
                signal.setitimer(signal.ITIMER_REAL, hard_at - soft_at)
            soft_at = None
            raise SoftTimeLimitExceeded("soft time limit exceeded")
        raise _HardLimit

    first = soft_at if soft_at is not None else hard_at
    if first is not None:
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, first)


def execute(app: App, job: dict[str, Any]) -> dict[str, Any]:
    """Run the job's task here; never raises.

    ``job["hard_time_limit"]``, when set, is enforced here (a pool child that runs its
    own consumer): the task is interrupted, the outcome is a TimeLimitExceeded FAILURE
    and ``_exit`` asks for the process to be replaced."""
    start = time.monotonic()
    task = app.tasks.get(job["name"])
    if task is None:  # checked before dispatch; kept for a registry changed under us
        return {"state": "FAILURE", "result": {"exc_type": "NotRegistered",
                "exc_message": [job["name"]], "exc_module": "qops.errors"},
                "traceback": None, "runtime": 0.0}
    ctx = Context(**job["context"])
    soft, hard = job.get("soft_time_limit"), job.get("hard_time_limit")
    use_alarm = bool(soft or hard) and threading.current_thread() is threading.main_thread()
    if use_alarm:
        _arm_limits(soft, hard)
    if discovery.django_ready:
        discovery.close_old_connections()
    task.push_request(ctx)
    app.push_request(ctx)
    try:
        try:
            value = task(*job["args"], **job["kwargs"])
        except Exception as exc:
            if task.autoretry_for and isinstance(exc, task.autoretry_for) \
                    and not isinstance(exc, Retry):
                try:
                    task.retry(exc=exc, countdown=task.backoff_delay(ctx.retries))
                except Retry as retry:
                    return _retry_outcome(retry, start)
                except Exception as final:
                    return _failed(app, ctx, final, start)
            raise
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
        try:
            if job.get("check_result", True):
                protocol.dumps(value)
        except (TypeError, ValueError) as exc:
            return _failure(TypeError(f"result of {job['name']} is not JSON serializable: "
                                      f"{exc}"), start, tb=None)
        return {"state": "SUCCESS", "result": value, "traceback": None,
                "runtime": time.monotonic() - start}
    except Retry as retry:
        return _retry_outcome(retry, start)
    except MaxRetriesExceeded as exc:
        return _failed(app, ctx, exc, start)
    except Reject as rej:
        return {"state": REJECTED, "reason": rej.reason or "rejected by the task",
                "requeue": rej.requeue, "runtime": time.monotonic() - start}
    except Exception as exc:
        return _failed(app, ctx, exc, start)
    except _HardLimit:
        outcome = _failure(TimeLimitExceeded(f"hard time limit ({hard}s) exceeded"), start,
                           tb=None)
        outcome["_exit"] = True  # the process may be in any state: replace it
        return outcome
    finally:
        app.pop_request()
        task.pop_request()
        if discovery.django_ready:
            discovery.close_old_connections()


def _failed(app: App, ctx: Context, exc: BaseException, start: float) -> dict[str, Any]:
    """The task raised ``exc``: its failure, its errbacks that take ``(request, exc,
    traceback)`` called here, with the exception itself (the main process sends the
    others)."""
    outcome = _failure(exc, start)
    if ctx.errbacks:
        from qops.worker.followers import call_errbacks

        outcome["errbacks_called"] = call_errbacks(app, ctx, exc, outcome["traceback"])
    return outcome


def _failure(exc: BaseException, start: float, tb: str | None = "") -> dict[str, Any]:
    return {"state": "FAILURE", "result": protocol.exception_to_dict(exc),
            "traceback": traceback.format_exc() if tb == "" else tb,
            "runtime": time.monotonic() - start}


def _retry_outcome(retry: Retry, start: float) -> dict[str, Any]:
    exc = retry.exc or retry
    return {"state": "RETRY", "result": protocol.exception_to_dict(exc),
            "traceback": traceback.format_exc(), "when": retry.when or 0.0,
            "args": getattr(retry, "args_override", None),
            "kwargs": getattr(retry, "kwargs_override", None),
            "runtime": time.monotonic() - start}
