"""Round-trip latency: ``add.delay(1, 1).get()`` one after another on an idle worker,
qops against Celery and Dramatiq, per transport, in the same run.

    python bench/latency.py [--n 2000] [--brokers redis,amqp,sqlite] [--repeat 3] [--json]
                            [--redis-url redis://127.0.0.1:6379/14]

For each broker and each configuration, one *phase* (``--repeat`` times; repeats go
round all configurations): a worker starts with 2 processes (qops and Celery ``-c 2``,
their default pools; Dramatiq ``-p 2`` with its default 8 threads), then a client
process (bench/common/roundtrip.py, the same file for every system, in each system's
own interpreter) calls ``rt_add.delay(1, i).get()`` ``--warmup`` times (the first call
waits for the worker to be up), then ``--n`` times, timing each call alone, and checks
every answer. p50 and p99 of the N calls are reported; the medians over the repeats go
into the table, with their spread in the JSON.

Result backends: Redis (the ``--redis-url`` db) on Redis; on RabbitMQ, ``rpc://``
(replies on the broker) and Redis for qops and Celery, Redis for Dramatiq (its Results
middleware has no RabbitMQ backend); SQLite (the broker's own file) for qops on SQLite,
which the peers don't have.

Cleanup as in bench/throughput.py: the ``--redis-url`` db is flushed before each phase
and at the end, the RabbitMQ run has a vhost of its own, SQLite files live in a
temporary directory, and every process started here is stopped by pid / process group.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
    clean_env,
    doc_head,
    log,
    qops_tree,
    run_bench,
    spread,
    versions,
)
from venvs import CELERY_VENV, DRAMATIQ_VENV, celery_python, dramatiq_python  # noqa: E402

SYSTEMS = ("qops", "celery", "dramatiq")


@dataclass
class Config:
    system: str
    results: str  # redis | rpc | sqlite

    @property
    def label(self) -> str:
        return f"{self.system} ({self.results} results)"


@dataclass
class Outcome:
    broker: str
    config: Config
    runs: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def configs(broker: str, peers: list[str]) -> list[Config]:
    if broker == "sqlite":
        return [Config("qops", "sqlite")]
    kinds = ["rpc", "redis"] if broker == "amqp" else ["redis"]
    out = [Config(s, k) for k in kinds for s in ("qops", "celery")
           if s == "qops" or s in peers]
    if "dramatiq" in peers:
        out.append(Config("dramatiq", "redis"))
    return out


def percentile(sorted_us: list[float], q: float) -> float:
    """The q-th percentile (0 < q < 100) of sorted values, nearest rank."""
    k = max(0, min(len(sorted_us) - 1, round(q / 100 * len(sorted_us) + 0.5) - 1))
    return sorted_us[k]


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

    def result_url(self, config: Config, broker_url: str) -> str:
        if config.results == "rpc":
            return "rpc://"
        if config.results == "sqlite":
            return broker_url
        return self.args.redis_url

    def worker_cmd(self, system: str, queue: str) -> list[str]:
        python = self.pythons[system]
        assert python is not None
        c = str(self.args.concurrency)
        if system == "dramatiq":
            return [str(python), "-m", "dramatiq", "benchapp", "-p", c, "-Q", queue,
                    "--path", "."]
        tool = "qops" if system == "qops" else "celery"
        return [str(python), "-m", tool, "-A", "benchapp", "worker", "-c", c, "-Q", queue,
                "-l", "WARNING"]

    def phase(self, broker: Broker, config: Config) -> dict[str, float]:
        args = self.args
        self.phase_no += 1
        queue = f"rt-{self.run_id}-{self.phase_no}"
        url = broker.phase_url()
        self.redis.flushdb()
        side = SIDES[config.system]
        env = clean_env([side, COMMON] + ([self.qops_src] if config.system == "qops" else []))
        env.update({"BENCH_BROKER_URL": url, "BENCH_QUEUE": queue,
                    "BENCH_RESULT_URL": self.result_url(config, url),
                    "BENCH_COUNTER_URL": args.redis_url})
        python = self.pythons[config.system]
        assert python is not None
        logfile = self.tmp / f"worker-{self.phase_no}-{config.system}.log"
        worker = self.procs.start(self.worker_cmd(config.system, queue), env, side, logfile)
        try:
            out = self.procs.run([str(python), str(COMMON / "roundtrip.py"), str(args.warmup),
                                  str(args.n)], env, side, args.timeout,
                                 f"{config.system} client")
        finally:
            self.procs.stop(worker)
        us = sorted(json.loads(out.strip().splitlines()[-1])["us"])
        return {"p50_ms": percentile(us, 50) / 1000, "p99_ms": percentile(us, 99) / 1000,
                "mean_ms": statistics.fmean(us) / 1000}

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
            results = [Outcome(name, c) for c in configs(name, args.peers)]
            outcomes.extend(results)
            try:
                broker.open()
            except PhaseError as exc:
                for outcome in results:
                    outcome.errors.append(str(exc))
                log(f"[{name}] skipped: {exc}")
                continue
            try:
                for rep in range(args.repeat):
                    for result in results:
                        what = f"[{name} {rep + 1}/{args.repeat}] {result.config.label}"
                        try:
                            r = self.phase(broker, result.config)
                        except PhaseError as exc:
                            result.errors.append(str(exc))
                            log(f"{what}: FAILED: {exc}")
                            continue
                        result.runs.append(r)
                        log(f"{what}: p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms")
            finally:
                broker.close()
                self.redis.flushdb()
        return outcomes

    def versions(self) -> dict[str, str]:
        return versions({
            "qops": (self.pythons["qops"], ["qops", "redis", "pika"]),
            "celery-venv": (self.pythons["celery"], ["celery", "kombu", "amqp", "redis"]),
            "dramatiq-venv": (self.pythons["dramatiq"], ["dramatiq", "redis", "pika"]),
        })


def measures(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """bench/all.py's rows: p50 and p99 per broker and result backend; Dramatiq (Redis
    results only) stands in every row of its broker, its backend named."""
    rows = []
    for broker in dict.fromkeys(o.broker for o in outcomes):
        mine = [o for o in outcomes if o.broker == broker]
        kinds = list(dict.fromkeys(o.config.results for o in mine if o.config.system == "qops"))
        dramatiq = next((o for o in mine if o.config.system == "dramatiq"), None)
        for kind in kinds:
            for key, name in (("p50_ms", "p50"), ("p99_ms", "p99")):
                row: dict[str, Any] = {
                    "measure": f"round trip {name}, {BROKER_TITLES[broker]}, {kind} results"
                               + (" (Dramatiq: redis)" if kind != "redis" and dramatiq else ""),
                    "unit": "ms"}
                spreads = {}
                for system in SYSTEMS:
                    o = next((o for o in mine if o.config.system == system
                              and o.config.results == kind), None)
                    if system == "dramatiq":
                        o = dramatiq
                    values = [r[key] for r in o.runs] if o else []
                    row[system] = round(statistics.median(values), 3) if values else None
                    if values:
                        spreads[system] = spread(values, digits=3)
                row["floor"] = None
                row["spread"] = spreads
                rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ["measure", *SYSTEMS]
    lines = [[r["measure"], *("-" if r[s] is None else f"{r[s]:.3f} ms" for s in SYSTEMS)]
             for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=False)]
    for i, cells in enumerate([head, *lines]):
        print(" | ".join(c.ljust(w) if j == 0 else c.rjust(w)
                         for j, (c, w) in enumerate(zip(cells, widths, strict=True))))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def csv(text: str) -> list[str]:
        return [x.strip() for x in text.split(",") if x.strip()]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="round trips measured per phase")
    p.add_argument("--warmup", type=int, default=50, help="round trips before the clock")
    p.add_argument("--brokers", type=csv, default=list(BROKERS), help="redis,amqp,sqlite")
    p.add_argument("--concurrency", "-c", type=int, default=2, help="worker processes")
    p.add_argument("--peers", type=csv, default=["celery", "dramatiq"],
                   help="celery,dramatiq (default), one of them, or '' for none")
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration (median)")
    p.add_argument("--timeout", type=float, default=300, help="seconds before a phase gives up")
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL,
                   help=f"Redis db for the Redis broker and results; flushed (default "
                   f"{DEFAULT_REDIS_URL})")
    p.add_argument("--qops-python", default=sys.executable)
    p.add_argument("--qops-src", default=str(REPO))
    p.add_argument("--qops-rev", help="benchmark this git revision (git archive)")
    p.add_argument("--celery-venv", default=str(CELERY_VENV))
    p.add_argument("--dramatiq-venv", default=str(DRAMATIQ_VENV))
    p.add_argument("--keep-logs", action="store_true", help="keep the worker logs")
    p.add_argument("--json", action="store_true", help="print only the JSON document")
    args = p.parse_args(argv)
    bad = [b for b in args.brokers if b not in BROKERS]
    if bad:
        p.error(f"unknown broker(s) {', '.join(bad)}: choose from {', '.join(BROKERS)}")
    bad = [x for x in args.peers if x not in ("celery", "dramatiq")]
    if bad:
        p.error(f"unknown peer(s) {', '.join(bad)}: choose from celery, dramatiq")
    if args.n < 1 or args.warmup < 1:
        p.error("--n and --warmup must be at least 1")
    if not args.redis_url.startswith("redis://"):
        p.error("--redis-url takes a redis:// URL")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench("qops-latency-", lambda procs, tmp: run(args, procs, tmp))


def run(args: argparse.Namespace, procs: Processes, tmp: Path) -> tuple[int, bool]:
    """The measures; (exit code, keep the logs)."""
    loadavg = os.getloadavg()
    bench = Bench(args, procs, tmp)
    started = time.time()
    outcomes = bench.run()
    failed = any(o.errors for o in outcomes)
    rows = measures(outcomes)
    doc = {
        **doc_head("latency", loadavg),
        "n": args.n, "warmup": args.warmup, "concurrency": args.concurrency,
        "repeat": args.repeat, "seconds": round(time.time() - started, 1),
        "qops_source": bench.qops_source, "versions": bench.versions(), "rows": rows,
        "runs": [{"broker": o.broker, "config": o.config.label, "runs": o.runs,
                  "errors": o.errors} for o in outcomes],
    }
    if not args.json:
        print_table(rows)
        for o in outcomes:
            for e in dict.fromkeys(o.errors):
                print(f"! {o.broker} {o.config.label}: {e}")
    print(json.dumps(doc, separators=(",", ":")))
    return (1 if failed else 0), failed or args.keep_logs


if __name__ == "__main__":
    sys.exit(main())
