"""Beat: in-process with a fake clock (entries, the schedule file, the lock), then real
``qops beat`` processes on each transport (every-second schedule, restart, two beats)."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qops import App, protocol
from qops.beat import Beat, EmbeddedBeat, add_periodic_task, collect_entries
from qops.errors import ConfigError
from qops.schedules import crontab, interval
from qops.signals import Signal
from qops.transports.base import Transport
from tests.helpers import ROOT, qops_env, wait_until

UTC = dt.timezone.utc
T0 = dt.datetime(2024, 5, 6, 7, 0, 0, tzinfo=UTC)  # a Monday


class Clock:
    def __init__(self, start: dt.datetime = T0) -> None:
        self.t = start

    def __call__(self) -> dt.datetime:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += dt.timedelta(seconds=seconds)


@pytest.fixture
def app() -> Iterator[App]:
    url = f"memory://{uuid.uuid4().hex}"
    a = App("beatapp", broker=url, backend=url)
    yield a
    a.close()


def ready(app: App, queue: str) -> int:
    return app.transport.queue_stats([queue])[0].ready


def drain(app: App, queue: str) -> list[protocol.TaskRequest]:
    """Take every message on ``queue`` (as many as its stats say are ready)."""
    expected = ready(app, queue)
    consumer = app.transport.consumer([queue], 10000)
    out: list[protocol.TaskRequest] = []
    while len(out) < expected:
        d = consumer.get(2.0)
        if d is None:
            break
        assert d.message is not None
        out.append(protocol.parse_task_message(d.message))
        consumer.ack(d)
    consumer.close()
    return out


def run_for(beat: Beat, clock: Clock, seconds: float, step: float = 0.25) -> None:
    """Tick as the loop would, with the clock moving ``step`` at a time."""
    end = clock.t + dt.timedelta(seconds=seconds)
    while clock.t < end:
        beat.step()
        clock.advance(step)


# -- entries ---------------------------------------------------------------------------


def test_entries_from_beat_schedule_old_name_yaml_and_add_periodic_task(app, tmp_path):
    app.config_from_object({"CELERYBEAT_SCHEDULE": {
        "old": {"task": "t.old", "schedule": dt.timedelta(seconds=30), "args": (1, 2)}}})
    assert set(collect_entries(app)) == {"old"}
    (tmp_path / "qops.yaml").write_text(
        "beat_schedule:\n"
        "  every-10: {task: t.a, schedule: 10}\n"
        "  quarter: {task: t.b, schedule: '*/15 * * * *', options: {queue: q1}}\n"
        "  monday: {task: t.c, schedule: {minute: 30, hour: 7, day_of_week: 1},"
        " kwargs: {x: 1}}\n")
    app.conf.load_yaml(tmp_path / "qops.yaml")

    @app.task
    def ping(x: int = 0) -> int:
        return x

    hook = getattr(app, "on_after_configure", None)
    if hook is None:  # until App has the hook
        hook = Signal("on_after_configure")
        setattr(app, "on_after_configure", hook)  # noqa: B010

    @hook.connect
    def setup_periodic_tasks(sender: App, **kwargs: Any) -> None:
        add_periodic_task(sender, 60.0, ping.s(5), name="ping every minute", queue="pings",
                          priority=7)
        add_periodic_task(sender, crontab(minute=0), ping.s())

    entries = collect_entries(app)
    assert set(entries) == {"every-10", "quarter", "monday", "ping every minute",
                            repr(ping.s())}
    assert entries["every-10"].schedule == interval(10)
    assert entries["quarter"].schedule == crontab(minute="*/15")
    assert entries["quarter"].options == {"queue": "q1"}
    assert entries["monday"].schedule == crontab(minute=30, hour=7, day_of_week=1)
    assert entries["monday"].kwargs == {"x": 1}
    ping_entry = entries["ping every minute"]
    assert (ping_entry.task, ping_entry.args, ping_entry.options) == \
        (ping.name, [5], {"queue": "pings", "priority": 7})


@pytest.mark.parametrize(("entry", "message"), [
    ({"schedule": 1}, "has no 'task'"),
    ({"task": "t"}, "has no 'schedule'"),
    ({"task": "t", "schedule": "61 * * * *"}, "entry 'bad': crontab minute='61'"),
    ({"task": "t", "schedule": 1, "sched": 2}, "unknown key(s) sched"),
    ({"task": "t", "schedule": 1, "options": {"qeue": "x"}}, "unknown option 'qeue'"),
    ({"task": "t", "schedule": 1, "args": "abc"}, "'args' must be a list"),
    ({"task": "t", "schedule": 1, "options": {"expires": "soon"}},
     "expires 'soon' is not a number of seconds or a datetime"),
    ({"task": "t", "schedule": 1, "options": {"priority": "high"}},
     "priority 'high' is not a number"),
])
def test_bad_entries_say_what_is_wrong(app, entry, message):
    app.conf.beat_schedule = {"bad": entry}
    with pytest.raises(ConfigError) as err:
        collect_entries(app)
    assert message in str(err.value)


# -- sending -----------------------------------------------------------------------------


def test_every_second_with_options(app, tmp_path):
    app.conf.beat_schedule = {"tick": {"task": "t.tick", "schedule": 1.0, "args": [1, 2],
                                       "kwargs": {"k": "v"},
                                       "options": {"queue": "ticks", "priority": 6,
                                                   "expires": 30}}}
    clock = Clock()
    beat = Beat(app, schedule_file=tmp_path / "s", now=clock)
    beat.setup()
    run_for(beat, clock, 4.0)
    sent = drain(app, "ticks")
    assert len(sent) == 3  # at 1, 2, 3 s: the first run is one period after the start
    req = sent[0]
    assert (req.name, req.args, req.kwargs, req.priority) == ("t.tick", [1, 2], {"k": "v"}, 6)
    assert req.expires is not None
    assert 25 < (req.expires - dt.datetime.now(UTC)).total_seconds() <= 30


def test_crontab_entry_fires_at_its_times(app, tmp_path):
    app.conf.beat_schedule = {"q": {"task": "t.q", "schedule": crontab(minute="*/15"),
                                    "options": {"queue": "cron"}}}
    clock = Clock(T0 + dt.timedelta(minutes=10))
    beat = Beat(app, schedule_file=tmp_path / "s", now=clock, max_interval=60)
    beat.setup()
    run_for(beat, clock, 40 * 60, step=30)  # 07:10 -> 07:50: 07:15, 07:30, 07:45
    assert ready(app, "cron") == 3
    rows = beat.table()
    assert rows[0]["next_run"] == "2024-05-06T08:00:00+00:00"


def test_restart_does_not_refire_and_missed_run_fires_once(app, tmp_path):
    app.conf.beat_schedule = {"m": {"task": "t.m", "schedule": 60, "options": {"queue": "m"}}}
    path = tmp_path / "schedule"
    clock = Clock()
    beat = Beat(app, schedule_file=path, now=clock, max_interval=30)
    beat.setup()
    run_for(beat, clock, 61, step=1)
    assert ready(app, "m") == 1
    beat.close()
    saved = json.loads(path.read_text())
    assert saved["entries"]["m"]["total_run_count"] == 1

    # restart 10 s later: nothing is sent again at start
    clock.advance(10)
    beat = Beat(app, schedule_file=path, now=clock, max_interval=30)
    beat.setup()
    beat.step()
    assert ready(app, "m") == 1

    # down for ten minutes: the missed runs are sent once, then every minute again
    beat.close()
    clock.advance(600)
    beat = Beat(app, schedule_file=path, now=clock, max_interval=30)
    beat.setup()
    beat.step()
    assert ready(app, "m") == 2
    run_for(beat, clock, 59, step=1)
    assert ready(app, "m") == 2
    run_for(beat, clock, 2, step=1)
    assert ready(app, "m") == 3
    beat.close()


def test_an_entry_that_never_ran_has_no_last_run_and_keeps_its_start(app, tmp_path):
    """Before its first run an entry shows no last run (not the time beat started), and
    a beat restarted before then still counts the period from when the entry was first
    seen: an hourly entry whose beat restarts every half hour runs within the hour."""
    app.conf.beat_schedule = {"h": {"task": "t.h", "schedule": 3600, "options": {"queue": "h"}}}
    path = tmp_path / "schedule"
    clock = Clock()
    for _ in range(2):
        beat = Beat(app, schedule_file=path, now=clock, max_interval=30)
        beat.setup()
        [row] = beat.table()
        assert row["last_run"] is None and row["total_run_count"] == 0
        run_for(beat, clock, 1800, step=30)
        beat.close()
        assert json.loads(path.read_text())["entries"]["h"]["last_run"] is None
    beat = Beat(app, schedule_file=path, now=clock, max_interval=30)
    beat.setup()
    run_for(beat, clock, 30, step=1)
    assert ready(app, "h") == 1
    [row] = beat.table()
    assert row["last_run"] is not None and row["total_run_count"] == 1
    beat.close()


@pytest.mark.parametrize("content", [b"\x00\x01 a shelve file",
                                     b"\x92\xff\x00 not even UTF-8 (a gdbm file)"])
def test_unreadable_schedule_file_is_replaced(app, tmp_path, caplog, content):
    path = tmp_path / "celerybeat-schedule"
    path.write_bytes(content)
    app.conf.beat_schedule = {"m": {"task": "t.m", "schedule": 60}}
    beat = Beat(app, schedule_file=path, now=Clock())
    beat.setup()
    assert "cannot be read" in caplog.text
    assert json.loads(path.read_text())["format"] == "qops-beat-schedule"


def test_unwritable_schedule_file_fails_at_start(app, tmp_path):
    app.conf.beat_schedule = {"m": {"task": "t.m", "schedule": 60}}
    beat = Beat(app, schedule_file=tmp_path / "missing-dir" / "s", now=Clock())
    with pytest.raises(ConfigError, match="cannot write the schedule file"):
        beat.setup()


def test_two_beats_one_sends_standby_takes_over(app, tmp_path):
    app.conf.beat_schedule = {"tick": {"task": "t.tick", "schedule": 1.0,
                                       "options": {"queue": "ticks"}}}
    clock = Clock()
    # the memory lock expires in real time: a short ttl keeps the test fast
    a = Beat(app, schedule_file=tmp_path / "a", now=clock, max_interval=1, lock_ttl=0.3)
    b = Beat(app, schedule_file=tmp_path / "b", now=clock, max_interval=1, lock_ttl=0.3)
    a.setup()
    b.setup()
    for _ in range(40):  # 10 s, both ticking
        a.step()
        b.step()
        clock.advance(0.25)
    assert a.holding and not b.holding
    assert ready(app, "ticks") == 9  # at 1..9 s; not 18
    drain(app, "ticks")
    # a dies without releasing the lock: b takes it once it has expired, and goes on
    # from where a was, not from its own start
    time.sleep(0.4)
    for _ in range(40):
        b.step()
        clock.advance(0.25)
    assert b.holding
    assert 9 <= ready(app, "ticks") <= 11
    # b stops cleanly: the lock is released and a takes over at once
    b.close()
    a.holding = False
    a.step()
    assert a.holding


def test_locks_contract_memory_and_sqlite(tmp_path):
    from qops.transports.base import from_url

    for url in (f"memory://{uuid.uuid4().hex}", f"sqlite:///{tmp_path}/locks.db"):
        t1, t2 = from_url(url), from_url(url)
        assert t1.acquire_lock("x", "one", 0.5)
        assert t1.acquire_lock("x", "one", 0.5)  # renewed
        assert not t2.acquire_lock("x", "two", 0.5)
        assert t2.acquire_lock("y", "two", 0.5)  # another name
        t2.release_lock("x", "two")  # not the holder: nothing happens
        assert not t2.acquire_lock("x", "two", 0.5)
        time.sleep(0.6)
        assert t2.acquire_lock("x", "two", 5)  # expired: taken over
        assert not t1.acquire_lock("x", "one", 5)
        t2.release_lock("x", "two")
        assert t1.acquire_lock("x", "one", 5)
        t1.close()
        t2.close()


def test_embedded_beat_runs_in_a_child_and_stops(tmp_path):
    url = f"sqlite:///{tmp_path}/broker.db"
    a = App("embedded", broker=url, backend=url)
    a.conf.beat_schedule = {"tick": {"task": "t.tick", "schedule": 0.5,
                                     "options": {"queue": "emb"}}}
    eb = EmbeddedBeat(a, schedule_file=tmp_path / "s", max_interval=0.5).start()
    try:
        assert wait_until(lambda: ready(a, "emb") >= 2, timeout=10)
    finally:
        eb.stop()
    count = ready(a, "emb")
    time.sleep(1.2)
    assert ready(a, "emb") == count  # stopped
    a.close()


# -- real beat processes ----------------------------------------------------------------------

# Runs the qops CLI with the beat command registered even before cli/main.py does it.
BEAT_MAIN = (
    "import sys\n"
    "from qops.cli import main as m\n"
    "if not any(c.name == 'beat' for c in m.cli.registered_commands):\n"
    "    from qops.cli import beat\n"
    "    beat.register(m.cli)\n"
    "m.main(sys.argv[1:])\n"
)


class BeatProcess:
    def __init__(self, broker: str, schedule: dict[str, Any], schedule_file: Path,
                 logfile: Path, *extra: str) -> None:
        self.args = [sys.executable, "-c", BEAT_MAIN, "-A", "proj", "-b", broker, "beat",
                     "-s", str(schedule_file), "-l", "INFO", "--max-interval", "0.5", *extra]
        self.env = qops_env(QOPS_BEAT_SCHEDULE=json.dumps(schedule))
        self.logfile = logfile
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BeatProcess:
        with open(self.logfile, "ab") as out:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=str(ROOT),
                                         start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.logfile.read_text() if self.logfile.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self) -> BeatProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@pytest.fixture
def broker(real_broker_url: str) -> Iterator[tuple[str, App]]:
    app = App("probe", broker=real_broker_url)
    yield real_broker_url, app
    app.close()


@pytest.fixture
def sqlite_broker(sqlite_url: str) -> Iterator[tuple[str, App]]:
    """For what the schedule file decides (counts, catch-up): the same on every broker,
    so one is enough; the locks, which differ, are tested on all three."""
    app = App("probe", broker=sqlite_url)
    yield sqlite_url, app
    app.close()


def every(seconds: float, queue: str) -> dict[str, Any]:
    return {"tick": {"task": "proj.tasks.add", "schedule": seconds, "args": [1, 2],
                     "options": {"queue": queue}}}


def origins(app: App, queue: str) -> dict[str, int]:
    """Messages on ``queue`` counted by the pid of the process that sent them."""
    counts: dict[str, int] = {}
    for req in drain(app, queue):
        pid = str(req.headers.get("origin", "")).split("@")[0]
        counts[pid] = counts.get(pid, 0) + 1
    return counts


def has_locks(transport: Transport) -> bool:
    return type(transport).acquire_lock is not Transport.acquire_lock


def test_every_second_schedule_fires_the_expected_number_of_times(sqlite_broker, tmp_path):
    url, app = sqlite_broker
    queue = f"beat-{uuid.uuid4().hex[:8]}"
    with BeatProcess(url, every(1, queue), tmp_path / "s", tmp_path / "beat.log") as b:
        assert wait_until(lambda: "Sending due task tick" in b.log(), timeout=20), b.log()
        time.sleep(4.0)
    count = sum(origins(app, queue).values())
    # one at start + 1 s, then one a second for 4 s: 4 or 5 (timing slack: 3..6)
    assert 3 <= count <= 6, (count, b.log())
    assert b.proc is not None and b.proc.returncode == 0


def saved_runs(path: Path) -> tuple[int, float]:
    """(total_run_count, last_run as unix time) of the entry ``tick`` in a schedule file
    ((0, 0.0) while there is none)."""
    try:
        entry = json.loads(path.read_text())["entries"]["tick"]
    except (FileNotFoundError, ValueError, KeyError):
        return 0, 0.0
    last = entry["last_run"]
    return entry["total_run_count"], dt.datetime.fromisoformat(last).timestamp() if last else 0.0


def test_restart_keeps_last_runs(sqlite_broker, tmp_path):
    """A restarted beat goes on from the last-run times in its schedule file. Checked on
    the times the file records (when each run was sent), not on how soon after a run the
    test manages to restart beat: on a busy machine that may take longer than a period."""
    url, app = sqlite_broker
    queue = f"beat-{uuid.uuid4().hex[:8]}"
    sched, path = every(2, queue), tmp_path / "schedule"
    with BeatProcess(url, sched, path, tmp_path / "beat.log") as b:
        assert wait_until(lambda: ready(app, queue) == 1, timeout=20), b.log()
    count, first = saved_runs(path)
    assert count == 1
    # restarted: the next run is 2 s after the last one, not at start
    with BeatProcess(url, sched, path, tmp_path / "beat2.log") as b:
        assert wait_until(lambda: saved_runs(path)[0] >= 2, timeout=20), b.log()
        count, second = saved_runs(path)
        assert count == 2 and ready(app, queue) == 2, b.log()
    assert second - first >= 1.9, (first, second, b.log())
    # down for more than two periods: one catch-up run at start, not two
    time.sleep(5)
    with BeatProcess(url, sched, path, tmp_path / "beat3.log") as b:
        assert wait_until(lambda: saved_runs(path)[0] >= 3, timeout=20), b.log()
        count, catch_up = saved_runs(path)
        assert count == 3 and catch_up - second > 4, (count, second, catch_up, b.log())
        time.sleep(1.0)  # a second catch-up run would come now; the next due one 2 s on
        count, last = saved_runs(path)
        assert count == 3 or (count == 4 and last - catch_up >= 1.9), \
            (count, catch_up, last, b.log())
        assert ready(app, queue) == count


def test_two_beats_at_once_send_no_duplicates(broker, tmp_path):
    url, app = broker
    assert has_locks(app.transport)
    queue = f"beat-{uuid.uuid4().hex[:8]}"
    a = BeatProcess(url, every(1, queue), tmp_path / "a", tmp_path / "a.log").start()
    b = BeatProcess(url, every(1, queue), tmp_path / "b", tmp_path / "b.log").start()
    try:
        assert wait_until(lambda: "holding the lock" in a.log() + b.log(), timeout=20)
        assert wait_until(lambda: "standby" in a.log() + b.log(), timeout=20), \
            a.log() + b.log()
        time.sleep(5)
        sent = origins(app, queue)
        assert len(sent) == 1, sent  # one sender
        assert 3 <= sum(sent.values()) <= 7, sent  # ~1 a second, not 2
        holder, standby = (a, b) if "holding the lock" in a.log() else (b, a)
        assert str(holder.pid) in "".join(sent), (sent, holder.pid)
        # the holder dies without a word: the standby takes over within seconds
        holder.stop(signal.SIGKILL)
        started = time.monotonic()
        assert wait_until(lambda: "holding the lock" in standby.log(), timeout=15), \
            standby.log()
        took = time.monotonic() - started
        assert took < 8, took
        time.sleep(3)
        sent = origins(app, queue)
        assert set(sent) == {f"gen{standby.pid}"}, sent
        assert 2 <= sum(sent.values()) <= 6 + int(took), sent
    finally:
        a.stop()
        b.stop()


def test_show_lists_entries_with_next_runs(tmp_path):
    sched = {"quarter": {"task": "proj.tasks.add", "schedule": "*/15 * * * *",
                         "args": [1, 1], "options": {"queue": "q"}},
             "tick": {"task": "proj.tasks.add", "schedule": 10}}
    env = qops_env(QOPS_BEAT_SCHEDULE=json.dumps(sched), QOPS_TIMEZONE="Europe/Paris")
    url = f"sqlite:///{tmp_path}/b.db"
    base = [sys.executable, "-c", BEAT_MAIN, "-A", "proj", "-b", url]
    out = subprocess.run([*base, "--json", "beat", "--show", "-s", str(tmp_path / "s")],
                         env=env, capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["timezone"] == "Europe/Paris"
    rows = {r["name"]: r for r in doc["entries"]}
    assert rows["quarter"]["schedule"] == "*/15 * * * *"
    nxt = dt.datetime.fromisoformat(rows["quarter"]["next_run"])
    assert nxt.minute % 15 == 0 and nxt.utcoffset() in (dt.timedelta(hours=1),
                                                         dt.timedelta(hours=2))
    assert rows["tick"]["schedule"] == "every 10s" and rows["tick"]["due_in"] <= 10
    assert not (tmp_path / "s").exists()  # --show writes nothing
    out = subprocess.run([*base, "schedule"], env=env, capture_output=True, text=True,
                         cwd=str(ROOT), timeout=60)
    assert out.returncode == 0, out.stderr
    assert "quarter" in out.stdout and "*/15 * * * *" in out.stdout


def test_bad_schedule_is_a_usage_error(tmp_path):
    env = qops_env(QOPS_BEAT_SCHEDULE=json.dumps({"x": {"task": "t", "schedule": "* 25 * * *"}}))
    out = subprocess.run([sys.executable, "-c", BEAT_MAIN, "-A", "proj", "-b",
                          f"sqlite:///{tmp_path}/b.db", "beat", "-s", str(tmp_path / "s")],
                         env=env, capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert out.returncode == 2, out
    assert "beat_schedule entry 'x': crontab hour='25'" in out.stderr
