"""A busy fleet through the loss of a broker node, measured.

``run_through_failover``: workers consume ``total`` trivial tasks (``proj.tasks.mark``:
one line per run in a file); once ``kill_after`` have run, ``kill()`` takes the broker
node away while a producer is still sending the rest (retrying what the broker did not
take, with the same task id), and ``qops status`` / ``qops inspect active`` are run in a
loop the whole time. Measured: runs per task id (every task at least once; duplicates),
how long the fleet took to consume again, how long the remote-control commands failed,
and how often the producer had to try again.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import ROOT


@dataclass
class Measured:
    total: int
    runs: Counter[str]
    kill_at: float  # monotonic
    recovered_at: float | None  # first sign the fleet consumes again after the kill
    in_flight_bound: int
    publish_retries: int = 0
    #: (started, ended, command, ok, why it failed)
    probes: list[tuple[float, float, str, bool, str]] = field(default_factory=list)

    @property
    def missing(self) -> int:
        return sum(1 for i in range(self.total) if self.runs[f"t{i}"] == 0)

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.runs.values() if n > 1)

    @property
    def recovery(self) -> float:
        return float("inf") if self.recovered_at is None else self.recovered_at - self.kill_at

    def back_after(self, command: str) -> float:
        """Seconds from the kill to the start of the first ``command`` that succeeded
        having started after the kill (inf if none did)."""
        for start, _, cmd, ok, _ in self.probes:
            if cmd == command and ok and start >= self.kill_at:
                return start - self.kill_at
        return float("inf")

    def late_failures(self, after: float) -> list[str]:
        """Failures of commands started more than ``after`` seconds after the kill."""
        return [f for (start, *_), f in zip(
            [p for p in self.probes if not p[3]], self.failures(), strict=True)
            if start - self.kill_at > after]

    def probe_counts(self, command: str) -> tuple[int, int]:
        oks = [p[3] for p in self.probes if p[2] == command]
        return sum(oks), len(oks) - sum(oks)

    def failures(self) -> list[str]:
        return [f"{cmd} at {start - self.kill_at:+.1f}s: {detail}"
                for start, _, cmd, ok, detail in self.probes if not ok]

    def summary(self, topology: str) -> str:
        st_ok, st_bad = self.probe_counts("status")
        in_ok, in_bad = self.probe_counts("inspect")
        return (f"{topology}: {self.total} tasks, missing {self.missing}, duplicates "
                f"{self.duplicates} (in flight at most {self.in_flight_bound}), consuming "
                f"again {self.recovery:.2f}s after the kill, producer retries "
                f"{self.publish_retries}; status ok/failed {st_ok}/{st_bad} (the first to "
                f"work started {self.back_after('status'):.1f}s after the kill), inspect "
                f"ok/failed {in_ok}/{in_bad} ({self.back_after('inspect'):.1f}s)")


def count_runs(path: Path) -> Counter[str]:
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return Counter()
    return Counter(line.split(" ", 1)[0] for line in text.splitlines() if line.strip())


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


class Prober:
    """Asks the fleet ``status`` (ping) and ``inspect active`` in turn, every 0.2 s,
    until stopped: the library calls the two commands make (qops.control.broadcast),
    in this process, so that the measure is the broker's and not the cost of starting
    a Python process on a loaded machine (``cli_works`` runs the commands themselves)."""

    COMMANDS = {"status": "ping", "inspect": "active"}

    def __init__(self, app: Any) -> None:
        self.app = app
        self.results: list[tuple[float, float, str, bool, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="prober")

    def _run(self) -> None:
        from qops import control

        while not self._stop.is_set():
            for name, method in self.COMMANDS.items():
                start = time.monotonic()
                try:
                    res = control.broadcast(self.app, method, timeout=2, linger=0.05)
                    ok, detail = bool(res.replies), "" if res.replies else "no reply"
                except Exception as exc:
                    ok, detail = False, f"{type(exc).__name__}: {str(exc)[:200]}"
                self.results.append((start, time.monotonic(), name, ok, detail))
                self._stop.wait(0.2)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(60)


def cli_works(broker: str, env: dict[str, str]) -> list[str]:
    """``qops status`` and ``qops inspect active`` as commands: the problems ([] when
    both named a node)."""
    problems = []
    for args in (["status", "--json", "-t", "10"], ["inspect", "active", "--json", "-t", "10"]):
        proc = subprocess.run(
            [sys.executable, "-m", "qops", "-A", "proj", "-b", broker, *args],
            env=env, capture_output=True, text=True, timeout=120, cwd=str(ROOT))
        if proc.returncode != 0 or "@" not in proc.stdout:
            problems.append(f"qops {' '.join(args)}: exit {proc.returncode}: "
                            f"{proc.stdout[-300:]} {proc.stderr[-300:]}")
    return problems


def run_through_failover(app: Any, queue: str, path: Path, kill: Callable[[], None], *,
                         total: int, upfront: int, kill_after: int, in_flight_bound: int,
                         prober: Prober, timeout: float = 120,
                         before_kill: Callable[[], None] | None = None) -> Measured:
    """See the module doc. ``upfront`` tasks are sent before the kill; the rest by a
    producer thread that starts at the kill (each failed send is tried again until
    the broker takes it)."""
    import proj.tasks

    from qops.errors import BrokerUnreachable, PublishError

    mark = proj.tasks.mark
    for i in range(upfront):
        mark.apply_async((str(path),), queue=queue, task_id=f"t{i}")
    retries = 0

    def produce() -> None:
        nonlocal retries
        for i in range(upfront, total):
            while True:
                try:
                    mark.apply_async((str(path),), queue=queue, task_id=f"t{i}")
                    break
                except (BrokerUnreachable, PublishError):
                    retries += 1
                    time.sleep(0.1)

    deadline = time.monotonic() + timeout
    while _lines(path) < kill_after:
        assert time.monotonic() < deadline, f"only {_lines(path)} tasks ran before the kill"
        time.sleep(0.01)
    if before_kill is not None:
        before_kill()
    producer = threading.Thread(target=produce, daemon=True, name="producer")
    with prober:
        kill_at = time.monotonic()
        kill()
        at_kill = _lines(path)
        producer.start()
        # consuming again: more runs than the fleet could have had in hand at the kill
        recovered_at = None
        while time.monotonic() < deadline:
            n = _lines(path)
            if recovered_at is None and n > at_kill + in_flight_bound:
                recovered_at = time.monotonic()
            if recovered_at is not None and not producer.is_alive() and n >= total:
                runs = count_runs(path)
                if all(runs[f"t{i}"] for i in range(total)):
                    break
            time.sleep(0.05 if recovered_at is None else 0.2)
        producer.join(max(0.0, deadline - time.monotonic()))
        # late duplicates, if any, show up now; and status/inspect are seen answering
        while time.monotonic() < deadline and not (
                time.monotonic() - kill_at > 3 and
                all(any(p[2] == c and p[3] and p[0] > kill_at for p in prober.results)
                    for c in Prober.COMMANDS)):
            time.sleep(0.2)
    return Measured(total, count_runs(path), kill_at, recovered_at, in_flight_bound,
                    retries, prober.results)


def configured_app(**settings: str) -> Iterator[Any]:
    """The example project's app with ``settings`` on its command-line layer, its
    connections closed before and after."""
    from proj.qops import app

    app.close()
    for name, value in settings.items():
        app.conf.set(name, value, layer="cli")
    yield app
    app.conf._layers["cli"].clear()
    app.close()
