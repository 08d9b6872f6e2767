"""Real Flower watching qops workers (``--compat celery``, Redis), through its HTTP API:
the workers are listed online with what they processed, tasks sent from Flower run and
show up with their results, and Flower's control buttons (pool restart, grow, shrink,
autoscale, queues, rate limit, time limit, revoke, shutdown) get an "ok"."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from tests.helpers import WorkerProcess, qops_env, stop_group, wait_until

#: the Celery app Flower runs with: it knows the task names the qops workers run
FLOWER_SIDE = '''from celery import Celery

app = Celery("flowerside")


@app.task(name="proj.tasks.add")
def add(x, y):
    return x + y
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Flower:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def call(self, path: str, method: str = "GET", body: Any = None,
             **params: Any) -> tuple[int, Any]:
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        data = None
        headers = {}
        if method == "POST":
            data = json.dumps(body).encode() if body is not None else b""
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                text = resp.read().decode()
                status = resp.status
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, None
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text


def node_args(worker: WorkerProcess) -> WorkerProcess:
    worker.args[0:0] = ["--compat", "celery"]  # global option: before the command
    return worker


def test_flower_lists_and_controls_qops_workers(redis_url: str, tmp_path: Path) -> None:
    w1, w2 = f"f1{uuid.uuid4().hex[:6]}@flower", f"f2{uuid.uuid4().hex[:6]}@flower"
    env = qops_env(QOPS_WORKER_POOL_RESTARTS="1")
    nodes = [node_args(WorkerProcess("-n", w1, "-c", "1", "-E", broker=redis_url,
                                     backend=redis_url, env=env,
                                     logfile=tmp_path / "w1.log")),
             node_args(WorkerProcess("-n", w2, "-P", "threads", "-c", "1", "-E",
                                     broker=redis_url, backend=redis_url, env=env,
                                     logfile=tmp_path / "w2.log"))]
    (tmp_path / "flowerside.py").write_text(FLOWER_SIDE)
    port = free_port()
    fenv = dict(os.environ, FLOWER_UNAUTHENTICATED_API="true", PYTHONPATH=str(tmp_path))
    log = open(tmp_path / "flower.log", "wb")  # noqa: SIM115 - closed below
    flower = None
    try:
        for n in nodes:
            n.start()
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "flowerside", "--broker", redis_url,
             "--result-backend", redis_url, "flower", f"--port={port}",
             "--address=127.0.0.1", "--inspect_timeout=3000"],
            env=fenv, cwd=str(tmp_path), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        api = Flower(port)

        def listed() -> bool:
            code, workers = api.call("/api/workers", refresh=1)
            return code == 200 and {w1, w2} <= set(workers)

        assert wait_until(listed, 40, interval=0.5), (tmp_path / "flower.log").read_text()

        # a task sent from Flower runs on a qops node; Flower has its result and event
        code, sent = api.call("/api/task/async-apply/proj.tasks.add", "POST",
                              {"args": [2, 3]})
        assert code == 200, sent
        task_id = sent["task-id"]
        code, result = api.call(f"/api/task/result/{task_id}", timeout=15)
        assert code == 200 and result["result"] == 5, result

        def seen() -> bool:
            code, tasks = api.call("/api/tasks")
            return code == 200 and tasks.get(task_id, {}).get("state") == "SUCCESS"

        assert wait_until(seen, 15, interval=0.3), api.call("/api/tasks")
        code, online = api.call("/api/workers", status=1)
        assert code == 200 and online == {w1: True, w2: True}, online
        code, workers = api.call("/api/workers", refresh=1)
        done = [workers[w]["stats"]["total"].get("proj.tasks.add", 0) for w in (w1, w2)]
        assert sum(done) == 1, workers

        # the control buttons
        def post(path: str, **params: Any) -> tuple[int, Any]:
            return api.call(path, "POST", None, **params)

        pids = workers[w1]["stats"]["pool"]["processes"]
        code, answer = post(f"/api/worker/pool/restart/{w1}")
        assert code == 200, answer

        def restarted() -> bool:
            code, workers = api.call("/api/workers", refresh=1, workername=w1)
            now = workers.get(w1, {}).get("stats", {}).get("pool", {}).get("processes", [])
            return code == 200 and len(now) == 1 and now != pids

        assert wait_until(restarted, 15, interval=0.3)
        revoked = str(uuid.uuid4())
        for path, params in ((f"/api/worker/pool/grow/{w1}", {"n": 1}),
                             (f"/api/worker/pool/shrink/{w1}", {"n": 1}),
                             (f"/api/worker/pool/autoscale/{w1}", {"min": 1, "max": 2}),
                             (f"/api/worker/queue/add-consumer/{w2}", {"queue": "extra"}),
                             (f"/api/worker/queue/cancel-consumer/{w2}", {"queue": "extra"}),
                             ("/api/task/rate-limit/proj.tasks.add",
                              {"workername": w1, "ratelimit": "10/m"}),
                             ("/api/task/timeout/proj.tasks.add",
                              {"workername": w1, "soft": 10, "hard": 20}),
                             (f"/api/task/revoke/{revoked}", {})):
            code, answer = post(path, **params)
            assert code == 200, (path, code, answer)

        def known_revoked() -> bool:  # Flower does not wait for the revoke's replies
            code, workers = api.call("/api/workers", refresh=1, workername=w1)
            return code == 200 and revoked in (workers[w1].get("revoked") or [])

        assert wait_until(known_revoked, 10, interval=0.3)
        code, workers = api.call("/api/workers", refresh=1, workername=w1)
        assert workers[w1]["stats"]["pool"]["max-concurrency"] == 2  # grow, shrink, scale
        code, answer = post(f"/api/worker/shutdown/{w2}")
        assert code == 200, answer
        assert nodes[1].wait(15) == 0
    finally:
        if flower is not None:
            stop_group(flower)
        log.close()
        for n in nodes:
            n.stop()
