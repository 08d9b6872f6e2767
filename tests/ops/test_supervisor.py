"""A real supervisord runs what ``qops generate supervisor`` writes.

Each test starts its own supervisord (from the supervisor package) on a private socket
in a fresh directory, talks to it with supervisorctl, and at the end stops it by its pid
and checks that no process it started is left. Programs get the environment the test
gives supervisord, never the test's own QOPS_FORCE_ROOT.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import EXAMPLES, REPLY_TIMEOUT, ROOT, run_qops, wait_until
from tests.reachable import ReachablePython

BIN = Path(sys.executable).parent
HOST = socket.gethostname()


def tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: pip install supervisor (a test dependency)")
    return found


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("QOPS_FORCE_ROOT", "C_FORCE_ROOT", "QOPS_CONFIG", "QOPS_APP",
                        "QOPS_BROKER_URL", "QOPS_RESULT_BACKEND", "NOTIFY_SOCKET")}
    env.update(extra)
    return env


class Supervisord:
    """supervisord -n on a private socket; stopped by its pid."""

    def __init__(self, folder: Path, programs: str, env: dict[str, str]) -> None:
        self.folder = folder
        self.conf = folder / "supervisord.conf"
        self.conf.write_text(programs + f"""
[supervisord]
logfile={folder}/supervisord.log
pidfile={folder}/supervisord.pid
childlogdir={folder}
nodaemon=true

[unix_http_server]
file={folder}/supervisor.sock

[supervisorctl]
serverurl=unix://{folder}/supervisor.sock

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
""")
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: set[int] = set()  # pids of every program seen running

    def start(self) -> Supervisord:
        out = open(self.folder / "supervisord.out", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([tool("supervisord"), "-n", "-c", str(self.conf)],
                                     env=self.env, cwd=str(self.folder), stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        assert wait_until(lambda: self.ctl("pid").returncode == 0, 15), self.log()
        return self

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tool("supervisorctl"), "-c", str(self.conf), *args],
                              capture_output=True, text=True, timeout=timeout, env=self.env)

    def status(self) -> dict[str, str]:
        out = {}
        for line in self.ctl("status").stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2:
                out[parts[0]] = parts[1]
                if parts[1] == "RUNNING" and "pid" in parts:
                    self.seen.add(int(parts[parts.index("pid") + 1].rstrip(",")))
        return out

    def wait_state(self, names: list[str], states: set[str], timeout: float = 20) -> bool:
        return wait_until(lambda: all(self.status().get(n) in states for n in names),
                          timeout, interval=0.2)

    def pid(self, name: str) -> int:
        return int(self.ctl("pid", name).stdout.strip())

    def log(self) -> str:
        path = self.folder / "supervisord.log"
        return path.read_text() if path.exists() else "(no supervisord.log)"

    def stop(self) -> None:
        """TERM supervisord (it stops its programs), then KILL whatever is left."""
        if self.proc is None:
            return
        self.status()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        for pid in [self.proc.pid, *self.seen]:
            try:
                os.killpg(pid, signal.SIGKILL)  # supervisord's, and each program's group
            except (ProcessLookupError, PermissionError):
                pass
        if self.proc.poll() is None:
            self.proc.wait(10)

    def leftovers(self) -> list[int]:
        """Processes started under this supervisord (its socket is in their environment)."""
        marker = f"{self.folder}/supervisor.sock".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if marker in (entry / "environ").read_bytes() or \
                        marker.replace(b"supervisor.sock", b"supervisord.conf") in \
                        (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
        return found


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may write (tmp_path is root's only): the SQLite broker,
    logs and beat's schedule of programs that run as another user."""
    folder = Path(tempfile.mkdtemp(prefix="qops-sv-"))
    folder.chmod(0o777)
    for sub in ("log", "state"):
        (folder / sub).mkdir()
        (folder / sub).chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def generate(folder: Path, *args: str, broker: str, workdir: str = str(EXAMPLES)) -> str:
    r = run_qops("-A", "proj", "-b", broker, "--workdir", workdir, "generate",
                 "supervisor", "--logdir", str(folder / "log"), "--statedir",
                 str(folder / "state"), "--startsecs", "2", "-c", "2", *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def client(*args: str, broker: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qops", "-b", broker, *args],
                          env=clean_env(PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=60, cwd=str(ROOT))


def ping(broker: str, *nodes: str) -> bool:
    """Every node answers (RUNNING comes after startsecs, not necessarily after the
    worker consumes: allow it a little longer)."""
    def answered() -> bool:
        r = client("--json", "inspect", "ping", "-d", ",".join(f"{n}@{HOST}" for n in nodes),
                   "--timeout", "2", broker=broker)
        return r.returncode == 0

    return wait_until(answered, 20, interval=0.2)


def test_nodes_run_stop_warm_and_restart_under_supervisord(
        shared_dir: Path, request: pytest.FixtureRequest) -> None:
    if os.getuid() == 0:  # the programs run as nobody, from a copy nobody can reach
        reach: ReachablePython = request.getfixturevalue("nobody_python")
        user, qops_bin, pythonpath, workdir = \
            reach.user, f"{reach.python} -m qops", reach.path, reach.path
    else:
        user = pwd.getpwuid(os.getuid()).pw_name
        qops_bin, pythonpath, workdir = f"{sys.executable} -m qops", str(ROOT), str(EXAMPLES)
    broker = f"sqlite:///{shared_dir}/broker.db"
    programs = generate(shared_dir, "w1", "w2", "--user", user, "--qops-bin", qops_bin,
                        "--stop-timeout", "20", broker=broker, workdir=workdir)
    sv = Supervisord(shared_dir, programs, clean_env(
        PYTHONPATH=pythonpath, QOPS_WORKER_HEARTBEAT_INTERVAL="0.5"))
    try:
        sv.start()
        names = ["qops:qops-w1", "qops:qops-w2"]
        assert sv.wait_state(names + ["qops:qops-beat"], {"RUNNING"}), \
            sv.status() | {"log": sv.log()}
        for name in names:  # the programs run as the configured user
            assert Path(f"/proc/{sv.pid(name)}").stat().st_uid == pwd.getpwnam(user).pw_uid
        assert ping(broker, "w1", "w2")  # -n w1@%%h reached qops as w1@%h

        # a task in flight while supervisorctl stops the nodes: it finishes first
        # long enough to be still running when seen, on a busy machine too
        r = client("call", "proj.tasks.sleep", "--args", "[6]", broker=broker)
        assert r.returncode == 0, r.stderr
        task_id = r.stdout.strip()

        def running() -> bool:
            out = client("--json", "inspect", "active", "--timeout", REPLY_TIMEOUT,
                         broker=broker).stdout
            return task_id in out

        assert wait_until(running, 20, interval=0.2)
        pids = {name: sv.pid(name) for name in names}
        began = time.monotonic()
        r = sv.ctl("stop", "qops:*")  # TERM to each, in parallel; returns when all exited
        assert r.returncode == 0, r.stdout + r.stderr
        assert time.monotonic() - began > 1  # it waited for the task
        assert sv.status()["qops:qops-w1"] == "STOPPED"
        for pid in pids.values():
            assert not Path(f"/proc/{pid}").exists()
        r = client("--json", "result", task_id, broker=broker)
        assert r.returncode == 0, r.stdout + r.stderr
        assert '"status": "SUCCESS"' in r.stdout and '"result": 6' in r.stdout

        # start and restart bring them back, as new processes answering pings
        assert sv.ctl("start", "qops:*").returncode == 0
        assert sv.wait_state(names, {"RUNNING"})
        assert ping(broker, "w1", "w2")
        before = {name: sv.pid(name) for name in names}
        r = sv.ctl("restart", "qops:*")
        assert r.returncode == 0, r.stdout + r.stderr
        assert sv.wait_state(names, {"RUNNING"})
        after = {name: sv.pid(name) for name in names}
        assert all(after[n] != before[n] != pids[n] for n in names)
        assert ping(broker, "w1", "w2")
    finally:
        sv.stop()
    assert wait_until(lambda: not sv.leftovers(), 10), sv.leftovers()


@pytest.mark.skipif(os.getuid() != 0, reason="the root guard acts only for root")
def test_root_guard_under_supervisord(shared_dir: Path) -> None:
    """Without user= and without QOPS_FORCE_ROOT the program fails with the guard's
    message in its log (exit 77); with QOPS_FORCE_ROOT=1 it runs. (user= is the
    test above.)"""
    broker = f"sqlite:///{shared_dir}/broker.db"
    qops_bin = f"{sys.executable} -m qops"
    forced = generate(shared_dir, "f1", "--name", "forced", "--force-root", "--no-beat",
                      "--qops-bin", qops_bin, "--stop-timeout", "10", broker=broker)
    bare = generate(shared_dir, "b1", "--name", "bare", "--force-root", "--no-beat",
                    "--qops-bin", qops_bin, "--stop-timeout", "10", broker=broker)
    assert 'QOPS_FORCE_ROOT="1",' in bare
    bare = bare.replace('QOPS_FORCE_ROOT="1",', "")  # as if written by hand without it
    sv = Supervisord(shared_dir, forced + bare, clean_env(PYTHONPATH=str(ROOT)))
    try:
        sv.start()
        assert sv.wait_state(["forced:forced-f1"], {"RUNNING"}), sv.status()
        assert ping(broker, "f1")
        # it exits 77 at once, so supervisor retries it (BACKOFF), then gives up (FATAL)
        assert wait_until(lambda: "exited: bare-b1 (exit status 77; not expected)"
                          in sv.log(), 20), sv.log()
        assert sv.status()["bare:bare-b1"] in ("BACKOFF", "STARTING", "FATAL")
        log = (shared_dir / "log" / "b1.log").read_text()
        assert "refusing to run as root" in log and "QOPS_FORCE_ROOT=1" in log
    finally:
        sv.stop()
    assert wait_until(lambda: not sv.leftovers(), 10), sv.leftovers()
