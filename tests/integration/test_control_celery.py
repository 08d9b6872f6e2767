"""Celery 5's remaining remote-control commands on a real node (pool_restart, clock,
heartbeat, election, the memory commands, dump_* names), and ``app.control`` with
Celery's method names and reply shapes."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qops import App
from tests.helpers import REPLY_TIMEOUT, WorkerProcess, qops_env, run_qops, wait_until

MODULE = '''import time

from proj.qops import app

VERSION = {version}


@app.task(name="reloadme.version")
def version():
    return VERSION


@app.task(name="reloadme.nap")
def nap(seconds):
    time.sleep(seconds)
    return VERSION
'''


def pids(app: App, node: str) -> list[int]:
    stats = app.control.inspect(destination=[node], timeout=float(REPLY_TIMEOUT)).stats()
    assert stats is not None, f"{node} did not answer"
    return sorted(stats[node]["pool"]["processes"])


def up(app: App, node: str, log: Path) -> None:
    """Wait until ``node`` answers a ping (asked in-process: no CLI start-up per try)."""
    insp = app.control.inspect(destination=[node], timeout=0.5)
    assert wait_until(lambda: insp.ping() is not None, 30), log.read_text()


@pytest.fixture(params=["redis", "amqp"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[App, str, Path]]:
    """A prefork node of two processes that obeys pool_restart, importing a task
    module from tmp_path (on RabbitMQ the pool processes consume themselves)."""
    broker = str(request.getfixturevalue(f"{request.param}_url"))
    (tmp_path / "reloadme.py").write_text(MODULE.format(version=1))
    name = f"pr{uuid.uuid4().hex[:6]}@test"
    env = qops_env(QOPS_WORKER_POOL_RESTARTS="1", QOPS_IMPORTS="reloadme",
                   QOPS_TASK_TRACK_STARTED="1")
    env["PYTHONPATH"] += f":{tmp_path}"
    backend = "rpc://" if request.param == "amqp" else broker
    app = App("client", broker=broker, backend=backend)
    try:
        with WorkerProcess("-n", name, "-c", "2", "-Q", f"q{name[:8]}", broker=broker,
                           backend=backend, env=env, logfile=tmp_path / "worker.log"):
            up(app, name, tmp_path / "worker.log")
            yield app, name, tmp_path
    finally:
        app.close()


def test_pool_restart_replaces_the_processes_and_reloads(
        node: tuple[App, str, Path]) -> None:
    app, name, tmp_path = node
    queue = f"q{name[:8]}"
    assert app.send_task("reloadme.version", queue=queue).get(timeout=20) == 1
    before = pids(app, name)
    (tmp_path / "reloadme.py").write_text(MODULE.format(version=2))
    busy = app.send_task("reloadme.nap", args=[1.5], queue=queue)
    assert wait_until(lambda: busy.state == "STARTED", 10)
    replies = app.control.pool_restart(modules=["reloadme"], reload=True,
                                       destination=[name], reply=True,
                                       timeout=float(REPLY_TIMEOUT))
    assert replies == [{name: {"ok": "reload started"}}]
    # the task running then is not cut short: its process is replaced after it
    assert busy.get(timeout=20) == 1  # (the old code)

    def replaced() -> bool:  # every process, the idle ones within a second or so
        now = pids(app, name)
        return len(now) == 2 and not set(now) & set(before)

    assert wait_until(replaced, 20), (before, pids(app, name))
    assert app.send_task("reloadme.version", queue=queue).get(timeout=20) == 2


def test_celery_commands_and_app_control(redis_url: str, tmp_path: Path) -> None:
    name = f"cc{uuid.uuid4().hex[:6]}@test"
    app = App("client", broker=redis_url)
    t = float(REPLY_TIMEOUT)
    with WorkerProcess("-n", name, "-c", "1", broker=redis_url,
                       logfile=tmp_path / "worker.log"):
        up(app, name, tmp_path / "worker.log")
        try:
            insp = app.control.inspect(destination=[name], timeout=t)
            assert insp.ping() == {name: {"ok": "pong"}}
            clock = insp.clock()
            assert clock is not None and clock[name]["clock"] > 0
            assert "proj.tasks.add" in insp.registered()[name]  # type: ignore[index]
            assert insp.registered_tasks() == insp.registered()
            assert list(insp.stats() or {}) == [name]
            assert insp.active() == {name: []}
            assert "error" in (insp.memsample() or {})[name]
            # old names of inspect commands (Celery 3 clients still send them)
            dump = app.control.broadcast("dump_tasks", destination=[name], reply=True,
                                         timeout=t)
            assert dump == [{name: insp.registered()[name]}]  # type: ignore[index]
            ok = {"ok": "new rate limit set successfully"}
            assert app.control.rate_limit("proj.tasks.add", "5/s", destination=[name],
                                          reply=True, timeout=t) == [{name: ok}]
            assert app.control.time_limit("proj.tasks.add", soft=10, hard=20,
                                          destination=[name], reply=True, timeout=t) \
                == [{name: {"ok": "time limits set successfully"}}]
            assert app.control.heartbeat(destination=[name], reply=True, timeout=t) \
                == [{name: {"ok": "heartbeat sent"}}]
            [reply] = app.control.election("e1", "topic", destination=[name], reply=True,
                                           timeout=t) or [{}]
            assert "no elections" in reply[name]["error"]
            # worker_pool_restarts is off: refused, nothing restarted
            before = pids(app, name)
            r = run_qops("-b", redis_url, "--json", "control", "pool_restart", "-d", name,
                         "--timeout", REPLY_TIMEOUT)
            assert r.returncode == 1, r.stdout + r.stderr
            error = json.loads(r.stdout)["replies"][name]["error"]
            assert error.startswith("Pool restarts not enabled")
            assert pids(app, name) == before
            # no reply wanted: None, as Celery
            assert app.control.pool_grow(1, destination=[name]) is None
            # nobody there: None
            gone = app.control.inspect(destination=["nobody@nowhere"], timeout=0.3)
            assert gone.ping() is None
            r = run_qops("-b", redis_url, "--json", "control", "terminate", "KILL",
                         "some-id", "-d", name, "--timeout", REPLY_TIMEOUT)
            assert r.returncode == 0, r.stdout + r.stderr
            assert "none running" in json.loads(r.stdout)["replies"][name]["ok"]
        finally:
            app.close()
