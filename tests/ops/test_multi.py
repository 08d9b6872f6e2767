"""``qops multi`` and worker daemonization, as an operator uses them (subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qops.ops import pidfile
from tests.helpers import ROOT, qops_env, wait_until
from tests.reachable import ReachablePython


class Multi:
    """Runs `qops multi ...` in a run directory; stops every node it started at the end."""

    def __init__(self, rundir: Path, broker: str, env: dict[str, str],
                 python: str = sys.executable) -> None:
        self.rundir = rundir
        self.broker = broker
        self.env = env
        self.python = python  # multi starts the nodes with the interpreter it runs on
        self.pidfiles: set[Path] = set()

    def __call__(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([self.python, "-m", "qops", "multi", *args, "-A", "proj",
                            "-b", self.broker], env=self.env, cwd=self.rundir,
                           capture_output=True, text=True, timeout=timeout)
        self.pidfiles |= set(self.rundir.rglob("*.pid"))
        return r

    def json(self, *args: str) -> tuple[int, list[dict]]:
        r = self("--json", *args)
        return r.returncode, json.loads(r.stdout) if r.stdout.strip() else []

    def cleanup(self) -> None:
        for path in self.pidfiles:
            info = pidfile.read(path)
            if info and info.running:
                os.killpg(os.getpgid(info.pid), signal.SIGKILL)


@pytest.fixture
def multi(tmp_path: Path, sqlite_url: str) -> Iterator[Multi]:
    m = Multi(tmp_path, sqlite_url, qops_env())
    yield m
    m.cleanup()


def test_start_status_restart_stopwait_cycle(multi: Multi) -> None:
    code, out = multi.json("start", "w1", "w2", "-c", "1", "-c:w2", "2", "-P", "threads")
    assert code == 0, out
    assert [o["message"] for o in out] == ["started", "started"]
    pids = {o["node"].split("@")[0]: o["pid"] for o in out}
    for name, pid in pids.items():
        assert pidfile.read(multi.rundir / f"{name}.pid").running
        assert pidfile.read(multi.rundir / f"{name}.pid").pid == pid
    # the recorded command line carries the per-node option
    r = multi("show", "w1", "w2")
    assert "-c 1" in r.stdout.splitlines()[0] and "-c 2" in r.stdout.splitlines()[1]
    # a second start reports and leaves them alone
    code, out = multi.json("start", "w1", "w2")
    assert code == 0 and all("already running" in o["message"] for o in out)
    assert {o["pid"] for o in out} == set(pids.values())
    code, out = multi.json("status", "w1", "w2")
    assert code == 0 and [o["state"] for o in out] == ["running", "running"]
    # restart without the options: the recorded command lines are used
    code, out = multi.json("restart", "w1", "w2")
    assert code == 0, out
    new = {o["node"].split("@")[0]: o["pid"] for o in out}
    assert set(new.values()).isdisjoint(pids.values())
    assert "--concurrency" not in (multi("show", "w2").stdout) and "-c 2" in multi("show", "w2").stdout
    code, out = multi.json("stopwait", "w1", "w2", "--timeout", "20")
    assert code == 0 and all(o["message"] == "stopped by TERM" for o in out)
    assert not (multi.rundir / "w1.pid").exists()
    assert not any(pidfile.pid_alive(p) for p in new.values())


def test_templates_and_names(multi: Multi, tmp_path: Path) -> None:
    host = os.uname().nodename
    r = multi("names", "3", "--range-prefix", "node")
    assert r.stdout.split() == [f"node{i}@{host}" for i in (1, 2, 3)]
    r = multi("expand", "/var/log/%n%I.log", "w1", "w2@example.com")
    assert r.stdout.split() == ["/var/log/w1.log", "/var/log/w2.log"]
    r = multi("get", "w2", "w1", "w2", "-c:1-2", "4", "-c:w2", "5")
    assert "-n w2@" in r.stdout and "-c 5" in r.stdout
    r = multi("show", "w1", "w2", "-B:w1", "-E")  # beat embedded in w1 only
    first, second = r.stdout.splitlines()
    assert " -B" in first and " -B" not in second and " -E" in second
    r = multi("expand", "%x", "w1")
    assert r.returncode == 2 and "%x" in r.stderr
    r = multi("start", "w1", "--concurency", "2")  # misspelt: refused, nothing started
    assert r.returncode == 2 and "no such option: --concurency" in r.stderr
    r = subprocess.run([sys.executable, "-m", "qops", "-A", "proj", "multi", "show", "w1",
                        "-c", "2", "--", "--anything", "goes"], env=multi.env,
                       cwd=multi.rundir, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("-c 2 --anything goes"), r
    logs = tmp_path / "logs"
    code, out = multi.json("start", "w1", "-c", "2", f"--pidfile={tmp_path}/run/%n.pid",
                           f"--logfile={logs}/%n%I.log")
    assert code == 0, out
    assert (tmp_path / "run" / "w1.pid").exists()
    assert wait_until(lambda: {p.name for p in logs.iterdir()} >= {"w1.log", "w1-1.log",
                                                                   "w1-2.log"}, timeout=10)
    assert multi.json("stop", "w1", f"--pidfile={tmp_path}/run/%n.pid")[0] == 0


def test_stale_and_foreign_pidfiles(multi: Multi) -> None:
    # stale: a pidfile nobody holds, naming a dead pid -> replaced
    (multi.rundir / "w1.pid").write_text("999999\n1\n")
    # foreign: a pidfile naming a live process that is not the node (this test's pid)
    me = os.getpid()
    (multi.rundir / "w2.pid").write_text(f"{me}\n{(pidfile.process_start_time(me) or 0) + 7}\n")
    code, out = multi.json("stop", "w1", "w2")
    assert code == 1
    assert "stale" in out[0]["message"]
    assert out[1]["state"] == "foreign" and "not signalled" in out[1]["message"]
    assert pidfile.pid_alive(me)
    (multi.rundir / "w2.pid").write_text(f"{me}\n{(pidfile.process_start_time(me) or 0) + 7}\n")
    code, out = multi.json("start", "w2")
    assert code == 0, out  # the unlocked file was replaced; we were not signalled
    assert out[0]["pid"] != me


def test_broken_app_fails_with_the_log(multi: Multi, tmp_path: Path) -> None:
    bad = Multi(multi.rundir, "redis://127.0.0.1:1/0", multi.env)
    r = bad("start", "w1")
    assert r.returncode == 74  # broker unreachable; the details on stderr
    assert "127.0.0.1:1" in r.stderr and "last lines of" in r.stderr
    assert not pidfile.read(multi.rundir / "w1.pid") or \
        not pidfile.read(multi.rundir / "w1.pid").running
    r = subprocess.run([sys.executable, "-m", "qops", "multi", "start", "w1", "-A",
                        "no_such_app_mod", "-b", multi.broker], env=multi.env,
                       cwd=multi.rundir, capture_output=True, text=True, timeout=60)
    # multi loads the app itself first: the error comes before anything is forked
    assert r.returncode == 2 and "no_such_app_mod" in r.stderr


def test_stopwait_escalates_to_quit_for_a_blocking_task(multi: Multi) -> None:
    assert multi("start", "w1", "-c", "1").returncode == 0
    r = subprocess.run([sys.executable, "-m", "qops", "-A", "proj", "-b", multi.broker,
                        "call", "proj.tasks.sleep", "--args", "[60]"], env=multi.env,
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    time.sleep(1.0)  # the task is running
    start = time.monotonic()
    code, out = multi.json("stopwait", "w1", "--timeout", "1")
    assert code == 0 and "QUIT" in out[0]["message"]
    assert time.monotonic() - start < 15


def test_stopwait_kills_the_group_when_quit_is_ignored(multi: Multi) -> None:
    # a stubborn "node": holds its pidfile lock, ignores TERM and QUIT
    path = multi.rundir / "w1.pid"
    code = (
        "import signal, time, sys\n"
        "from qops.ops.pidfile import Pidfile\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGQUIT, signal.SIG_IGN)\n"
        f"Pidfile({str(path)!r}).acquire()\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=multi.env,
                            stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        code_, out = multi.json("stopwait", "w1", "--timeout", "0.5")
        assert code_ == 0 and out[0]["state"] == "killed"
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_rolling_restart_keeps_a_node_answering(multi: Multi) -> None:
    assert multi("start", "w1", "w2", "-P", "threads").returncode == 0
    stop = False
    answered: list[int] = []

    def watch() -> None:
        while not stop:
            r = subprocess.run([sys.executable, "-m", "qops", "-b", multi.broker, "--json",
                                "status", "--timeout", "1"], env=multi.env,
                               capture_output=True, text=True, timeout=30)
            answered.append(len(json.loads(r.stdout)["nodes"]) if r.stdout else 0)

    import threading

    t = threading.Thread(target=watch)
    t.start()
    try:
        code, out = multi.json("restart", "w1", "w2")
    finally:
        stop = True
        t.join(30)
    assert code == 0, out
    assert answered and min(answered) >= 1, answered


def test_ctrl_c_during_start_says_where_the_nodes_are(multi: Multi) -> None:
    """Ctrl-C while multi waits for its nodes: the nodes go on starting (their own
    sessions), and multi says so and shows their state, exit 130."""
    (multi.rundir / "slowstart.py").write_text(
        "import sys, time\n"
        "if 'worker' in sys.argv:\n"
        "    time.sleep(3)  # a slow start: multi is still waiting at the Ctrl-C\n"
        "from proj.qops import app\n")
    env = {**multi.env, "PYTHONPATH": f"{multi.rundir}{os.pathsep}{multi.env['PYTHONPATH']}"}
    p = subprocess.Popen([sys.executable, "-m", "qops", "multi", "start", "w1", "-A",
                          "slowstart", "-b", multi.broker], env=env, cwd=multi.rundir,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         # as from a shell: pytest-xdist's workers ignore SIGINT, and
                         # an ignored signal stays ignored across exec
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    up = False
    try:
        assert wait_until(lambda: (multi.rundir / "w1.pid.cmd").exists(), timeout=30)
        time.sleep(0.5)  # launched, not running yet
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 130, (out, err)
        assert "interrupted: nodes already launched go on starting" in err
        assert "> w1@" in out, out
    finally:
        if p.poll() is None:
            p.kill()
        # the node goes on starting whatever happened above: wait for it, then stop it
        up = wait_until(lambda: multi("status", "w1").returncode == 0, timeout=30)
        multi.pidfiles.add(multi.rundir / "w1.pid")  # killed by the fixture if still up
    assert up
    assert multi("stopwait", "w1").returncode == 0


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to drop privileges")
def test_root_guard_and_uid_drop(nobody_python: ReachablePython) -> None:
    import shutil
    import tempfile

    # the node keeps importing after it drops to nobody: qops from a copy nobody can
    # reach (the checkout and its venv may be closed to nobody)
    env = nobody_python.env(qops_env())
    env.pop("QOPS_FORCE_ROOT")
    # pytest's tmp_path is private to root: the dropped-to user needs a way in
    shared = Path(tempfile.mkdtemp(prefix="qops-uid-"))
    os.chmod(shared, 0o777)
    broker = f"sqlite://{shared}/broker.db"
    m = Multi(shared, broker, env, python=nobody_python.python)
    try:
        r = m("start", "w1")
        assert r.returncode == 77 and "QOPS_FORCE_ROOT=1" in r.stderr and "--uid" in r.stderr
        # directories multi creates belong to the user that writes in them
        run, logs = shared / "run" / "qops", shared / "log" / "qops"
        code, out = m.json("start", "w1", "--uid", "nobody", "--gid", "nogroup",
                           f"--rundir={run}", f"--logdir={logs}")
        assert code == 0, out
        pid = out[0]["pid"]
        status = Path(f"/proc/{pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == ["65534"] * 4
        for folder in (run, run.parent, logs, logs.parent):
            assert folder.stat().st_uid == 65534, folder
        assert (run / "w1.pid.cmd").stat().st_uid == 0  # the record stays root's
        assert m.json("restart", "w1", f"--rundir={run}")[0] == 0
        assert m.json("stopwait", "w1", f"--rundir={run}")[0] == 0
    finally:
        m.cleanup()
        shutil.rmtree(shared, ignore_errors=True)
