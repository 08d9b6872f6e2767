"""``qops top``: one snapshot as JSON (checked exactly) and as plain text, and the live
view in a real terminal (tmux)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest

from qops import App, __version__
from tests.helpers import ROOT, WorkerProcess, qops_env, run_qops, wait_until

pytestmark = pytest.mark.slow


@contextmanager
def two_workers(broker: str, queue: str) -> Iterator[list[str]]:
    nodes = [f"top1-{queue}@h", f"top2-{queue}@h"]
    with ExitStack() as stack:
        for node in nodes:
            stack.enter_context(WorkerProcess("-n", node, "-Q", f"{queue}-w", "-P", "solo",
                                              broker=broker))
        assert wait_until(lambda: run_qops("-b", broker, "status", "--timeout", "2")
                          .stdout.count("OK") >= 2, 30)
        yield nodes


def test_once_json_exactly(sqlite_url: str, queue_name: str) -> None:
    app = App("proj", broker=sqlite_url)
    for i in range(3):
        app.send_task("proj.tasks.add", args=[i, i], queue=queue_name)
    app.close()
    with two_workers(sqlite_url, queue_name) as nodes:
        out = run_qops("-b", sqlite_url, "top", "--once", "--json", "--wait", "2",
                       "--no-enable-events", "-Q", f"{queue_name},{queue_name}-w")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    for node in doc["nodes"]:
        assert node.pop("last_seen") < 2
        assert len(node.pop("loadavg")) == 3
        assert isinstance(node.pop("pid"), int)
        node.pop("rate")
    for queue in doc["queues"]:
        queue.pop("rate")
    assert doc == {
        "broker_up": True,
        "workers_online": 2,
        "nodes": [{"name": n, "up": True, "active": 0, "processed": 0, "succeeded": 0,
                   "failed": 0, "sw": f"qops {__version__}"} for n in nodes],
        "queues": [{"name": queue_name, "ready": 3, "in_flight": 0, "consumers": 0,
                    "in_rate": None, "out_rate": None},
                   {"name": f"{queue_name}-w", "ready": 0, "in_flight": 0, "consumers": 2,
                    "in_rate": None, "out_rate": None}],
        "tasks": {}, "running": [], "failures": [], "dead_letters": 0, "queue_out": {},
    }


def test_once_plain_text_and_unreachable_broker(sqlite_url: str, queue_name: str,
                                                tmp_path: object) -> None:
    out = run_qops("-b", sqlite_url, "top", "--once", "--wait", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("qops top  broker up  workers 0 up, 0 gone")
    assert "nodes:\n  (none)" in out.stdout
    out = run_qops("-b", "redis://127.0.0.1:1/0", "top", "--once", "--json", "--wait", "0")
    assert out.returncode != 0
    assert "error" in json.loads(out.stdout)


def test_live_view_needs_a_terminal(sqlite_url: str) -> None:
    out = run_qops("-b", sqlite_url, "top")
    assert out.returncode == 2
    assert "--once" in out.stderr


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_live_view_in_tmux(sqlite_url: str, queue_name: str) -> None:
    app = App("proj", broker=sqlite_url)
    for i in range(7):
        app.send_task("proj.tasks.add", args=[i, i], queue=queue_name)
    app.close()
    sock = f"qops-top-{uuid.uuid4().hex[:8]}"
    env = qops_env()
    keep = ("PYTHONPATH", "QOPS_FORCE_ROOT", "QOPS_WORKER_HEARTBEAT_INTERVAL",
            "QOPS_WORKER_HEARTBEAT_TTL", "PATH", "HOME")
    command = " ".join(["env", "-u", "COLUMNS", "-u", "LINES", *(shlex.quote(f"{k}={env[k]}") for k in keep if k in env),
                        shlex.quote(sys.executable), "-m", "qops", "-b", sqlite_url, "top",
                        "-Q", f"{queue_name},{queue_name}-w", "--interval", "0.5"])

    def tmux(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True,
                              cwd=str(ROOT), timeout=20)

    def screen() -> str:
        return tmux("capture-pane", "-p", "-t", "top").stdout

    with two_workers(sqlite_url, queue_name) as nodes:
        try:
            assert tmux("new-session", "-d", "-s", "top", "-x", "160", "-y", "50",
                        command).returncode == 0
            assert wait_until(lambda: all(n in screen() for n in nodes)
                              and "workers 2 up" in screen(), 30), screen()
            row = next(line for line in screen().splitlines() if queue_name + " " in line)
            assert [c.strip() for c in row.split("│")][:2] == [queue_name, "7"]
            tmux("send-keys", "-t", "top", "s")  # sort: by active
            assert wait_until(lambda: "sort: active" in screen(), 10), screen()
            tmux("send-keys", "-t", "top", "f", "top2", "Enter")  # filter
            assert wait_until(lambda: nodes[0] not in screen() and nodes[1] in screen(),
                              10), screen()
            tmux("send-keys", "-t", "top", "q")
            assert wait_until(lambda: tmux("has-session", "-t", "top").returncode != 0, 10)
        finally:
            tmux("kill-server")


def test_live_view_ends_when_its_terminal_goes_away(sqlite_url: str) -> None:
    """The terminal closes (an ssh session dropped, a tmux pane killed): top ends instead
    of reading end-of-input at full speed for ever (it did: one left behind spun at 60%
    of a core for hours)."""
    import os
    import pty
    import signal

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "qops", "-b", sqlite_url, "top",
                             "--no-enable-events"], stdin=slave, stdout=slave,
                            stderr=subprocess.DEVNULL, env={**qops_env(), "COLUMNS": "120",
                                                            "LINES": "40"},
                            cwd=str(ROOT), start_new_session=True)
    os.close(slave)
    try:
        seen = b""
        while b"qops top" not in seen:  # drawn once: it is in its loop
            seen += os.read(master, 65536)
        os.close(master)
        master = -1
        assert proc.wait(10) == 0
    finally:
        if master >= 0:
            os.close(master)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
