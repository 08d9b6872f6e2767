"""Throughput benchmark: qops against Celery, same trivial task, same broker, same run.

    python bench/throughput.py [--n 10000] [--brokers redis,amqp,sqlite] [--concurrency 2]
                               [--pool prefork,threads] [--repeat 3] [--json]

For each broker, for each configuration, one *phase* (run ``--repeat`` times, medians
are reported):

1. **enqueue/s** -- a fresh producer process (qops: this interpreter; Celery: the
   benchmark's own venv, ``bench/.celery-venv``, created with ``python -m venv`` +
   ``pip install 'celery[redis]'`` when missing or incomplete) publishes ``--warmup`` tasks, then ``--n``
   tasks with ``add.delay(i, i)`` (``ignore_result``); the N publishes are timed inside
   the producer (bench/common/produce.py, the same file for both systems).
2. **tasks/s** -- with all of them queued, a worker is started (``qops -A benchapp worker``
   / ``celery -A benchapp worker``, same ``-c``, ``-Q <unique queue>``, ``-l WARNING``).
   The task, identical on both sides (bench/common/benchcounter.py), does one Redis INCR
   on a bench key. The task that completes the last warm-up task (counter == warmup)
   pushes a ``start`` timestamp, the one that completes the last task (counter ==
   warmup + N) an ``end`` timestamp (CLOCK_MONOTONIC, machine-wide on Linux); the
   benchmark BLPOPs both. tasks/s = N / (end - start): pure processing of N queued
   tasks by a warm worker, start-up and warm-up excluded, the last task's completion
   included, and no polling load on the machine. The counter is checked afterwards:
   it must be exactly warmup + N (no task lost, none run twice).

Fairness: same task code and Redis round-trip on both sides, same broker URL, same
concurrency (default 2 = this machine's cores), log level WARNING on both, each
worker's defaults otherwise (prefetch multiplier 4, no ``-O fair``, gossip/mingle/
heartbeat left on for Celery). qops's default is acks_late=True; Celery's is False, so
Celery runs both ways: ``celery prefork`` (its default, the baseline of the ratio
column) and ``celery prefork acks_late``. Each phase has its own queue name (qops
declares AMQP queues with ``x-max-priority``, Celery without, so one name cannot serve
both) and starts from an empty Redis db 14. The counter lives in Redis db 14 for every
broker, so Redis is needed even for ``--brokers amqp,sqlite``. qops's AMQP publishes
wait for publisher confirms; Celery's (py-amqp, default settings) do not.

Cleanup: Redis db 14 is flushed before each phase and at the end (only that db); the
AMQP run gets its own vhost (``rabbitmqctl add_vhost``), deleted at the end; SQLite
files live in a temporary directory. Every process started here runs in its own
process group and is stopped by pid / process group (TERM, then KILL), also on errors
and Ctrl-C. Each phase gives up after ``--timeout`` seconds and reports it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
COMMON = BENCH / "common"
QOPS_SIDE = BENCH / "qops_side"
CELERY_SIDE = BENCH / "celery_side"
sys.path.insert(0, str(COMMON))
from venvs import CELERY_VENV, celery_python  # noqa: E402  (bench/common is no package)

DEFAULT_CELERY_VENV = CELERY_VENV

REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 14
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
AMQP_HOST, AMQP_PORT = "127.0.0.1", 5672
COUNTER_KEY = "bench.counter"
MARKS_KEY = "bench.marks"
BROKERS = ("redis", "amqp", "sqlite")


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
            raise PhaseError(f"{what} exited with {proc.returncode}: {_tail(err.decode())}")
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


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _raise_on_term(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- brokers -----------------------------------------------------------------------------


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def rabbitmqctl(*args: str) -> None:
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        raise PhaseError("rabbitmqctl not found")
    res = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise PhaseError(f"rabbitmqctl {' '.join(args)}: {_tail(res.stderr or res.stdout)}")


@dataclass
class Broker:
    name: str
    tmp: Path
    vhost: str | None = None
    count: int = 0

    def open(self) -> None:
        if self.name == "amqp":
            if not port_open(AMQP_HOST, AMQP_PORT):
                raise PhaseError(f"RabbitMQ is not listening on {AMQP_HOST}:{AMQP_PORT}")
            self.vhost = f"qops-bench-{uuid.uuid4().hex[:8]}"
            rabbitmqctl("add_vhost", self.vhost)
            rabbitmqctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")

    def phase_url(self) -> str:
        """The broker URL for the next phase (SQLite: a fresh file each time)."""
        self.count += 1
        if self.name == "redis":
            return REDIS_URL
        if self.name == "amqp":
            return f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/{self.vhost}"
        return f"sqlite:///{self.tmp / f'bench-{self.count}.db'}"

    def close(self) -> None:
        if self.name == "amqp" and self.vhost:
            vhost, self.vhost = self.vhost, None
            rabbitmqctl("delete_vhost", vhost)


# -- configurations ------------------------------------------------------------------------


@dataclass
class Config:
    system: str  # qops | celery
    pool: str
    acks_late: bool
    baseline: bool = False

    @property
    def label(self) -> str:
        if self.system == "celery":
            acks = "acks_late" if self.acks_late else "default: acks early"
            return f"celery {self.pool} ({acks})"
        return f"qops {self.pool}" + (" (default: acks_late)" if self.pool == "prefork"
                                      else " (acks_late)")


@dataclass
class Outcome:
    broker: str
    config: Config
    runs: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def median(self, key: str) -> float | None:
        values = [r[key] for r in self.runs if r.get(key) is not None]
        return statistics.median(values) if values else None


# -- the benchmark -------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes, tmp: Path) -> None:
        import redis

        self.args = args
        self.procs = procs
        self.tmp = tmp
        self.redis = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
        self.run_id = uuid.uuid4().hex[:8]
        self.phase_no = 0
        self.celery_python: Path | None = None
        self.qops_python = Path(args.qops_python)
        self.qops_src, self.qops_source = self.qops_tree()

    # -- environment ---------------------------------------------------------------------
    def qops_tree(self) -> tuple[Path, str]:
        """The qops source to run (first on PYTHONPATH): the working tree, or ``--qops-rev``
        exported with ``git archive`` (read-only for the repository) into the temp dir."""
        args = self.args
        src = Path(args.qops_src).resolve()
        if not args.qops_rev:
            res = subprocess.run(["git", "-C", str(src), "describe", "--always", "--dirty"],
                                 capture_output=True, text=True)
            rev = res.stdout.strip() if res.returncode == 0 else "not a git checkout"
            return src, f"working tree {src} ({rev})"
        sha = subprocess.run(["git", "-C", str(src), "rev-parse", "--verify",
                              f"{args.qops_rev}^{{commit}}"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dest = self.tmp / "qops-src"
        dest.mkdir()
        archive = subprocess.run(["git", "-C", str(src), "archive", sha], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return dest, f"git archive {sha[:12]} ({args.qops_rev})"

    def ensure_celery_venv(self) -> Path:
        return celery_python(Path(self.args.celery_venv))

    def versions(self) -> dict[str, str]:
        out: dict[str, str] = {}
        code = ("import importlib.metadata as m, json, sys; "
                "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))")
        for python, names in ((self.qops_python, ["qops", "redis", "pika"]),
                              (self.celery_python, ["celery", "kombu", "amqp", "redis"])):
            if python is None:
                continue
            side = "qops" if python == self.qops_python else "celery-venv"
            for name in names:
                res = subprocess.run([str(python), "-c", code, name], capture_output=True,
                                     text=True)
                if res.returncode == 0:
                    out[f"{side}:{name}"] = json.loads(res.stdout)[name]
        out["python"] = sys.version.split()[0]
        return out

    def env(self, config: Config, broker_url: str, queue: str) -> dict[str, str]:
        env = dict(os.environ)
        for key in list(env):
            if key.startswith(("QOPS_", "CELERY_", "BENCH_")):
                del env[key]
        side = QOPS_SIDE if config.system == "qops" else CELERY_SIDE
        path = [str(side), str(COMMON)] + ([str(self.qops_src)] if config.system == "qops"
                                           else [])
        env["PYTHONPATH"] = os.pathsep.join(path)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.update({
            "BENCH_BROKER_URL": broker_url,
            "BENCH_QUEUE": queue,
            "BENCH_ACKS_LATE": "1" if config.acks_late else "0",
            "BENCH_COUNTER_URL": REDIS_URL,
            "BENCH_COUNTER_KEY": COUNTER_KEY,
            "BENCH_MARKS_KEY": MARKS_KEY,
            "BENCH_START_AT": str(self.args.warmup),
            "BENCH_END_AT": str(self.args.warmup + self.args.n),
        })
        if os.geteuid() == 0:
            env["QOPS_FORCE_ROOT"] = "1"  # a container running as root; Celery only warns
        return env

    def worker_cmd(self, config: Config, queue: str) -> list[str]:
        common = ["worker", "-c", str(self.args.concurrency), "-P", config.pool,
                  "-Q", queue, "-l", "WARNING"]
        if config.system == "qops":
            return [str(self.qops_python), "-m", "qops", "-A", "benchapp", *common]
        assert self.celery_python is not None
        return [str(self.celery_python), "-m", "celery", "-A", "benchapp", *common]

    # -- one phase -------------------------------------------------------------------------
    def phase(self, broker: Broker, config: Config) -> dict[str, Any]:
        args = self.args
        self.phase_no += 1
        queue = f"bench-{self.run_id}-{self.phase_no}"
        url = broker.phase_url()
        self.redis.flushdb()  # db 14 only: the counter and the Redis broker's keys
        env = self.env(config, url, queue)
        python = self.qops_python if config.system == "qops" else self.celery_python
        side = QOPS_SIDE if config.system == "qops" else CELERY_SIDE
        assert python is not None

        out = self.procs.run([str(python), str(COMMON / "produce.py"), str(args.warmup),
                              str(args.n)], env, side, args.timeout,
                             f"{config.system} producer")
        produced = json.loads(out.strip().splitlines()[-1])
        enqueue = args.n / produced["seconds"]

        logfile = self.tmp / f"worker-{self.phase_no}-{config.system}-{config.pool}.log"
        launched = time.monotonic()
        proc = self.procs.start(self.worker_cmd(config, queue), env, side, logfile)
        try:
            start = self.wait_mark("start", proc, launched, logfile)
            end = self.wait_mark("end", proc, launched, logfile)
        finally:
            self.procs.stop(proc)
        final = int(self.redis.get(COUNTER_KEY) or 0)
        expected = args.warmup + args.n
        if final != expected:
            raise PhaseError(f"counter is {final} after the run, expected {expected} "
                             "(tasks lost or run twice)")
        return {"enqueue_per_s": enqueue, "tasks_per_s": args.n / (end - start),
                "startup_s": start - launched, "seconds": end - start}

    def wait_mark(self, kind: str, proc: subprocess.Popen[bytes], launched: float,
                  logfile: Path) -> float:
        deadline = launched + self.args.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PhaseError(f"worker: no '{kind}' mark after {self.args.timeout:.0f}s "
                                 f"(counter at {int(self.redis.get(COUNTER_KEY) or 0)}); "
                                 f"log: {_tail(logfile.read_text(errors='replace'), 8)}")
            got = self.redis.blpop([MARKS_KEY], timeout=max(0.01, min(1.0, left)))
            if got is not None:
                raw = got[1]
                name, value = (raw.decode() if isinstance(raw, bytes) else raw).split()
                if name != kind:
                    raise PhaseError(f"got mark {name!r} before {kind!r}")
                return float(value)
            if proc.poll() is not None:
                raise PhaseError(f"worker exited with {proc.returncode}: "
                                 f"{_tail(logfile.read_text(errors='replace'))}")

    # -- everything ------------------------------------------------------------------------
    def configs(self, broker: str) -> list[Config]:
        out: list[Config] = []
        if broker != "sqlite":
            for pool in self.args.celery_pool:
                for acks in self.args.celery_acks:
                    out.append(Config("celery", pool, acks == "late",
                                      baseline=(pool == "prefork" and acks == "early")))
        for pool in self.args.pool:
            out.append(Config("qops", pool, True))
        return out

    def run(self) -> list[Outcome]:
        args = self.args
        self.redis.ping()
        if any(b != "sqlite" for b in args.brokers):
            self.celery_python = self.ensure_celery_venv()
        outcomes: list[Outcome] = []
        for name in args.brokers:
            broker = Broker(name, self.tmp)
            configs = self.configs(name)
            results = [Outcome(name, c) for c in configs]
            outcomes.extend(results)
            try:
                broker.open()
            except PhaseError as exc:
                for outcome in results:
                    outcome.errors.append(str(exc))
                log(f"[{name}] skipped: {exc}")
                continue
            try:
                # Repeats go round all configurations, so slow drifts hit each one alike.
                for rep in range(args.repeat):
                    for result in results:
                        c = result.config
                        what = f"[{name} {rep + 1}/{args.repeat}] {c.label}"
                        try:
                            r = self.phase(broker, c)
                        except PhaseError as exc:
                            result.errors.append(str(exc))
                            log(f"{what}: FAILED: {exc}")
                            continue
                        result.runs.append(r)
                        log(f"{what}: enqueue {r['enqueue_per_s']:,.0f}/s, "
                            f"tasks {r['tasks_per_s']:,.0f}/s (start-up {r['startup_s']:.2f}s)")
            finally:
                broker.close()
                self.redis.flushdb()
        return outcomes


# -- report ---------------------------------------------------------------------------------


def summarize(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    rows = []
    base: dict[str, dict[str, float | None]] = {}
    for o in outcomes:
        if o.config.baseline:
            base[o.broker] = {"tasks": o.median("tasks_per_s"),
                              "enqueue": o.median("enqueue_per_s")}
    for o in outcomes:
        tasks, enqueue = o.median("tasks_per_s"), o.median("enqueue_per_s")
        b = base.get(o.broker, {})
        bt, be = b.get("tasks"), b.get("enqueue")
        rows.append({
            "broker": o.broker, "system": o.config.system, "pool": o.config.pool,
            "acks_late": o.config.acks_late, "config": o.config.label,
            "enqueue_per_s": _round(enqueue), "tasks_per_s": _round(tasks),
            "tasks_vs_celery": round(tasks / bt, 2) if tasks and bt else None,
            "enqueue_vs_celery": round(enqueue / be, 2) if enqueue and be else None,
            "startup_s": _round(o.median("startup_s"), 2),
            "runs": len(o.runs),
            "all_tasks_per_s": [_round(r["tasks_per_s"]) for r in o.runs],
            "errors": o.errors,
        })
    return rows


def _round(value: float | None, digits: int = 0) -> float | None:
    if value is None:
        return None
    return round(value, digits) if digits else float(round(value))


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ["broker", "system/config", "enqueue/s", "tasks/s", "tasks x celery",
            "enqueue x celery", "start-up s"]
    lines = []
    for r in rows:
        def num(v: float | None, fmt: str = "{:,.0f}") -> str:
            return "-" if v is None else fmt.format(v)
        lines.append([r["broker"], r["config"], num(r["enqueue_per_s"]), num(r["tasks_per_s"]),
                      num(r["tasks_vs_celery"], "{:.2f}x"), num(r["enqueue_vs_celery"], "{:.2f}x"),
                      num(r["startup_s"], "{:.2f}")])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=False)]

    def fmt(cells: list[str]) -> str:
        return " | ".join(c.ljust(w) if i < 2 else c.rjust(w)
                          for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    print(fmt(head))
    print("-+-".join("-" * w for w in widths))
    for line in lines:
        print(fmt(line))
    for r in rows:
        for e in dict.fromkeys(r["errors"]):
            print(f"! {r['broker']} {r['config']}: {e}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def csv(text: str) -> list[str]:
        return [x.strip() for x in text.split(",") if x.strip()]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000, help="tasks measured per phase")
    p.add_argument("--warmup", type=int, default=100,
                   help="tasks run before the clock starts (queued ahead of the N)")
    p.add_argument("--brokers", type=csv, default=list(BROKERS), help="redis,amqp,sqlite")
    p.add_argument("--concurrency", "-c", type=int, default=os.cpu_count() or 2)
    p.add_argument("--pool", type=csv, default=["prefork", "threads"], help="qops pools")
    p.add_argument("--celery-pool", type=csv, default=["prefork"], help="Celery pools")
    p.add_argument("--celery-acks", type=csv, default=["early", "late"],
                   help="early (Celery's default), late, or both")
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration (median)")
    p.add_argument("--timeout", type=float, default=300, help="seconds before a phase gives up")
    p.add_argument("--qops-python", default=sys.executable,
                   help="interpreter with qops installed (default: this one)")
    p.add_argument("--qops-src", default=str(REPO),
                   help="qops checkout put first on PYTHONPATH (default: this one)")
    p.add_argument("--qops-rev", help="benchmark this git revision of --qops-src instead of "
                   "its working tree (exported with git archive)")
    p.add_argument("--celery-venv", default=str(DEFAULT_CELERY_VENV))
    p.add_argument("--keep-logs", action="store_true", help="keep the worker logs")
    p.add_argument("--json", action="store_true", help="print only the JSON document")
    args = p.parse_args(argv)
    bad = [b for b in args.brokers if b not in BROKERS]
    if bad:
        p.error(f"unknown broker(s) {', '.join(bad)}: choose from {', '.join(BROKERS)}")
    bad = [a for a in args.celery_acks if a not in ("early", "late")]
    if bad:
        p.error("--celery-acks takes early, late or early,late")
    if args.n < 1 or args.warmup < 1:
        p.error("--n and --warmup must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_term)
    signal.signal(signal.SIGHUP, _raise_on_term)
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="qops-bench-"))
    failed = True
    try:
        loadavg = os.getloadavg()
        bench = Bench(args, procs, tmp)
        started = time.time()
        outcomes = bench.run()
        rows = summarize(outcomes)
        failed = any(r["errors"] for r in rows)
        doc = {
            "bench": "throughput", "date": dt.datetime.now().astimezone().isoformat(
                timespec="seconds"),
            "host": {"cpus": os.cpu_count(), "loadavg_at_start": loadavg},
            "n": args.n, "warmup": args.warmup, "concurrency": args.concurrency,
            "repeat": args.repeat, "seconds": round(time.time() - started, 1),
            "qops_source": bench.qops_source, "versions": bench.versions(), "results": rows,
        }
        if not args.json:
            print_table(rows)
        print(json.dumps(doc, separators=(",", ":")))
        return 1 if failed else 0
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc or 'Ctrl-C'}): stopping what was started")
        return 130
    finally:
        procs.stop_all()
        if failed or args.keep_logs:
            log(f"worker logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
