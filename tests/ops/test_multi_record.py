"""``qops multi`` from the node record alone, its exit codes, node names and SIGHUP
(subprocesses, as an operator runs them)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qops.ops import pidfile
from tests.helpers import EXAMPLES, qops_env, wait_until


class Shell:
    """``qops ...`` run in a directory, as a shell script would; kills what it started."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.env = env

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "qops", *args], env=self.env,
                              cwd=self.cwd, capture_output=True, text=True, timeout=timeout)

    def cleanup(self) -> None:
        for path in self.cwd.rglob("*.pid"):
            info = pidfile.read(path)
            if info and info.locked and pidfile.pid_alive(info.pid):
                os.killpg(os.getpgid(info.pid), signal.SIGKILL)


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    # the app is a copy in the run directory, so a test can break it
    shutil.copytree(EXAMPLES / "proj", tmp_path / "proj")
    env = qops_env()
    env["PYTHONPATH"] = env["PYTHONPATH"].replace(str(EXAMPLES), str(tmp_path))
    s = Shell(tmp_path, env)
    yield s
    s.cleanup()


def _pids(out: str) -> dict[str, int]:
    return {o["node"].split("@")[0]: o["pid"] for o in json.loads(out)}


@pytest.mark.parametrize("broker", ["sqlite", "redis", "amqp"])
def test_restart_from_the_record_alone(shell: Shell, broker: str,
                                       request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(f"{broker}_url")
    r = shell("multi", "start", "w1", "w2", "-A", "proj", "-b", url, "-P", "threads",
              "-c", "1", "--json")
    assert r.returncode == 0, r.stderr
    before = _pids(r.stdout)
    # the pidfile is the pid alone; the record is private; no password in any argv
    assert (shell.cwd / "w1.pid").read_text() == f"{before['w1']}\n"
    assert (shell.cwd / "w1.pid.cmd").stat().st_mode & 0o777 == 0o600
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    ours = [line for line in ps.splitlines() if str(shell.cwd) in line]  # our nodes
    assert len(ours) >= 2 and not any(url in line or "guest:guest" in line for line in ours)
    record = json.loads((shell.cwd / "w1.pid.cmd").read_text())
    assert record["env"]["QOPS_BROKER_URL"] == url and record["pid"] == before["w1"]
    files = set(shell.cwd.iterdir())
    # the README's line: no -A, no -b; the default broker is not the nodes' one
    r = shell("multi", "restart", "w1", "w2", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    after = _pids(r.stdout)
    assert set(after.values()).isdisjoint(before.values())
    assert all(pidfile.read(shell.cwd / f"{n}.pid").running for n in ("w1", "w2"))
    assert set(shell.cwd.iterdir()) == files  # no stray SQLite file
    r = shell("multi", "status", "w1", "w2")
    assert r.returncode == 0 and r.stdout.count("OK") == 2
    assert "-c 1" in shell("multi", "show", "w1").stdout
    assert shell("multi", "stopwait", "w1", "w2").returncode == 0


def test_restart_checks_every_node_before_stopping_one(shell: Shell, sqlite_url: str
                                                       ) -> None:
    r = shell("multi", "start", "w1", "w2", "-A", "proj", "-b", sqlite_url, "-P", "solo",
              "--json")
    assert r.returncode == 0, r.stderr
    before = _pids(r.stdout)
    (shell.cwd / "proj" / "tasks.py").write_text("raise ImportError('broken on purpose')\n")
    r = shell("multi", "restart", "w1", "w2", "--json")
    assert r.returncode != 0
    assert "broken on purpose" in r.stderr
    assert all(o["result"] == "failed" for o in json.loads(r.stdout))
    for name, pid in before.items():  # nothing was stopped
        assert pidfile.read(shell.cwd / f"{name}.pid").pid == pid and pidfile.pid_alive(pid)
    # the root guard: a record without QOPS_FORCE_ROOT would be refused (77), before
    # any node goes down
    if os.getuid() == 0:
        shutil.copytree(EXAMPLES / "proj", shell.cwd / "proj", dirs_exist_ok=True)
        record = json.loads((shell.cwd / "w2.pid.cmd").read_text())
        del record["env"]["QOPS_FORCE_ROOT"]
        path = shell.cwd / "w2.pid.cmd"
        path.write_text(json.dumps(record))
        path.chmod(0o600)
        r = shell("multi", "restart", "w1", "w2")
        assert r.returncode == 77, r.stderr
        assert pidfile.read(shell.cwd / "w1.pid").pid == before["w1"]


def test_status_exit_codes_and_stale_pidfiles(shell: Shell, sqlite_url: str) -> None:
    r = shell("multi", "status", "w1", "w2")
    assert r.returncode == 69 and r.stdout.count("DOWN") == 2
    assert shell("multi", "start", "w2", "-A", "proj", "-b", sqlite_url,
                 "-P", "solo").returncode == 0
    r = shell("multi", "status", "w1", "w2", "--json")
    assert r.returncode == 75
    doc = json.loads(r.stdout)
    assert [o["state"] for o in doc] == ["stopped", "running"]
    assert [o["exit_code"] for o in doc] == [69, 0]  # a down node is no success
    # an older qops's two-line pidfile is read, and rewritten with the pid alone
    path = shell.cwd / "w2.pid"
    pid = int(path.read_text())
    path.write_text(f"{pid}\n{pidfile.process_start_time(pid)}\n")
    assert shell("multi", "status", "w2").returncode == 0
    assert path.read_text() == f"{pid}\n"
    assert shell("multi", "kill", "w2").returncode == 0
    # after a kill (or a crash) the record stays: start works from it alone, as every
    # verb does (it said "this command needs the app"); w1 has none, so it needs -A
    r = shell("multi", "start", "w2", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)[0]["result"] == "ok"
    assert shell("multi", "start", "w1").returncode == 2
    assert shell("multi", "stopwait", "w2").returncode == 0


def test_node_names_are_checked_everywhere(shell: Shell, sqlite_url: str) -> None:
    for name in ("a/b", "..", "@host", "w1@", "x" * 300, "w1@a/../b"):
        for args in (["multi", "start", name, "-A", "proj", "-b", sqlite_url],
                     ["-A", "proj", "-b", sqlite_url, "worker", "-n", name],
                     ["generate", "systemd", name, "--user", "nobody"]):
            r = shell(*args)
            assert r.returncode == 2, (args, r.stderr)
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not list(shell.cwd.rglob("*.pid"))
    r = shell("multi", "names", "w1@%h", "celery@host.example.com", "worker.x")
    assert r.returncode == 0 and "celery@host.example.com" in r.stdout


def test_a_duplicate_live_node_name_is_refused(shell: Shell, redis_url: str) -> None:
    assert shell("multi", "start", "w1", "-A", "proj", "-b", redis_url,
                 "-P", "solo").returncode == 0
    # the same name from another run directory: the pidfile can't tell, the broker can
    r = shell("multi", "start", "w1", "-A", "proj", "-b", redis_url, "-P", "solo",
              f"--rundir={shell.cwd / 'other'}")
    assert r.returncode == 73, r.stdout + r.stderr
    assert "already running" in r.stderr
    # a second node that got in anyway (started as a library, no check) is seen by status
    name = json.loads(shell("multi", "names", "w1", "--json").stdout)[0]
    code = ("from qops.loading import load_app\nfrom qops.worker.worker import Worker\n"
            f"Worker(load_app('proj'), hostname={name!r}, pool='solo').start()\n")
    twin = subprocess.Popen([sys.executable, "-c", code], cwd=shell.cwd, start_new_session=True,
                            env=dict(shell.env, QOPS_BROKER_URL=redis_url))
    try:
        def seen() -> bool:
            r = shell("-b", redis_url, "status", "--json", "--timeout", "5")
            return r.returncode == 1 and json.loads(r.stdout)["duplicates"] == [name]
        assert wait_until(seen, timeout=30)

        def warned() -> bool:
            r = shell("-b", redis_url, "status", "--timeout", "5")
            return r.returncode == 1 and "more than one node answers as" in r.stderr
        assert wait_until(warned, timeout=30)
    finally:
        os.killpg(twin.pid, signal.SIGKILL)
        twin.wait()
    assert shell("multi", "stopwait", "w1").returncode == 0


def test_hup_reopens_the_logs_of_pool_children(shell: Shell, sqlite_url: str) -> None:
    r = shell("multi", "start", "w1", "-A", "proj", "-b", sqlite_url, "-P", "prefork",
              "-c", "2", "--json")
    assert r.returncode == 0, r.stderr
    pid = _pids(r.stdout)["w1"]
    logs = [shell.cwd / name for name in ("w1.log", "w1-1.log", "w1-2.log")]
    assert wait_until(lambda: all(p.exists() for p in logs), timeout=10)
    for p in logs:
        p.rename(p.with_name(p.name + ".1"))
    os.kill(pid, signal.SIGHUP)
    assert wait_until(lambda: all(p.exists() for p in logs), timeout=10), \
        [p.name for p in shell.cwd.iterdir()]
    assert shell("multi", "stopwait", "w1").returncode == 0


@pytest.mark.parametrize("url", ["redis://localhost:6379/db0", "sqlite:///missing-qops-dir/x.db",
                                 "rabbitmq://guest@localhost//"])
def test_start_with_a_bad_broker_url_writes_nothing(shell: Shell, url: str) -> None:
    """A malformed URL is a usage error before a record, pidfile or log is written."""
    r = shell("-A", "proj", "multi", "start", "w1", "-b", url)
    assert r.returncode == 2, r.stdout + r.stderr
    assert not list(shell.cwd.glob("w1*")) and not Path("/missing-qops-dir").exists()


def test_empty_node_name_is_a_usage_error(shell: Shell) -> None:
    """``-n ''`` is refused (it used to start a node under the default name)."""
    env = {**shell.env, "QOPS_FORCE_ROOT": "1"}
    r = subprocess.run([sys.executable, "-m", "qops", "-A", "proj", "-b",
                        f"sqlite:///{shell.cwd}/b.db", "worker", "-n", ""], env=env,
                       cwd=shell.cwd, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "empty name part" in r.stderr
