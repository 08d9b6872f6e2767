"""Every benchmark in one run, one table: qops, Celery and Dramatiq side by side, with the
bare-client floors and the targets of the speed work (met or not, from this run's
numbers).

    python bench/all.py [--repeat 3] [--only throughput,publish,latency,startup]
                        [--redis-url URL] [--pass 'throughput=--n 20000'] [--json]
    make bench                       # the same, with .venv's interpreter

Runs bench/throughput.py, bench/publish.py, bench/latency.py and bench/startup.py in
turn, each with ``--json`` (their progress goes to stderr), and gathers their rows
(``{"rows": [{"measure", "unit", "qops", "celery", "dramatiq", "floor", "spread"}]}``).
``--repeat`` and ``--redis-url`` go to the scripts that take them; ``--pass`` adds
arguments for one script. A script that is missing or fails gets one line saying so
(and its rows are missing); the others still run. Each script makes the peers' venvs it
needs (bench/.celery-venv, bench/.dramatiq-venv) on first use.

Stdout: the table, then one JSON line with every row (its target and mark included) and
each script's own document (versions, host, load).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
SCRIPTS = ("throughput", "publish", "latency", "startup")
SYSTEMS = ("qops", "celery", "dramatiq")

Row = dict[str, Any]
Check = Callable[[Row], bool]


def _at_least(n: float) -> Check:
    return lambda r: r["qops"] >= n


def _at_most(n: float) -> Check:
    return lambda r: r["qops"] <= n


def _times(celery: float, dramatiq: float) -> Check:
    """qops at least ``celery`` times Celery and ``dramatiq`` times Dramatiq (the peers
    measured in this run)."""
    return lambda r: all(r[p] is None or r["qops"] >= k * r[p]
                         for p, k in (("celery", celery), ("dramatiq", dramatiq)))


def _fast_latency(r: Row) -> bool:
    return r["qops"] <= 1.0 and all(r[p] is None or r["qops"] < r[p]
                                    for p in ("celery", "dramatiq"))


def _confirmed_publish(r: Row) -> bool:
    return (r["floor"] is None or r["qops"] >= 0.9 * r["floor"]) and \
        (r["celery"] is None or r["qops"] >= r["celery"])


#: (measure pattern, target as written in the table, check on the row)
TARGETS: list[tuple[str, str, Check]] = [
    (r"^delay\(\) one at a time, (amqp|rabbitmq)", ">= 90% floor, >= celery",
     _confirmed_publish),
    (r"^bulk send, redis", ">= 50,000/s", _at_least(50_000)),
    (r"^bulk send, (amqp|rabbitmq)", ">= 20,000/s", _at_least(20_000)),
    (r"^bulk send, sqlite", ">= 30,000/s", _at_least(30_000)),
    (r"^tasks/s, rabbitmq, 2 processes", ">= 2.5x celery, >= 1.3x dramatiq", _times(2.5, 1.3)),
    (r"^tasks/s, redis, 2 processes", ">= 5x celery, >= 1.5x dramatiq", _times(5, 1.5)),
    (r"^tasks/s, redis, one solo process", ">= 21,000/s", _at_least(21_000)),
    (r"^round trip p50, (redis|rabbitmq)", "<= 1 ms, below both", _fast_latency),
    (r"^CLI --version", "<= 80 ms", _at_most(80)),
    (r"^CLI --help", "<= 150 ms", _at_most(150)),
    (r"^CLI inspect ping", "<= 250 ms", _at_most(250)),
    (r"^idle RSS, solo", "<= 35 MB", _at_most(35)),
    (r"^idle RSS, prefork -c 2", "<= 100 MB", _at_most(100)),
]


def target_of(row: Row) -> tuple[str | None, str]:
    """The row's target and its mark: "met", "NOT met", or "-" (no target, or no qops
    number this run)."""
    for pattern, text, check in TARGETS:
        if re.search(pattern, row["measure"], re.IGNORECASE):
            if row.get("qops") is None:
                return text, "-"
            return text, "met" if check(row) else "NOT met"
    return None, "-"


def spread_of(row: Row, side: str) -> tuple[float, float] | None:
    """(min, max) of a side's runs: the scripts give {"min", "max", ...} or [min, max]."""
    s = (row.get("spread") or {}).get(side)
    if isinstance(s, dict) and s.get("min") is not None and s.get("max") is not None:
        return s["min"], s["max"]
    if isinstance(s, (list, tuple)) and len(s) == 2:
        return s[0], s[1]
    return None


# -- running the scripts -------------------------------------------------------------------


def options_of(script: Path, python: str) -> str:
    res = subprocess.run([python, str(script), "--help"], capture_output=True, text=True,
                         timeout=120)
    return res.stdout


def run_script(name: str, args: argparse.Namespace) -> tuple[dict[str, Any] | None, str]:
    """The script's JSON document (None when there is none) and a line about the run."""
    script = BENCH / f"{name}.py"
    if not script.exists():
        return None, f"bench/{name}.py: not in this checkout; its rows are missing"
    python = sys.executable
    known = options_of(script, python)
    cmd = [python, str(script), "--json"]
    if args.repeat is not None and "--repeat" in known:
        cmd += ["--repeat", str(args.repeat)]
    if args.redis_url and "--redis-url" in known:
        cmd += ["--redis-url", args.redis_url]
    for extra in args.pass_args:
        target, _, rest = extra.partition("=")
        if target == name:
            cmd += shlex.split(rest)
    print(f"== {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # progress: our stderr
    doc = None
    for line in reversed(res.stdout.strip().splitlines()):
        try:
            doc = json.loads(line)
            break
        except ValueError:
            continue
    if doc is None or not isinstance(doc.get("rows"), list):
        return None, (f"bench/{name}.py: exited with {res.returncode} without a JSON "
                      "document with rows; its rows are missing")
    how = "ok" if res.returncode == 0 else f"exited with {res.returncode} (some phases failed)"
    return doc, f"bench/{name}.py: {how}, {len(doc['rows'])} rows"


# -- the table -----------------------------------------------------------------------------


def _num(value: Any, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("ms", "MB"):
        return f"{value:,.2f}" if unit == "ms" and value < 10 else f"{value:,.1f}"
    return f"{value:,.0f}"


def table(rows: list[Row]) -> list[str]:
    head = ["measure", "unit", *SYSTEMS, "floor", "qops range", "target", "met"]
    lines = []
    for r in rows:
        rng = spread_of(r, "qops")
        lines.append([r["measure"], r["unit"], *(_num(r.get(s), r["unit"]) for s in SYSTEMS),
                      _num(r.get("floor"), r["unit"]),
                      "-" if rng is None else
                      f"{_num(rng[0], r['unit'])}-{_num(rng[1], r['unit'])}",
                      r.get("target") or "-", r.get("met", "-")])
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    out = []
    for cells in [head, ["-" * w for w in widths], *lines]:
        out.append(" | ".join(c.ljust(w) if i in (0, 1, 7, 8) else c.rjust(w)
                              for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
                   .rstrip())
    floors = {r["measure"]: r["floor_label"] for r in rows if r.get("floor_label")}
    if floors:
        out.append("")
        out += [f"floor of '{m}': {label}" for m, label in floors.items()]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SCRIPTS),
                   help="the scripts to run, comma separated (default: all)")
    p.add_argument("--repeat", type=int, default=None,
                   help="runs per configuration, for the scripts that take --repeat")
    p.add_argument("--redis-url", default=None, help="for the scripts that take --redis-url")
    p.add_argument("--pass", dest="pass_args", action="append", default=[],
                   metavar="SCRIPT=ARGS", help="more arguments for one script, e.g. "
                   "'throughput=--n 20000 --brokers redis' (repeatable)")
    p.add_argument("--json", action="store_true", help="print only the JSON document")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.only if s not in SCRIPTS]
    if bad:
        p.error(f"unknown script(s) {', '.join(bad)}: choose from {', '.join(SCRIPTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now().astimezone()
    loadavg = os.getloadavg()
    rows: list[Row] = []
    docs: dict[str, Any] = {}
    notes: list[str] = []
    try:
        for name in args.only:
            doc, note = run_script(name, args)
            notes.append(note)
            print(note, file=sys.stderr, flush=True)
            if doc is None:
                continue
            for row in doc.pop("rows"):
                row["script"] = name
                row["target"], row["met"] = target_of(row)
                rows.append(row)
            docs[name] = doc
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    summary = {"bench": "all", "date": started.isoformat(timespec="seconds"),
               "host": {"cpus": os.cpu_count(), "loadavg_at_start": loadavg,
                        "python": sys.version.split()[0]},
               "scripts": notes, "rows": rows, "documents": docs}
    if not args.json:
        print(f"{started:%Y-%m-%d %H:%M %Z}, {os.cpu_count()} CPUs, load average at start "
              f"{loadavg[0]:.2f}; medians of each script's runs")
        print("\n".join(table(rows)))
        print("")
        print("\n".join(notes))
        missed = [r["measure"] for r in rows if r["met"] == "NOT met"]
        print(f"targets met: {sum(r['met'] == 'met' for r in rows)}, not met: {len(missed)}")
    print(json.dumps(summary, separators=(",", ":")))
    complete = all(n.endswith(" rows") and ": ok," in n for n in notes)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
