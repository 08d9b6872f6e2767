"""Starting and stopping real worker processes in tests.

Every process is started in its own process group and stopped by pid (never by name);
``WorkerProcess`` is a context manager so a failing test still stops it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def qops_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(EXAMPLES), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["QOPS_FORCE_ROOT"] = "1"  # tests run as root here; the guard has its own tests
    env.pop("QOPS_CONFIG", None)
    # fast liveness for tests: settings, not special cases in the code
    env.setdefault("QOPS_WORKER_HEARTBEAT_INTERVAL", "0.5")
    env.setdefault("QOPS_WORKER_HEARTBEAT_TTL", "3")
    env.update(extra)
    return env


#: ``--timeout`` for a remote-control command (inspect, control, status) whose replies a
#: test asserts. The command returns as soon as the nodes it expects have answered, so
#: the deadline only matters for a slow node: the CLI's 1 s default (Celery's) is a bet
#: on an idle machine, which a 2-core machine running the suite in parallel is not. Tests
#: that poll until a node is up, or that expect silence, give their own.
REPLY_TIMEOUT = "10"


def run_qops(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qops", *args], env=env or qops_env(),
                          capture_output=True, text=True, timeout=timeout, input=input,
                          cwd=str(ROOT))

def drain(consumer: Any, n: int, timeout: float = 5.0) -> list[Any]:
    """Up to ``n`` deliveries from ``consumer``, waiting at most ``timeout`` seconds."""
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        d = consumer.get(0.2)
        if d is not None:
            out.append(d)
    return out



class WorkerProcess:
    def __init__(self, *args: str, broker: str, backend: str | None = None,
                 app: str = "proj", env: dict[str, str] | None = None,
                 logfile: Path | None = None) -> None:
        # a node name of its own unless the test names it: two workers of one test on
        # one broker would otherwise share the default name, and the second is refused
        name = [] if "-n" in args else ["-n", f"w{uuid.uuid4().hex[:8]}@%h"]
        self.args = ["-A", app, "-b", broker, *(["--result-backend", backend] if backend else []),
                     "worker", *name, *args]
        self.env = env or qops_env()
        self.logfile = logfile
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_start = 0  # where this run's lines begin in the (appended) logfile

    def start(self) -> WorkerProcess:
        out = open(self.logfile, "ab") if self.logfile else subprocess.DEVNULL  # noqa: SIM115
        self.log_start = self.logfile.stat().st_size if self.logfile else 0
        self.proc = subprocess.Popen([sys.executable, "-m", "qops", *self.args], env=self.env,
                                     stdout=out, stderr=subprocess.STDOUT if self.logfile
                                     else subprocess.DEVNULL,
                                     cwd=str(ROOT), start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def log(self) -> str:
        """What the node wrote to its logfile so far ("" before it wrote anything)."""
        assert self.logfile is not None, "a WorkerProcess without a logfile has no log"
        try:
            return self.logfile.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = 30) -> None:
        """Until the node logs "<name> ready." (needs ``-l INFO``): by then its remote
        control answers. Watching the log costs nothing, where polling with a CLI
        command costs a Python start each time and, sent before the node listens, waits
        out its whole --timeout. Fails at once if the node exits instead. Only this run's
        lines count: a node started again appends to the same logfile."""
        def this_run() -> bytes:
            assert self.logfile is not None
            try:
                with open(self.logfile, "rb") as f:
                    f.seek(self.log_start)
                    return f.read()
            except FileNotFoundError:
                return b""

        ok = wait_until(lambda: b" ready." in this_run() or (self.proc is not None and
                                                              self.proc.poll() is not None),
                        timeout=timeout)
        assert self.proc is not None and self.proc.poll() is None, \
            f"worker exited at start-up:\n{self.log()[-3000:]}"
        assert ok, f"worker not ready within {timeout}s:\n{self.log()[-3000:]}"

    def wait(self, timeout: float = 20) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 20) -> int | None:
        """TERM (warm), then KILL of the whole process group if it does not exit."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # pool children too
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def stop_group(proc: subprocess.Popen[Any], timeout: float = 20) -> None:
    """TERM the process group ``proc`` leads (started with start_new_session), then KILL
    it if it has not exited within ``timeout``."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wait_until(predicate: Any, timeout: float = 10, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
