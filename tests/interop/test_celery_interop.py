"""qops and real Celery 5 on the same Redis: each side's tasks run on the other."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import ROOT, WorkerProcess, qops_env, stop_group


def test_celery_client_task_runs_on_qops_worker(redis_url: str, tmp_path: Path) -> None:
    from celery import Celery

    queue = f"interop-{uuid.uuid4().hex[:8]}"
    client = Celery("client", broker=redis_url, backend=redis_url)
    env = qops_env(QOPS_COMPAT="celery")  # celery-task-meta- results, as Celery reads them
    with WorkerProcess("-Q", queue, "-P", "threads", broker=redis_url, backend=redis_url,
                       env=env, logfile=tmp_path / "w.log"):
        res = client.send_task("proj.tasks.add", args=(2, 3), queue=queue)
        assert res.get(timeout=30) == 5
        failed = client.send_task("proj.tasks.fail", args=("from celery",), queue=queue)
        err = failed.get(timeout=30, propagate=False)
        assert isinstance(err, Exception) and "from celery" in str(err)
        assert failed.state == "FAILURE"
    client.close()


def test_qops_client_task_runs_on_celery_worker(redis_url: str, tmp_path: Path) -> None:
    from qops import App

    queue = f"interop-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, INTEROP_BROKER=redis_url, INTEROP_BACKEND=redis_url,
               C_FORCE_ROOT="1", PYTHONPATH=str(ROOT / "tests" / "interop"))
    log = open(tmp_path / "celery.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_side", "worker", "-Q", queue,
         "-P", "solo", "-l", "WARNING", "--without-heartbeat", "--without-gossip",
         "--without-mingle"], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True, cwd=str(tmp_path))
    app = App("qclient", broker=redis_url, backend=redis_url, compat="celery")
    try:
        res = app.send_task("celery_side.mul", [6, 7], queue=queue)
        assert res.get(timeout=60) == 42
    finally:
        app.close()
        stop_group(proc)
        log.close()


def test_celery_clients_revoke_reaches_qops_worker(real_broker_url: str, redis_url: str,
                                                   tmp_path: Path) -> None:
    """Celery's ``AsyncResult.revoke()`` and ``app.control.revoke`` (control headers with
    ``expires: 0``, kombu's "never") revoke tasks on a qops worker."""
    if real_broker_url.startswith("sqlite"):
        pytest.skip("Celery has no client for qops's SQLite broker")
    from celery import Celery
    from celery.result import AsyncResult

    queue = f"interop-{uuid.uuid4().hex[:8]}"
    client = Celery("client", broker=real_broker_url, backend=redis_url)
    env = qops_env(QOPS_COMPAT="celery")
    node = f"q{uuid.uuid4().hex[:6]}@interop"
    with WorkerProcess("-n", node, "-Q", queue, "-P", "threads", broker=real_broker_url,
                       backend=redis_url, env=env, logfile=tmp_path / "w.log"):
        deadline = time.monotonic() + 30
        while not client.control.ping([node], timeout=1.0):
            assert time.monotonic() < deadline, (tmp_path / "w.log").read_text()
        first = client.send_task("proj.tasks.add", args=(1, 2), queue=queue, countdown=3)
        second = client.send_task("proj.tasks.add", args=(3, 4), queue=queue, countdown=3)
        time.sleep(0.5)  # received: held for the countdown
        AsyncResult(first.id, app=client).revoke()
        client.control.revoke(second.id)
        for res in (first, second):
            err = res.get(timeout=2.4, propagate=False)  # before the countdown ends
            assert res.state == "REVOKED", err
        assert client.send_task("proj.tasks.add", args=(2, 3), queue=queue).get(timeout=20) == 5
    client.close()
