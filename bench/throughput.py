"""Throughput benchmark: qops against Celery and Dramatiq, same trivial task, same
broker, same run.

    python bench/throughput.py [--n 10000] [--brokers redis,amqp,sqlite] [--concurrency 2]
                               [--pool prefork,threads] [--repeat 3] [--json]
                               [--redis-url redis://127.0.0.1:6379/14] [--no-solo]

For each broker, for each configuration, one *phase* (run ``--repeat`` times, medians
are reported):

1. **enqueue/s** -- a fresh producer process (qops: this interpreter; Celery and
   Dramatiq: their own venvs, ``bench/.celery-venv`` and ``bench/.dramatiq-venv``, made
   by bench/common/venvs.py when missing) publishes ``--warmup`` tasks, then ``--n``
   tasks with ``add.delay(i, i)`` (``ignore_result``; Dramatiq: ``send``); the N
   publishes are timed inside the producer (bench/common/produce.py, the same file for
   every system).
2. **tasks/s** -- with all of them queued, a worker is started (``qops -A benchapp
   worker`` / ``celery -A benchapp worker``, same ``-c``, ``-Q <unique queue>``, ``-l
   WARNING``; ``dramatiq benchapp -p <c> -t 8 -Q <queue>``: as many processes, each with
   Dramatiq's default 8 threads). A qops threads node is one process: it runs both
   alone (``-c`` threads) and as two nodes side by side (``-n bench1@%h``, ``-n
   bench2@%h``, ``-c`` threads each), the latter being the "2 processes" row that is
   compared with the others. The task, identical on every side
   (bench/common/benchcounter.py), does one Redis INCR on a bench key. The task that
   completes the last warm-up task (counter == warmup) pushes a ``start`` timestamp, the
   one that completes the last task (counter == warmup + N) an ``end`` timestamp
   (CLOCK_MONOTONIC, machine-wide on Linux); the benchmark BLPOPs both. tasks/s = N /
   (end - start): pure processing of N queued tasks by a warm worker, start-up and
   warm-up excluded, the last task's completion included, and no polling load on the
   machine. The counter is checked afterwards: it must be exactly warmup + N (no task
   lost, none run twice).
3. **solo** (Redis only; ``--no-solo`` leaves it out) -- one worker process with one
   slot: qops and Celery ``-P solo -c 1 --prefetch-multiplier 64``, Dramatiq ``-p 1 -t
   1`` (its default prefetch). The task is a no-op (``noop``: it counts in the process
   and pushes the same marks), so this measures the worker's own per-task cost.

Fairness: same task code and Redis round-trip on every side, same broker URL, same
concurrency (default 2 = this machine's cores), log level WARNING for qops and Celery,
each worker's defaults otherwise (prefetch multiplier 4, no ``-O fair``, gossip/mingle/
heartbeat left on for Celery; Dramatiq's default middleware). qops's default is
acks_late=True; Celery's is False, so Celery runs both ways: ``celery prefork`` (its
default, the baseline of the ratio column) and ``celery prefork acks_late``. Dramatiq
acks after the actor ran. Each phase has its own queue name and starts from an empty
Redis db. The counter lives in the Redis db of ``--redis-url`` for
every broker, so Redis is needed even for ``--brokers amqp,sqlite``. qops's AMQP
publishes wait for publisher confirms; Celery's and Dramatiq's (default settings) do
not.

Cleanup: the ``--redis-url`` db (default 14) is flushed before each phase and at the
end (only that db); the AMQP run gets its own vhost (``rabbitmqctl add_vhost``), deleted
at the end; SQLite files live in a temporary directory. Every process started here runs
in its own process group and is stopped by pid / process group (TERM, then KILL), also
on errors and Ctrl-C. Each phase gives up after ``--timeout`` seconds and reports it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
COMMON = BENCH / "common"
SIDES = {name: BENCH / f"{name}_side" for name in ("qops", "celery", "dramatiq")}
sys.path.insert(0, str(COMMON))
from benchproc import (  # noqa: E402  (bench/common is no package)
    BROKER_TITLES,
    BROKERS,
    DEFAULT_REDIS_URL,
    Broker,
    PhaseError,
    Processes,
    broker_cpu,
    clean_env,
    doc_head,
    log,
    qops_tree,
    run_bench,
    spread,
    tail,
    tree_cpu,
    versions,
)
from venvs import CELERY_VENV, DRAMATIQ_VENV, celery_python, dramatiq_python  # noqa: E402

COUNTER_KEY = "bench.counter"
MARKS_KEY = "bench.marks"
SOLO_PREFETCH = 64
PEERS = ("celery", "dramatiq")


# -- configurations ------------------------------------------------------------------------


@dataclass
class Config:
    system: str  # qops | celery | dramatiq
    pool: str  # prefork | threads | solo (dramatiq: threads)
    acks_late: bool
    baseline: bool = False  # the ratio column's 1.00x
    solo: bool = False  # one process, one slot, prefetch 64, the no-op task
    processes: int = 1  # qops worker nodes started side by side (threads: 1 and 2)

    @property
    def label(self) -> str:
        if self.solo:
            if self.system == "dramatiq":
                return "dramatiq -p 1 -t 1 (no-op)"
            return f"{self.system} solo (prefetch {SOLO_PREFETCH}, no-op)"
        if self.system == "celery":
            acks = "acks_late" if self.acks_late else "default: acks early"
            return f"celery {self.pool} ({acks})"
        if self.system == "dramatiq":
            return "dramatiq (threads 8/process)"
        if self.processes > 1:
            return f"qops {self.pool} ({self.processes} processes, acks_late)"
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
        self.redis = redis.Redis.from_url(args.redis_url)
        self.run_id = uuid.uuid4().hex[:8]
        self.phase_no = 0
        self.pythons: dict[str, Path | None] = {"qops": Path(args.qops_python),
                                                "celery": None, "dramatiq": None}
        self.qops_src, self.qops_source = qops_tree(Path(args.qops_src), args.qops_rev, tmp)

    def versions(self) -> dict[str, str]:
        return versions({
            "qops": (self.pythons["qops"], ["qops", "redis", "pika"]),
            "celery-venv": (self.pythons["celery"], ["celery", "kombu", "amqp", "redis"]),
            "dramatiq-venv": (self.pythons["dramatiq"], ["dramatiq", "redis", "pika"]),
        })

    def env(self, config: Config, broker_url: str, queue: str) -> dict[str, str]:
        side = SIDES[config.system]
        env = clean_env([side, COMMON] + ([self.qops_src] if config.system == "qops" else []))
        env.update({
            "BENCH_BROKER_URL": broker_url,
            "BENCH_QUEUE": queue,
            "BENCH_ACKS_LATE": "1" if config.acks_late else "0",
            "BENCH_COUNTER_URL": self.args.redis_url,
            "BENCH_COUNTER_KEY": COUNTER_KEY,
            "BENCH_MARKS_KEY": MARKS_KEY,
            "BENCH_START_AT": str(self.args.warmup),
            "BENCH_END_AT": str(self.args.warmup + self.args.n),
            "BENCH_TASK": "noop" if config.solo else "add",
        })
        return env

    def worker_cmd(self, config: Config, queue: str, index: int = 1) -> list[str]:
        python = self.pythons[config.system]
        assert python is not None
        c = 1 if config.solo else self.args.concurrency
        if config.system == "dramatiq":
            threads = 1 if config.solo else self.args.dramatiq_threads
            return [str(python), "-m", "dramatiq", "benchapp", "-p", str(c), "-t", str(threads),
                    "-Q", queue, "--path", "."]
        common = ["worker", "-c", str(c), "-P", config.pool, "-Q", queue, "-l", "WARNING"]
        if config.solo:
            common += ["--prefetch-multiplier", str(SOLO_PREFETCH)]
        if config.processes > 1:
            common += ["-n", f"bench{index}@%h"]
        tool = "qops" if config.system == "qops" else "celery"
        return [str(python), "-m", tool, "-A", "benchapp", *common]

    # -- one phase -------------------------------------------------------------------------
    def phase(self, broker: Broker, config: Config) -> dict[str, Any]:
        args = self.args
        self.phase_no += 1
        queue = f"bench-{self.run_id}-{self.phase_no}"
        url = broker.phase_url()
        self.redis.flushdb()  # the bench db only: the counter and the Redis broker's keys
        env = self.env(config, url, queue)
        python = self.pythons[config.system]
        side = SIDES[config.system]
        assert python is not None

        out = self.procs.run([str(python), str(COMMON / "produce.py"), str(args.warmup),
                              str(args.n)], env, side, args.timeout,
                             f"{config.system} producer")
        produced = json.loads(out.strip().splitlines()[-1])
        enqueue = args.n / produced["seconds"]

        logfile = self.tmp / f"worker-{self.phase_no}-{config.system}-{config.pool}.log"
        launched = time.monotonic()
        procs = [self.procs.start(self.worker_cmd(config, queue, i), env, side, logfile)
                 for i in range(1, config.processes + 1)]

        def cpu() -> float:
            return sum(tree_cpu(p.pid) for p in procs)
        try:
            start = self.wait_mark("start", procs, launched, logfile)
            cpu0, broker0 = cpu(), broker_cpu(broker)
            end = self.wait_mark("end", procs, launched, logfile)
            cpu1, broker1 = cpu(), broker_cpu(broker)
        finally:
            for proc in procs:
                self.procs.stop(proc)
        if not config.solo:  # (the no-op task counts in its process: its marks are the check)
            final = int(self.redis.get(COUNTER_KEY) or 0)
            expected = args.warmup + args.n
            if final != expected:
                raise PhaseError(f"counter is {final} after the run, expected {expected} "
                                 "(tasks lost or run twice)")
        return {"enqueue_per_s": enqueue, "tasks_per_s": args.n / (end - start),
                "cpu_us_per_task": (cpu1 - cpu0) * 1e6 / args.n if cpu0 else None,
                "broker_cpu_us_per_task": ((broker1 - broker0) * 1e6 / args.n
                                           if broker.pid else None),
                "startup_s": start - launched, "seconds": end - start}

    def wait_mark(self, kind: str, procs: list[subprocess.Popen[bytes]], launched: float,
                  logfile: Path) -> float:
        deadline = launched + self.args.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PhaseError(f"worker: no '{kind}' mark after {self.args.timeout:.0f}s "
                                 f"(counter at {int(self.redis.get(COUNTER_KEY) or 0)}); "
                                 f"log: {tail(logfile.read_text(errors='replace'), 8)}")
            got = self.redis.blpop([MARKS_KEY], timeout=max(0.01, min(1.0, left)))
            if got is not None:
                raw = got[1]
                name, value = (raw.decode() if isinstance(raw, bytes) else raw).split()
                if name != kind:
                    raise PhaseError(f"got mark {name!r} before {kind!r}")
                return float(value)
            for proc in procs:
                if proc.poll() is not None:
                    raise PhaseError(f"worker exited with {proc.returncode}: "
                                     f"{tail(logfile.read_text(errors='replace'))}")

    # -- everything ------------------------------------------------------------------------
    def configs(self, broker: str) -> list[Config]:
        out: list[Config] = []
        peers = self.args.peers
        if broker != "sqlite":
            if "celery" in peers:
                for pool in self.args.celery_pool:
                    for acks in self.args.celery_acks:
                        out.append(Config("celery", pool, acks == "late",
                                          baseline=(pool == "prefork" and acks == "early")))
            if "dramatiq" in peers:
                out.append(Config("dramatiq", "threads", True))
        for pool in self.args.pool:
            out.append(Config("qops", pool, True))
            if pool == "threads":  # a threads node is one process; the others run two
                out.append(Config("qops", pool, True, processes=2))
        if broker == "redis" and self.args.solo:
            out += [Config(p, "solo", p != "celery", solo=True) for p in ("qops", *peers)]
        return out

    def run(self) -> list[Outcome]:
        args = self.args
        self.redis.ping()
        if any(b != "sqlite" for b in args.brokers):
            if "celery" in args.peers:
                self.pythons["celery"] = celery_python(Path(args.celery_venv))
            if "dramatiq" in args.peers:
                self.pythons["dramatiq"] = dramatiq_python(Path(args.dramatiq_venv))
        outcomes: list[Outcome] = []
        for name in args.brokers:
            broker = Broker(name, self.tmp, args.redis_url)
            results = [Outcome(name, c) for c in self.configs(name)]
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
                            f"tasks {r['tasks_per_s']:,.0f}/s (start-up {r['startup_s']:.2f}s"
                            + (f", worker CPU {r['cpu_us_per_task']:.0f} µs/task"
                               if r.get("cpu_us_per_task") else "")
                            + (f", broker CPU {r['broker_cpu_us_per_task']:.0f} µs/task"
                               if r.get("broker_cpu_us_per_task") else "") + ")")
            finally:
                broker.close()
                self.redis.flushdb()
        return outcomes


# -- report ---------------------------------------------------------------------------------


def summarize(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    rows = []
    base: dict[tuple[str, bool], dict[str, float | None]] = {}
    for o in outcomes:
        if o.config.baseline or (o.config.solo and o.config.system == "celery"):
            base[o.broker, o.config.solo] = {"tasks": o.median("tasks_per_s"),
                                             "enqueue": o.median("enqueue_per_s")}
    for o in outcomes:
        tasks, enqueue = o.median("tasks_per_s"), o.median("enqueue_per_s")
        b = base.get((o.broker, o.config.solo), {})
        bt, be = b.get("tasks"), b.get("enqueue")
        rows.append({
            "broker": o.broker, "system": o.config.system, "pool": o.config.pool,
            "acks_late": o.config.acks_late, "solo": o.config.solo, "config": o.config.label,
            "processes": o.config.processes,
            "enqueue_per_s": _round(enqueue), "tasks_per_s": _round(tasks),
            "tasks_vs_celery": round(tasks / bt, 2) if tasks and bt else None,
            "enqueue_vs_celery": round(enqueue / be, 2) if enqueue and be else None,
            "startup_s": _round(o.median("startup_s"), 2),
            "runs": len(o.runs),
            "all_tasks_per_s": [_round(r["tasks_per_s"]) for r in o.runs],
            "cpu_us_per_task": _round(o.median("cpu_us_per_task"), 1),
            "broker_cpu_us_per_task": _round(o.median("broker_cpu_us_per_task"), 1),
            "errors": o.errors,
        })
    return rows


def measures(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """The rows of bench/all.py's table (``{"rows": [...]}``): tasks/s of each qops pool
    against Celery's default and Dramatiq on each broker, and the solo process."""
    def pick(broker: str, system: str, solo: bool,
             pool: tuple[str, int] | None = None) -> list[float]:
        for o in outcomes:
            c = o.config
            if (o.broker, c.system, c.solo) == (broker, system, solo) and \
                    (pool is None or (c.pool, c.processes) == pool) and \
                    (system != "celery" or solo or c.baseline):
                return [r["tasks_per_s"] for r in o.runs]
        return []

    def title_of(broker: str, pool: str, processes: int) -> str:
        title = BROKER_TITLES[broker]
        if pool == "prefork":
            return f"tasks/s, {title}, 2 processes"
        if processes > 1:
            return f"tasks/s, {title}, {processes} processes (qops {pool} -c 2 each)"
        return f"tasks/s, {title}, one process (qops {pool} -c 2)"

    out = []
    brokers = list(dict.fromkeys(o.broker for o in outcomes))
    for broker in brokers:
        title = BROKER_TITLES[broker]
        pools = list(dict.fromkeys((o.config.pool, o.config.processes) for o in outcomes
                                   if o.broker == broker and o.config.system == "qops"
                                   and not o.config.solo))
        kinds: list[tuple[str, bool, tuple[str, int] | None]] = [
            (title_of(broker, *p), False, p) for p in pools]
        if any(o.broker == broker and o.config.solo for o in outcomes):
            kinds.append((f"tasks/s, {title}, one solo process (no-op, prefetch 64)", True,
                          None))
        for measure, solo, pool in kinds:
            values = {s: pick(broker, s, solo, pool if s == "qops" else None)
                      for s in ("qops", *PEERS)}
            row: dict[str, Any] = {"measure": measure, "unit": "tasks/s"}
            for s, v in values.items():
                row[s] = round(statistics.median(v)) if v else None
            row["floor"] = None
            row["spread"] = {s: spread(v) for s, v in values.items() if v}
            out.append(row)
    return out


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
    p.add_argument("--peers", type=csv, default=list(PEERS),
                   help="celery,dramatiq (default), one of them, or '' for none")
    p.add_argument("--celery-pool", type=csv, default=["prefork"], help="Celery pools")
    p.add_argument("--celery-acks", type=csv, default=["early", "late"],
                   help="early (Celery's default), late, or both")
    p.add_argument("--dramatiq-threads", type=int, default=8,
                   help="Dramatiq threads per process (default 8, its own default)")
    p.add_argument("--no-solo", dest="solo", action="store_false",
                   help="leave out the one-process no-op measure (Redis)")
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration (median)")
    p.add_argument("--timeout", type=float, default=300, help="seconds before a phase gives up")
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL,
                   help="Redis db for the counter and the Redis broker; flushed (default "
                   f"{DEFAULT_REDIS_URL})")
    p.add_argument("--qops-python", default=sys.executable,
                   help="interpreter with qops installed (default: this one)")
    p.add_argument("--qops-src", default=str(REPO),
                   help="qops checkout put first on PYTHONPATH (default: this one)")
    p.add_argument("--qops-rev", help="benchmark this git revision of --qops-src instead of "
                   "its working tree (exported with git archive)")
    p.add_argument("--celery-venv", default=str(CELERY_VENV))
    p.add_argument("--dramatiq-venv", default=str(DRAMATIQ_VENV))
    p.add_argument("--keep-logs", action="store_true", help="keep the worker logs")
    p.add_argument("--json", action="store_true", help="print only the JSON document")
    args = p.parse_args(argv)
    bad = [b for b in args.brokers if b not in BROKERS]
    if bad:
        p.error(f"unknown broker(s) {', '.join(bad)}: choose from {', '.join(BROKERS)}")
    bad = [a for a in args.celery_acks if a not in ("early", "late")]
    if bad:
        p.error("--celery-acks takes early, late or early,late")
    bad = [x for x in args.peers if x not in PEERS]
    if bad:
        p.error(f"unknown peer(s) {', '.join(bad)}: choose from {', '.join(PEERS)}")
    if args.n < 1 or args.warmup < 1:
        p.error("--n and --warmup must be at least 1")
    if not args.redis_url.startswith("redis://"):
        p.error("--redis-url takes a redis:// URL")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench("qops-bench-", lambda procs, tmp: run(args, procs, tmp))


def run(args: argparse.Namespace, procs: Processes, tmp: Path) -> tuple[int, bool]:
    """The measures; (exit code, keep the logs)."""
    loadavg = os.getloadavg()
    bench = Bench(args, procs, tmp)
    started = time.time()
    outcomes = bench.run()
    results = summarize(outcomes)
    failed = any(r["errors"] for r in results)
    doc = {
        **doc_head("throughput", loadavg),
        "n": args.n, "warmup": args.warmup, "concurrency": args.concurrency,
        "repeat": args.repeat, "seconds": round(time.time() - started, 1),
        "qops_source": bench.qops_source, "versions": bench.versions(),
        "rows": measures(outcomes), "results": results,
    }
    if not args.json:
        print_table(results)
    print(json.dumps(doc, separators=(",", ":")))
    return (1 if failed else 0), failed or args.keep_logs


if __name__ == "__main__":
    sys.exit(main())
