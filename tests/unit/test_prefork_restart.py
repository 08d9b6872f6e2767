"""pool_restart and a task that has just started: the restart waits for its end (the
task runs in the child that was there when it started, then that child is replaced).
Once the task was STARTED a restart must not move it to a new child first: CI saw
test_pool_restart_replaces_the_processes_and_reloads run it on the reloaded code."""

from __future__ import annotations

import os
import queue
from typing import Any

from qops import App
from qops.protocol import build_task_message, parse_task_message
from qops.worker.prefork import PreforkPool
from qops.worker.request import make_job
from tests.helpers import wait_until


def test_a_restart_asked_as_a_task_starts_waits_for_its_end() -> None:
    app = App("restart", broker="memory://prefork-restart")

    @app.task(name="t.pid")
    def pid() -> int:
        return os.getpid()

    pool = PreforkPool(app, 1)
    pool.start()
    try:
        before = pool.pids()
        request = parse_task_message(build_task_message("t.pid"))
        job = make_job(request, "n@h", {"routing_key": "q"}, None)
        outcomes: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()

        def start() -> bool:  # the task starts; a pool_restart arrives right then
            pool.restart()
            return True

        pool.submit(job, outcomes.put, None, start)
        outcome = outcomes.get(timeout=20)
        assert (outcome["state"], outcome["result"]) == ("SUCCESS", before[0])
        assert wait_until(lambda: pool.pids() and pool.pids() != before, 10)
    finally:
        pool.stop(10)
