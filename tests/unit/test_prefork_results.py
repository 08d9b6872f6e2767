"""A prefork child stores its task's SUCCESS itself when the job asks (the worker's
consumer does with a backend a forked process may use, Redis): the result is out
before the parent has read the child's answer, and the parent does not store it again.
A child whose store fails logs why, as the parent would (a second try from the parent
would only double the wait on a backend that is down)."""

from __future__ import annotations

import logging
import os
import queue
import uuid
from pathlib import Path
from typing import Any

import pytest

from qops import App
from qops.protocol import build_task_message, parse_task_message
from qops.worker.prefork import PreforkPool
from qops.worker.request import make_job


def _run(app: App, store: bool) -> tuple[str, dict[str, Any]]:
    pool = PreforkPool(app, 1)
    pool.start()
    try:
        request = parse_task_message(build_task_message("t.pid"))
        job = make_job(request, "n@h", {"routing_key": "q"}, None)
        if store:
            job["store"], job["reply_to"] = True, None
        outcomes: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        pool.submit(job, outcomes.put, None, None)
        return request.id, outcomes.get(timeout=20)
    finally:
        pool.stop(10)


@pytest.mark.parametrize("store", [True, False])
def test_the_child_stores_a_success_when_asked(redis_url: str, store: bool) -> None:
    app = App("childstore", broker="memory://childstore", backend=redis_url)

    @app.task(name="t.pid")
    def pid() -> int:
        return os.getpid()

    try:
        assert app.backend.stored_by_children
        task_id, outcome = _run(app, store)
        assert outcome["state"] == "SUCCESS" and outcome["result"] != os.getpid()
        meta = app.backend.get_meta(task_id)
        if store:  # stored by the child, before the parent had its answer
            assert outcome["stored"] is True
            assert (meta["status"], meta["result"]) == ("SUCCESS", outcome["result"])
        else:
            assert "stored" not in outcome and meta["status"] == "PENDING"
    finally:
        app.backend.forget(task_id)
        app.close()


def test_a_child_that_cannot_store_logs_why(tmp_path: Path) -> None:
    port = 1  # nothing listens there: the child's store fails
    app = App("childstore", broker="memory://childstore2",
              backend=f"redis://127.0.0.1:{port}/{uuid.uuid4().int % 16}")

    @app.task(name="t.pid")
    def pid() -> int:
        return os.getpid()

    logfile = tmp_path / "child.log"
    handler = logging.FileHandler(logfile)  # the forked child writes here too
    logger = logging.getLogger("qops")
    logger.addHandler(handler)
    try:
        task_id, outcome = _run(app, True)
        assert outcome["state"] == "SUCCESS" and outcome["stored"] is True
        assert f"Task t.pid[{task_id}]: could not store SUCCESS" in logfile.read_text()
    finally:
        logger.removeHandler(handler)
        handler.close()
        app.close()
