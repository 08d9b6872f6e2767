"""Publishing: how fast a client sends tasks, qops against Celery, Dramatiq and the bare
client libraries, per transport, in the same run.

    python bench/publish.py [--n 3000] [--bulk-n 20000] [--brokers redis,amqp,sqlite]
                            [--repeat 3] [--json] [--redis-url redis://127.0.0.1:6379/13]

Measures (msg/s; each side in a fresh process of its own interpreter, running
bench/common/publish_side.py; only the N sends after a warm-up are timed):

- **delay() one at a time**: ``add.delay(i, i)`` N times -- qops (on RabbitMQ each call
  returns only once the broker confirmed the message), Celery (its own venv; py-amqp
  publishes without confirms), Dramatiq (its own venv; ``send``, no confirms). Floor: the
  bare client sending the very bytes qops sends -- redis-py ``LPUSH`` a message; pika's
  BlockingChannel with a confirm a message (mandatory, persistent: qops's guarantee);
  on SQLite one transaction a message with qops's pragmas. A second RabbitMQ row has
  pika without confirms as its floor (what an unconfirmed publisher could reach).
- **bulk send**: ``add.delay_many`` of ``--bulk-n`` calls (qops: Redis MULTI/EXEC
  pipelines, RabbitMQ publish-all-then-confirm, SQLite one transaction; the peers have no
  bulk send). Floor: redis-py LPUSH pipelined 2000 a round trip; pika without confirms
  (an upper bound: a confirmed batch can't be faster); SQLite one ``executemany``. A
  second RabbitMQ row has the broker's share alone: one pre-built message's frames
  written ``--bulk-n`` times on qops's confirm channel and all confirmed (what a
  confirmed bulk send would reach if building the messages cost nothing).

Each measure runs ``--repeat`` times (repeats go round all sides, so drifts hit each
alike); the table has the medians, the JSON every run and the spread.

Cleanup: the ``--redis-url`` db (default 13, not the other benchmarks' 14) is flushed
before each phase and at the end; the RabbitMQ run has a vhost of its own (deleted at
the end); SQLite files live in a temporary directory. Every process started here is
stopped by pid / process group.
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
SYSTEMS = ("qops", "celery", "dramatiq", "floor")
sys.path.insert(0, str(COMMON))
from benchproc import (  # noqa: E402  (bench/common is no package)
    BROKER_TITLES,
    BROKERS,
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
from venvs import celery_python, dramatiq_python  # noqa: E402

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"


@dataclass
class Measure:
    """One row: ``name``, and per system (qops, celery, dramatiq, floor) the side's
    mode for publish_side.py, or None where the system has no such thing."""

    broker: str
    name: str
    modes: dict[str, str | None]
    floor_label: str
    bulk: bool = False
    runs: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def measures(brokers: list[str]) -> list[Measure]:
    out = []
    for b in brokers:
        title = BROKER_TITLES[b]
        peers = b != "sqlite"
        if b == "redis":
            one_floor, one_label = "lpush", "redis-py LPUSH loop"
            bulk_floor, bulk_label = "lpush-pipe", "redis-py pipelined LPUSH"
        elif b == "amqp":
            one_floor, one_label = "pika-confirm", "pika, a confirm per message"
            bulk_floor, bulk_label = "pika", "pika, no confirms"
        else:
            one_floor, one_label = "sqlite", "sqlite3, a transaction per message"
            bulk_floor, bulk_label = "sqlite-bulk", "sqlite3 executemany"
        out.append(Measure(b, f"delay() one at a time, {title}",
                           {"qops": "one", "celery": "one" if peers else None,
                            "dramatiq": "one" if peers else None, "floor": one_floor},
                           one_label))
        if b == "amqp":
            out.append(Measure(b, f"publish without confirms (floor only), {title}",
                               {"qops": None, "celery": None, "dramatiq": None,
                                "floor": "pika"}, "pika, no confirms"))
        out.append(Measure(b, f"bulk send, {title}",
                           {"qops": "bulk", "celery": None, "dramatiq": None,
                            "floor": bulk_floor}, bulk_label, bulk=True))
        if b == "amqp":
            out.append(Measure(b, f"confirmed bulk, pre-built (floor only), {title}",
                               {"qops": None, "celery": None, "dramatiq": None,
                                "floor": "confirms-prebuilt"},
                               "pre-built frames, qops's confirm channel",
                               bulk=True))
    return out


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
        return versions({"qops": (self.pythons["qops"], ["qops", "redis", "pika"]),
                         "celery": (self.pythons["celery"], ["celery", "kombu", "amqp"]),
                         "dramatiq": (self.pythons["dramatiq"], ["dramatiq", "pika"])})

    def phase(self, broker: Broker, system: str, mode: str, bulk: bool) -> float:
        self.phase_no += 1
        queue = f"pub-{self.run_id}-{self.phase_no}"
        url = broker.phase_url()
        self.redis.flushdb()
        side = "qops" if system == "floor" else system
        python = self.pythons[side]
        assert python is not None
        env = clean_env([SIDES[side], COMMON] + ([self.qops_src] if side == "qops" else []))
        env.update({"BENCH_BROKER_URL": url, "BENCH_QUEUE": queue,
                    "BENCH_COUNTER_URL": self.args.redis_url})
        n = self.args.bulk_n if bulk else self.args.n
        try:
            out = self.procs.run([str(python), str(COMMON / "publish_side.py"), mode,
                                  str(self.args.warmup), str(n)], env, SIDES[side],
                                 self.args.timeout, f"{system} {mode}")
        finally:
            self.cleanup(broker, url, queue)
        return n / float(json.loads(out.strip().splitlines()[-1])["seconds"])

    def cleanup(self, broker: Broker, url: str, queue: str) -> None:
        if broker.name == "redis":
            self.redis.flushdb()
        elif broker.name == "amqp":
            import pika

            conn = pika.BlockingConnection(pika.URLParameters(url))
            try:
                for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):  # Dramatiq's too
                    conn.channel().queue_delete(name)
            finally:
                conn.close()

    def run(self) -> list[Measure]:
        args = self.args
        self.redis.ping()
        if any(b != "sqlite" for b in args.brokers):
            if "celery" in args.peers:
                self.pythons["celery"] = celery_python()
            if "dramatiq" in args.peers:
                self.pythons["dramatiq"] = dramatiq_python()
        rows = measures(args.brokers)
        for name in args.brokers:
            broker = Broker(name, self.tmp, redis_url=args.redis_url)
            mine = [m for m in rows if m.broker == name]
            try:
                broker.open()
            except PhaseError as exc:
                for m in mine:
                    m.errors.append(str(exc))
                log(f"[{name}] skipped: {exc}")
                continue
            try:
                for rep in range(args.repeat):
                    for m in mine:
                        for system in SYSTEMS:
                            mode = m.modes.get(system)
                            if mode is None or self.pythons.get(
                                    "qops" if system == "floor" else system) is None:
                                continue
                            what = f"[{name} {rep + 1}/{args.repeat}] {m.name}: {system}"
                            try:
                                rate = self.phase(broker, system, mode, m.bulk)
                            except PhaseError as exc:
                                m.errors.append(f"{system}: {exc}")
                                log(f"{what}: FAILED: {exc}")
                                continue
                            m.runs.setdefault(system, []).append(rate)
                            log(f"{what}: {rate:,.0f} msg/s")
            finally:
                broker.close()
                self.redis.flushdb()
        return rows


def json_rows(rows: list[Measure]) -> list[dict[str, Any]]:
    """bench/all.py's rows: the median msg/s of each system (None: not measured), the
    spread of each, and how qops compares."""
    out = []
    for m in rows:
        row: dict[str, Any] = {"measure": m.name, "unit": "msg/s"}
        for system in SYSTEMS:
            values = m.runs.get(system, [])
            row[system] = round(statistics.median(values)) if values else None
        row["floor_label"] = m.floor_label
        row["spread"] = {s: spread(v) for s, v in m.runs.items() if v}
        q, f, c = row["qops"], row["floor"], row["celery"]
        row["qops_vs_floor"] = round(q / f, 2) if q and f else None
        row["qops_vs_celery"] = round(q / c, 2) if q and c else None
        row["errors"] = m.errors
        out.append(row)
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ["measure", *SYSTEMS, "floor is", "qops/floor", "qops/celery"]

    def num(v: Any, fmt: str = "{:,.0f}") -> str:
        return "-" if v is None else fmt.format(v)

    lines = [[r["measure"], *(num(r[s]) for s in SYSTEMS), r["floor_label"],
              num(r["qops_vs_floor"], "{:.2f}x"), num(r["qops_vs_celery"], "{:.2f}x")]
             for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=False)]
    for line in [head, ["-" * w for w in widths], *lines]:
        print(" | ".join(c.ljust(w) if i in (0, 5) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(line, widths, strict=True))))
    for r in rows:
        for e in dict.fromkeys(r["errors"]):
            print(f"! {r['measure']}: {e}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def csv(text: str) -> list[str]:
        return [x.strip() for x in text.split(",") if x.strip()]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=3000, help="sends timed, one at a time")
    p.add_argument("--bulk-n", type=int, default=20000, help="tasks in the timed bulk send")
    p.add_argument("--warmup", type=int, default=200, help="sends before the clock starts")
    p.add_argument("--brokers", type=csv, default=list(BROKERS), help="redis,amqp,sqlite")
    p.add_argument("--peers", type=csv, default=["celery", "dramatiq"],
                   help="celery,dramatiq (or fewer)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measure (median)")
    p.add_argument("--timeout", type=float, default=300, help="seconds before a run gives up")
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL,
                   help="Redis db of the run (flushed): the Redis broker")
    p.add_argument("--qops-python", default=sys.executable,
                   help="interpreter with qops installed (default: this one)")
    p.add_argument("--qops-src", default=str(REPO),
                   help="qops checkout put first on PYTHONPATH (default: this one)")
    p.add_argument("--qops-rev", help="benchmark this git revision of --qops-src instead of "
                   "its working tree (exported with git archive)")
    p.add_argument("--json", action="store_true", help="print only the JSON document")
    args = p.parse_args(argv)
    bad = [b for b in args.brokers if b not in BROKERS]
    if bad:
        p.error(f"unknown broker(s) {', '.join(bad)}: choose from {', '.join(BROKERS)}")
    bad = [x for x in args.peers if x not in ("celery", "dramatiq")]
    if bad:
        p.error(f"unknown peer(s) {', '.join(bad)}: choose from celery, dramatiq")
    if args.n < 1 or args.bulk_n < 1 or args.warmup < 1 or args.repeat < 1:
        p.error("--n, --bulk-n, --warmup and --repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench("qops-publish-", lambda procs, tmp: run(args, procs, tmp))


def run(args: argparse.Namespace, procs: Processes, tmp: Path) -> tuple[int, bool]:
    """The measures; (exit code, keep the logs)."""
    loadavg = os.getloadavg()
    bench = Bench(args, procs, tmp)
    started = time.time()
    rows = json_rows(bench.run())
    doc = {
        **doc_head("publish", loadavg),
        "n": args.n, "bulk_n": args.bulk_n, "warmup": args.warmup,
        "repeat": args.repeat, "seconds": round(time.time() - started, 1),
        "qops_source": bench.qops_source, "versions": bench.versions(), "rows": rows,
    }
    if not args.json:
        print_table(rows)
    print(json.dumps(doc, separators=(",", ":")))
    failed = any(r["errors"] for r in rows)
    return (1 if failed else 0), failed


if __name__ == "__main__":
    sys.exit(main())
