"""What every benchmark script shares: the processes it starts (each in its own process
group, stopped by pid / process group, never by name), progress on stderr, RabbitMQ's
port and ``rabbitmqctl`` for a vhost of the run's own, and the Redis URL option."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

AMQP_HOST, AMQP_PORT = "127.0.0.1", 5672
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"


class PhaseError(Exception):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- processes ---------------------------------------------------------------------------


class Processes:
    """Every process the benchmark starts: own process group, stopped by pid/group."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], env: dict[str, str], cwd: Path,
              logfile: Path | None = None) -> subprocess.Popen[bytes]:
        out: Any = open(logfile, "ab") if logfile else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if logfile:
                out.close()
        self.procs.append(proc)
        return proc

    def run(self, cmd: list[str], env: dict[str, str], cwd: Path, timeout: float,
            what: str) -> str:
        """Run to completion (own process group); stdout, or PhaseError."""
        proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        self.procs.append(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc, grace=2)
            raise PhaseError(f"{what}: gave up after {timeout:.0f}s") from None
        finally:
            self.stop(proc, grace=0)
        if proc.returncode != 0:
            raise PhaseError(f"{what} exited with {proc.returncode}: {tail(err.decode())}")
        return out.decode()

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 20) -> None:
        """TERM the process (a worker's warm shutdown), then KILL its whole group."""
        if proc.poll() is None and grace > 0:
            try:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(grace)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # pool children too
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            log(f"warning: pid {proc.pid} did not exit after SIGKILL")
        if proc in self.procs and proc.poll() is not None:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc, grace=5)


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its live descendants (a
    worker and its pool processes), from /proc; 0.0 where there is no /proc. On a
    shared machine this is the measure to compare (wall time depends on the others)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    used: dict[int, float] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0.0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # (the name may hold spaces)
        parent[int(entry)] = int(fields[1])
        used[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += used.get(p, 0.0)
        todo += [child for child, ppid in parent.items() if ppid == p]
    return total


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def raise_on_term(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_bench(prefix: str, body: Callable[[Processes, Path], tuple[int, bool]],
              after: Callable[[], None] | None = None) -> int:
    """A bench script's main: ``body(procs, tmp)`` returns (exit code, keep tmp). TERM
    and HUP stop it as Ctrl-C does (exit 130, tmp kept); every process started through
    ``procs`` is stopped, then ``after`` runs; tmp is removed unless kept."""
    signal.signal(signal.SIGTERM, raise_on_term)
    signal.signal(signal.SIGHUP, raise_on_term)
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    keep = True
    try:
        code, keep = body(procs, tmp)
        return code
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc or 'Ctrl-C'}): stopping what was started")
        return 130
    finally:
        procs.stop_all()
        if after is not None:
            after()
        if keep:
            log(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def doc_head(bench: str, loadavg: tuple[float, float, float]) -> dict[str, Any]:
    """The first fields of every script's JSON document."""
    return {"bench": bench, "date": dt.datetime.now().astimezone().isoformat(
        timespec="seconds"), "host": {"cpus": os.cpu_count(), "loadavg_at_start": loadavg}}


# -- brokers -----------------------------------------------------------------------------


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def rabbitmqctl(*args: str) -> str:
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        raise PhaseError("rabbitmqctl not found")
    res = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise PhaseError(f"rabbitmqctl {' '.join(args)}: {tail(res.stderr or res.stdout)}")
    return res.stdout


def broker_cpu(broker: Broker) -> float:
    """CPU seconds the broker's server process has used so far (0.0 without one)."""
    return tree_cpu(broker.pid) if broker.pid else 0.0


def _local_pid(value: Any) -> int | None:
    """``value`` as the pid of a process this machine runs, else None."""
    try:
        pid = int(str(value).strip())
    except ValueError:
        return None
    return pid if os.path.exists(f"/proc/{pid}") else None


BROKERS = ("redis", "amqp", "sqlite")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")  # a server whose pid /proc can read
BROKER_TITLES = {"redis": "Redis", "amqp": "RabbitMQ", "sqlite": "SQLite"}


@dataclass
class Broker:
    """One broker of a run: Redis (``redis_url``, the bench's db), RabbitMQ (a vhost of
    the run's own, deleted by close()) or SQLite (a fresh file in ``tmp`` per phase)."""

    name: str
    tmp: Path
    redis_url: str = DEFAULT_REDIS_URL
    vhost: str | None = None
    count: int = 0
    #: the broker server's process on this machine (None: SQLite, or not found); its
    #: CPU per task is the other half of a worker's cost
    pid: int | None = None

    def open(self) -> None:
        if self.name == "amqp":
            if not port_open(AMQP_HOST, AMQP_PORT):
                raise PhaseError(f"RabbitMQ is not listening on {AMQP_HOST}:{AMQP_PORT}")
            self.vhost = f"qops-bench-{uuid.uuid4().hex[:8]}"
            rabbitmqctl("add_vhost", self.vhost)
            rabbitmqctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
            self.pid = _local_pid(rabbitmqctl("eval", "list_to_integer(os:getpid())."))
        elif self.name == "redis" and urlsplit(self.redis_url).hostname in LOCAL_HOSTS:
            import redis

            client = redis.Redis.from_url(self.redis_url)
            try:
                self.pid = _local_pid(client.info("server").get("process_id"))
            finally:
                client.close()

    def phase_url(self) -> str:
        """The broker URL for the next phase (SQLite: a fresh file each time)."""
        self.count += 1
        if self.name == "redis":
            return self.redis_url
        if self.name == "amqp":
            return f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/{self.vhost}"
        return f"sqlite:///{self.tmp / f'bench-{self.count}.db'}"

    def close(self) -> None:
        if self.name == "amqp" and self.vhost:
            vhost, self.vhost = self.vhost, None
            rabbitmqctl("delete_vhost", vhost)


def clean_env(pythonpath: list[Path]) -> dict[str, str]:
    """This environment without QOPS_*, CELERY_*, BENCH_* and DRAMATIQ_* variables, with
    ``pythonpath`` and no bytecode writes; QOPS_FORCE_ROOT=1 when running as root (a
    container; Celery and Dramatiq only warn)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("QOPS_", "CELERY_", "BENCH_", "DRAMATIQ_"))}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if os.geteuid() == 0:
        env["QOPS_FORCE_ROOT"] = "1"
    return env


def versions(pythons: dict[str, tuple[Path | None, list[str]]]) -> dict[str, str]:
    """``side:package`` -> version for each side's interpreter and packages."""
    out: dict[str, str] = {}
    code = ("import importlib.metadata as m, json, sys; "
            "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))")
    for side, (python, names) in pythons.items():
        if python is None:
            continue
        res = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True)
        if res.returncode == 0:
            out.update({f"{side}:{k}": v for k, v in json.loads(res.stdout).items()})
    out["python"] = sys.version.split()[0]
    return out


def redis_db(url: str) -> int:
    """The db number of a ``redis://host:port/db`` URL (0 when it names none)."""
    path = urlsplit(url).path.strip("/")
    return int(path) if path else 0


def qops_tree(src: Path, rev: str | None, tmp: Path) -> tuple[Path, str]:
    """The qops source to run (first on PYTHONPATH): the working tree ``src``, or its git
    revision ``rev`` exported with ``git archive`` (read-only for the repository) into
    ``tmp``; and a description of it."""
    src = src.resolve()
    if not rev:
        res = subprocess.run(["git", "-C", str(src), "describe", "--always", "--dirty"],
                             capture_output=True, text=True)
        desc = res.stdout.strip() if res.returncode == 0 else "not a git checkout"
        compile_qops(src)
        return src, f"working tree {src} ({desc})"
    sha = subprocess.run(["git", "-C", str(src), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    dest = tmp / "qops-src"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(src), "archive", sha], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    compile_qops(dest)
    return dest, f"git archive {sha[:12]} ({rev})"


def compile_qops(root: Path) -> None:
    """Write the bytecode of ``root``/qops, as pip does when it installs a package: the
    runs set PYTHONDONTWRITEBYTECODE (so nothing else is written), and a fresh checkout
    would otherwise compile every module it imports on every start, which the installed
    peers never do (it doubled ``qops --help`` in a fresh clone)."""
    import compileall

    compileall.compile_dir(str(root / "qops"), quiet=1)


def spread(values: list[float], digits: int = 1) -> dict[str, Any]:
    """Median, lowest, highest and every run (rounded to ``digits``), for a JSON row."""
    import statistics

    if not values:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {"median": round(statistics.median(values), digits),
            "min": round(min(values), digits), "max": round(max(values), digits),
            "runs": [round(v, digits) for v in values]}
