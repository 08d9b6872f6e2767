"""Example tasks."""

from __future__ import annotations

import os
import signal
import time

from proj.qops import app


@app.task
def add(x: float, y: float) -> float:
    return x + y


@app.task
def mul(x: float, y: float) -> float:
    return x * y


@app.task
def xsum(numbers: list[float]) -> float:
    return sum(numbers)


@app.task
def sleep(seconds: float) -> float:
    """A slow task: sleeps, then returns how long it slept."""
    time.sleep(seconds)
    return seconds


@app.task
def fail(message: str = "kaboom") -> None:
    """A failing task: raises ValueError(message)."""
    raise ValueError(message)


@app.task
def pid() -> int:
    """The pid of the process that ran the task."""
    return os.getpid()


@app.task(bind=True, max_retries=3, default_retry_delay=0.1)
def flaky(self, succeed_on: int = 2) -> int:
    """Fails until its retry number reaches ``succeed_on``; returns the retry count."""
    if self.request.retries < succeed_on:
        raise self.retry(exc=RuntimeError("not yet"))
    return int(self.request.retries)


@app.task(time_limit=1, soft_time_limit=0.5)
def limited(seconds: float) -> str:
    """Sleeps ``seconds`` under a soft limit of 0.5 s and a hard limit of 1 s."""
    from qops import SoftTimeLimitExceeded

    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "soft limit hit"
    return "done"


def _log_run(path: str, task_id: str) -> int:
    """Append "<task id> <pid> <unix time>" to ``path``; how many runs of ``task_id``
    it lists now."""
    line = f"{task_id} {os.getpid()} {time.time():.3f}\n"
    with open(path, "a+", encoding="utf-8") as f:
        f.seek(0)
        runs = sum(1 for old in f if old.split(" ", 1)[0] == task_id) + 1
        f.write(line)  # one write(2) in append mode: lines never interleave
    return runs


@app.task(bind=True)
def record(self, path: str, seconds: float = 0.0, first_only: bool = False) -> int:
    """Appends "<task id> <pid> <unix time>" to the file ``path`` (one line a run, so
    that tests can count executions), then sleeps ``seconds`` (only on the task's first
    run with ``first_only``). Returns how many times this task id has run, this run
    included."""
    runs = _log_run(path, str(self.request.id))
    if seconds and (runs == 1 or not first_only):
        time.sleep(seconds)
    return runs


@app.task(bind=True)
def crash(self, path: str, how: str = "exit", until: int = 0) -> int:
    """Appends a line to ``path`` as ``record`` does, then kills its own process:
    ``os._exit(3)`` (``how="exit"``) or SIGKILL (``how="kill"``); on every run, or only
    on the first ``until`` runs when it is > 0 (later runs return their number)."""
    runs = _log_run(path, str(self.request.id))
    if until and runs > until:
        return runs
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(3)


@app.task(bind=True, ignore_result=True)
def mark(self, path: str) -> None:
    """Appends "<task id> <pid>" to the file ``path`` and nothing else: ``record`` for
    many thousands of tasks (tests count executions per id)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{self.request.id} {os.getpid()}\n")


@app.task(bind=True, time_limit=1)
def stubborn(self, path: str, seconds: float) -> None:
    """Appends "<task id> <pid> <unix time>" to ``path`` (as ``record``), then sleeps
    ``seconds`` with SIGALRM blocked: the time-limit signal can't stop it, as it can't
    stop C code that never returns to Python. Its hard time limit is 1 s."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{self.request.id} {os.getpid()} {time.time():.3f}\n")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    try:
        time.sleep(seconds)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})


@app.task
def errback(request, exc: BaseException, traceback: str | None, path: str) -> None:
    """A Celery-style errback (``link_error=errback.s(path)``): called where the task
    failed, with its request, the exception and the traceback; appends "<failed task
    id> <exception type> <pid>" to ``path``."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{request.id} {type(exc).__name__} {bool(traceback)} {os.getpid()}\n")
