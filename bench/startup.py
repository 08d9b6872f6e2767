"""Start-up time of the command line and idle memory of the workers: qops, Celery and
Dramatiq, same machine, same run.

    python bench/startup.py [--runs 20] [--repeat 3] [--peers celery,dramatiq] [--json]

**CLI, wall ms** (median of ``--runs`` runs, the systems taking turns run by run):

- ``--version`` and ``--help`` of each system's console script (``qops``, ``celery``,
  ``dramatiq``, from each one's venv). Floor: the bare interpreter (``python -c pass``).
- ``inspect ping`` against 2 live nodes: ``qops -b URL inspect ping`` and ``celery -b URL
  inspect ping`` (each with its default timeout; Celery waits for the whole timeout, qops
  stops when every node it knows of answered) with two solo workers of its own running.
  Dramatiq has no remote control. Floor: an interpreter that imports redis-py and sends
  one PING.

**Idle RSS, MB** (median of ``--repeat`` starts): the RSS ``ps`` shows, summed over every
process of the worker (its process group and descendants), once it has settled (the sum
unchanged for 3 s): ``worker -P solo`` (Celery: ``-P solo``; Dramatiq: ``-p 1 -t 1``,
which is a supervisor and one worker process) and ``-P prefork -c 2`` (Dramatiq: ``-p 2``
with its default 8 threads). The JSON also has the PSS (shared pages divided among the
processes). Floor (solo row): an idle interpreter with redis-py imported and connected.

Redis only (``--redis-url``, default db 14, the benchmarks' db: it is flushed at the
start and at the end, no other db is touched). Every process started here runs in its
own process group and is stopped by pid / process group.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
COMMON = BENCH / "common"
sys.path.insert(0, str(COMMON))

import redis  # noqa: E402
from benchproc import (  # noqa: E402
    DEFAULT_REDIS_URL,
    PhaseError,
    Processes,
    clean_env,
    compile_qops,
    doc_head,
    log,
    run_bench,
    spread,
    tail,
    versions,
)
from venvs import (  # noqa: E402
    CELERY_VENV,
    DRAMATIQ_VENV,
    QOPS_VENV,
    celery_python,
    dramatiq_python,
    qops_python,
)

SYSTEMS = ("qops", "celery", "dramatiq")
PEERS = ("celery", "dramatiq")
SIDES = {"qops": BENCH / "qops_side", "celery": BENCH / "celery_side",
         "dramatiq": BENCH / "dramatiq_side"}
FLOOR = "floor"


def bin_of(python: Path | None, tool: str) -> list[str]:
    """The console script ``tool`` beside ``python`` (what a user runs); ``python -m``
    when there is none."""
    assert python is not None
    script = python.parent / tool
    return [str(script)] if script.exists() else [str(python), "-m", tool]


# -- process trees -----------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, pgid) of ``pid``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[2])


def tree(root: int) -> list[int]:
    """``root``, its process group and all its descendants."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st:
                stats[int(entry)] = st
    found = {root} | {pid for pid, (_, pgid) in stats.items() if pgid == root}
    grew = True
    while grew:
        new = {pid for pid, (ppid, _) in stats.items() if ppid in found} - found
        found |= new
        grew = bool(new)
    return sorted(pid for pid in found if pid in stats)


def memory_kb(pids: list[int]) -> tuple[int, int]:
    """Summed RSS (VmRSS, as ps shows it) and PSS of ``pids``, in kB."""
    rss = pss = 0
    for pid in pids:
        try:
            rss += next(int(line.split()[1]) for line in
                        Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith("VmRSS:"))
            pss += next(int(line.split()[1]) for line in
                        Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                        if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return rss, pss


# -- the benchmark -----------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes, tmp: Path) -> None:
        self.args = args
        self.procs = procs
        self.tmp = tmp
        self.run_id = uuid.uuid4().hex[:8]
        self.count = 0
        # qops as installed (bench/.qops-venv), or the interpreter given, which runs
        # this checkout's qops (its bytecode compiled first, as pip would)
        self.checkout = args.qops_python is not None
        if self.checkout:
            qops: Path = Path(args.qops_python)
            compile_qops(REPO)
        else:
            qops = qops_python(REPO, Path(args.qops_venv))
        self.pythons: dict[str, Path | None] = {"qops": qops, "celery": None,
                                                "dramatiq": None}
        if "celery" in args.peers:
            self.pythons["celery"] = celery_python(Path(args.celery_venv))
        if "dramatiq" in args.peers:
            self.pythons["dramatiq"] = dramatiq_python(Path(args.dramatiq_venv))

    def systems(self) -> list[str]:
        return [s for s in SYSTEMS if self.pythons[s] is not None]

    def env(self, system: str, queue: str) -> dict[str, str]:
        path = [SIDES[system], COMMON] + ([REPO] if system == "qops" and self.checkout
                                          else [])
        env = clean_env(path)
        env.update({"BENCH_BROKER_URL": self.args.redis_url, "BENCH_QUEUE": queue})
        return env

    # -- wall time of commands ---------------------------------------------------------
    def timed(self, cmds: dict[str, list[str]], envs: dict[str, dict[str, str]],
              failures: dict[str, int] | None = None) -> dict[str, list[float]]:
        """Wall ms of each command, ``--runs`` times (after 2 warm-ups), taking turns. A
        run that fails is an error, unless ``failures`` counts them (a ping that got no
        reply in time still took that long)."""
        out: dict[str, list[float]] = {k: [] for k in cmds}
        for i in range(self.args.runs + 2):
            for key, cmd in cmds.items():
                start = time.perf_counter()
                res = subprocess.run(cmd, env=envs[key], cwd=str(self.tmp), timeout=60,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                took = (time.perf_counter() - start) * 1000
                if res.returncode != 0:
                    if failures is None:
                        raise PhaseError(f"{' '.join(cmd)} exited with {res.returncode}: "
                                         f"{tail(res.stderr.decode(errors='replace'), 5)}")
                    failures[key] = failures.get(key, 0) + (i >= 2)
                if i >= 2:
                    out[key].append(took)
        return out

    def cli_rows(self) -> Iterator[dict[str, Any]]:
        systems = self.systems()
        qpy = self.pythons["qops"]
        assert qpy is not None
        envs = {s: self.env(s, "startup") for s in systems}
        envs[FLOOR] = clean_env([])
        for flag in ("--version", "--help"):
            cmds = {s: [*bin_of(self.pythons[s], s), flag] for s in systems}
            cmds[FLOOR] = [str(qpy), "-c", "pass"]
            log(f"timing {flag} ...")
            yield row(f"CLI {flag}", "ms", self.timed(cmds, envs), "python -c pass")
        yield self.ping_row(envs)

    def ping_row(self, envs: dict[str, dict[str, str]]) -> dict[str, Any]:
        url = self.args.redis_url
        qpy = self.pythons["qops"]
        cmds = {FLOOR: [str(qpy), "-c",
                        f"import redis; redis.Redis.from_url({url!r}).ping()"]}
        started = []
        try:
            for system in ("qops", "celery"):
                if self.pythons[system] is None:
                    continue
                queue = f"startup-{self.run_id}-ping"
                for n in (1, 2):
                    started.append(self.procs.start(
                        self.worker_cmd(system, "solo", queue, f"ping{n}-{self.run_id}@%h"),
                        self.env(system, queue), SIDES[system],
                        self.tmp / f"ping-{system}-{n}.log"))
                cmds[system] = [*bin_of(self.pythons[system], system), "-b", url, "inspect",
                                "ping"]
                self.wait_nodes(cmds[system], envs[system], 2)
            log("timing inspect ping ...")
            failures: dict[str, int] = {}
            times = self.timed(cmds, envs, failures)
        finally:
            for proc in started:
                self.procs.stop(proc)
        out = row("CLI inspect ping, 2 live nodes", "ms", times, "python: import redis, PING")
        out["no_reply_runs"] = failures  # runs where a node did not answer in time
        return out

    def wait_nodes(self, cmd: list[str], env: dict[str, str], n: int) -> None:
        """Until ``n`` of this run's nodes answer ``cmd`` (a ping, given 5 s here)."""
        deadline = time.monotonic() + self.args.timeout
        while time.monotonic() < deadline:
            res = subprocess.run([*cmd, "--timeout", "5"], env=env, cwd=str(self.tmp),
                                 capture_output=True, text=True, timeout=60)
            if res.stdout.count(f"-{self.run_id}@") >= n:
                return
            time.sleep(0.5)
        raise PhaseError(f"{' '.join(cmd[:1])}: fewer than {n} nodes answer a ping")

    # -- idle memory ---------------------------------------------------------------------
    def worker_cmd(self, system: str, pool: str, queue: str, name: str) -> list[str]:
        python = self.pythons[system]
        assert python is not None
        if system == "dramatiq":
            p, t = ("1", "1") if pool == "solo" else ("2", "8")
            return [str(python), "-m", "dramatiq", "benchapp", "-p", p, "-t", t, "-Q", queue,
                    "--path", "."]
        c = "1" if pool == "solo" else "2"
        return [str(python), "-m", system, "-A", "benchapp", "worker", "-P", pool, "-c", c,
                "-Q", queue, "-n", name, "-l", "WARNING"]

    def idle(self, cmd: list[str], env: dict[str, str], cwd: Path, what: str
             ) -> tuple[float, float, int]:
        """MB of RSS and PSS of the settled process tree of ``cmd``, and its size."""
        self.count += 1
        logfile = self.tmp / f"idle-{self.count}.log"
        proc = self.procs.start(cmd, env, cwd, logfile)
        try:
            deadline = time.monotonic() + self.args.timeout
            last, since = -1, time.monotonic()
            while True:
                time.sleep(0.5)
                if proc.poll() is not None:
                    raise PhaseError(f"{what} exited with {proc.returncode}: "
                                     f"{tail(logfile.read_text(errors='replace'), 8)}")
                pids = tree(proc.pid)
                rss, pss = memory_kb(pids)
                now = time.monotonic()
                if abs(rss - last) > max(256, last // 200):  # moved by more than 0.5%
                    last, since = rss, now
                elif now - since >= self.args.settle:
                    return rss / 1024, pss / 1024, len(pids)
                if now > deadline:
                    raise PhaseError(f"{what}: memory did not settle in {self.args.timeout}s")
        finally:
            self.procs.stop(proc)

    def memory_rows(self) -> Iterator[dict[str, Any]]:
        qpy = self.pythons["qops"]
        floor_cmd = [str(qpy), "-c",
                     f"import redis, time; r = redis.Redis.from_url({self.args.redis_url!r}); "
                     "r.ping(); time.sleep(3600)"]
        for pool, measure in (("solo", "idle RSS, solo worker"),
                              ("prefork", "idle RSS, prefork -c 2 (all processes)")):
            rss: dict[str, list[float]] = {}
            pss: dict[str, list[float]] = {}
            nprocs: dict[str, int] = {}
            for rep in range(self.args.repeat):
                for system in self.systems() + ([FLOOR] if pool == "solo" else []):
                    queue = f"startup-{self.run_id}-{self.count}"
                    if system == FLOOR:
                        cmd, env, cwd = floor_cmd, clean_env([]), self.tmp
                    else:
                        cmd = self.worker_cmd(system, pool, queue, f"idle-{self.run_id}@%h")
                        env, cwd = self.env(system, queue), SIDES[system]
                    what = f"[{pool} {rep + 1}/{self.args.repeat}] {system}"
                    r, p, n = self.idle(cmd, env, cwd, what)
                    log(f"{what}: {r:.1f} MB RSS, {p:.1f} MB PSS, {n} processes")
                    rss.setdefault(system, []).append(r)
                    pss.setdefault(system, []).append(p)
                    nprocs[system] = n
            r = row(measure, "MB", rss, "python: import redis, connected, idle"
                    if pool == "solo" else None)
            r["pss"] = {s: round(statistics.median(v), 1) for s, v in pss.items()}
            r["processes"] = nprocs
            yield r


def row(measure: str, unit: str, values: dict[str, list[float]], floor_label: str | None
        ) -> dict[str, Any]:
    """A row of bench/all.py's table: medians, and each side's spread."""
    out: dict[str, Any] = {"measure": measure, "unit": unit}
    for key in (*SYSTEMS, FLOOR):
        v = values.get(key)
        out[key] = round(statistics.median(v), 1) if v else None
    out["floor_label"] = floor_label if values.get(FLOOR) else None
    out["spread"] = {k: spread(v) for k, v in values.items() if v}
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ["measure", *SYSTEMS, FLOOR]
    lines = [[r["measure"], *("-" if r[k] is None else f"{r[k]:,.1f} {r['unit']}"
                              for k in (*SYSTEMS, FLOOR))] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    for cells in [head, ["-" * w for w in widths], *lines]:
        print(" | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def csv(text: str) -> list[str]:
        return [x.strip() for x in text.split(",") if x.strip()]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20, help="timed runs of each command")
    p.add_argument("--repeat", type=int, default=3, help="worker starts per memory measure")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds the memory must stay put to count as idle")
    p.add_argument("--peers", type=csv, default=list(PEERS), help="celery,dramatiq or none")
    p.add_argument("--skip", type=csv, default=[], help="cli,memory")
    p.add_argument("--timeout", type=float, default=120, help="seconds before a step gives up")
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    p.add_argument("--qops-python", default=None,
                   help="an interpreter that runs this checkout's qops (default: qops "
                   "installed from the checkout into --qops-venv, as a user installs it)")
    p.add_argument("--qops-venv", default=str(QOPS_VENV))
    p.add_argument("--celery-venv", default=str(CELERY_VENV))
    p.add_argument("--dramatiq-venv", default=str(DRAMATIQ_VENV))
    p.add_argument("--json", action="store_true", help="print only the JSON document")
    args = p.parse_args(argv)
    bad = [x for x in args.peers if x not in PEERS and x != "none"]
    if bad:
        p.error(f"unknown peer(s) {', '.join(bad)}: choose from {', '.join(PEERS)}")
    if args.runs < 1 or args.repeat < 1:
        p.error("--runs and --repeat must be at least 1")
    return args


def _flush(redis_url: str) -> None:
    with contextlib.suppress(Exception):
        redis.Redis.from_url(redis_url).flushdb()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench("qops-startup-", lambda procs, tmp: run(args, procs, tmp),
                     after=lambda: _flush(args.redis_url))


def run(args: argparse.Namespace, procs: Processes, tmp: Path) -> tuple[int, bool]:
    """The measures; (exit code, keep the logs)."""
    errors: list[str] = []
    loadavg = os.getloadavg()
    started = time.time()
    redis.Redis.from_url(args.redis_url).flushdb()
    bench = Bench(args, procs, tmp)
    rows: list[dict[str, Any]] = []
    for part, make in (("cli", bench.cli_rows), ("memory", bench.memory_rows)):
        if part in args.skip:
            continue
        try:
            for r in make():
                rows.append(r)
        except PhaseError as exc:
            errors.append(f"{part}: {exc}")
            log(f"{part}: FAILED: {exc}")
    doc = {
        **doc_head("startup", loadavg),
        "runs": args.runs, "repeat": args.repeat,
        "seconds": round(time.time() - started, 1),
        "versions": versions({
            "qops": (bench.pythons["qops"], ["qops", "typer", "rich", "redis"]),
            "celery-venv": (bench.pythons["celery"], ["celery", "kombu", "redis"]),
            "dramatiq-venv": (bench.pythons["dramatiq"], ["dramatiq", "redis"])}),
        "rows": rows, "errors": errors,
    }
    if not args.json:
        print_table(rows)
    print(json.dumps(doc, separators=(",", ":")))
    return (1 if errors else 0), bool(errors)


if __name__ == "__main__":
    sys.exit(main())
