"""qops and real Celery 5 on the same Redis: each side's tasks run on the other."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

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
