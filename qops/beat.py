"""Beat: sends periodic tasks when they are due.

    beat = Beat(app, schedule_file="/var/lib/qops/beat-schedule")
    beat.run()          # blocks until beat.stop() (the CLI calls it on TERM/INT)

Entries come from the ``beat_schedule`` setting (also read as ``CELERYBEAT_SCHEDULE``
and from YAML) and from ``add_periodic_task``. Each entry is
``{"task": name, "schedule": ..., "args": [...], "kwargs": {...}, "options": {...}}``
where ``schedule`` is anything ``qops.schedules.parse_schedule`` reads and ``options``
are sending options (``queue``, ``priority``, ``expires``, ...).

The schedule file (JSON, replaced atomically) keeps each entry's last run, so a restart
does not send everything again, and a run missed while beat was down is sent once.

Only one beat sends: a beat holds a lock in the broker (``Transport.acquire_lock``),
renewed on every tick. A second beat waits as a standby, tries the lock every second,
and takes over when the holder stops (at once) or dies (when its lock expires, after
``lock_ttl`` seconds; at once on RabbitMQ, whose lock is an exclusive queue). While it
waits, a standby moves its own last-run times forward over the runs the holder has
certainly sent (those due more than ``lock_ttl`` before it last saw the lock held), so
on taking over it sends what the holder missed -- once -- and nothing the holder sent.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import socket
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qops.errors import ConfigError, UsageError
from qops.schedules import BaseSchedule, get_tz, parse_schedule, utcnow
from qops.signals import fire_app_hooks
from qops.task import SEND_OPTIONS
from qops.values import file_name

if TYPE_CHECKING:
    from qops.app import App

log = logging.getLogger("qops.beat")

#: seconds beat sleeps at most between two looks at the schedule
DEFAULT_MAX_INTERVAL = 2.0
#: the lock's time to live is this many times the max interval (between the bounds)
LOCK_TTL_FACTOR = 3
LOCK_TTL_BOUNDS = (1.0, 30.0)
#: how often a standby tries to take the lock
STANDBY_INTERVAL = 1.0
#: after a failed send, try that entry again after this many seconds
SEND_RETRY = 2.0

STATE_FORMAT = "qops-beat-schedule"
STATE_VERSION = 1

ENTRY_KEYS = {"task", "schedule", "args", "kwargs", "options", "relative"}
#: sending options an entry may carry: apply_async's, less the two that would make every
#: periodic send the same message (one fixed task id, one fixed moment)
ENTRY_OPTIONS = SEND_OPTIONS - {"task_id", "eta"}


# -- add_periodic_task ---------------------------------------------------------------------

_periodic: weakref.WeakKeyDictionary[Any, dict[str, dict[str, Any]]] = \
    weakref.WeakKeyDictionary()


def add_periodic_task(app: App, schedule: Any, sig: Any, args: Any = (), kwargs: Any = (),
                      name: str | None = None, **options: Any) -> str:
    """``app.add_periodic_task(10.0, add.s(2, 2), name='add every 10', queue='q')``.

    ``args``/``kwargs`` are added to the signature's own; ``options`` are sending
    options. Returns the entry's name (default: the signature's repr, as Celery)."""
    from qops.task import Signature, Task

    if isinstance(sig, Task):
        sig = sig.s()
    elif isinstance(sig, (str, dict)) and not isinstance(sig, Signature):
        sig = Signature(sig, app=app)
    if not isinstance(sig, Signature):
        raise UsageError(f"add_periodic_task needs a signature (task.s(...)), not {sig!r}")
    sig = sig.clone(list(args or ()), dict(kwargs or {}))
    key = name or repr(sig)
    entry = {"task": sig.name, "schedule": schedule, "args": sig.args, "kwargs": sig.kwargs,
             "options": {**sig.options, **options}}
    parse_schedule(schedule, f"periodic task {key!r}")  # fail now, not in beat
    _periodic.setdefault(app, {})[key] = entry
    return key


def periodic_tasks(app: App) -> dict[str, dict[str, Any]]:
    """The entries added with add_periodic_task."""
    return dict(_periodic.get(app, {}))


# -- entries --------------------------------------------------------------------------------


@dataclass
class Entry:
    name: str
    task: str
    schedule: BaseSchedule
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    last_run: dt.datetime | None = None
    total_run_count: int = 0
    #: when beat first saw the entry: what the schedule counts from until its first run
    #: (not shown as a last run: it never ran)
    since: dt.datetime | None = None

    def is_due(self, now: dt.datetime, tz: dt.tzinfo) -> tuple[bool, float]:
        return self.schedule.is_due(self.last_run or self.since or now, now, tz)

    def next_run(self, now: dt.datetime, tz: dt.tzinfo) -> dt.datetime:
        return self.schedule.next_run(self.last_run or self.since or now, tz)

    def as_dict(self, now: dt.datetime, tz: dt.tzinfo) -> dict[str, Any]:
        nxt = self.next_run(now, tz)
        return {"name": self.name, "task": self.task, "schedule": self.schedule.human(),
                "args": self.args, "kwargs": self.kwargs, "options": self.options,
                "last_run": self.last_run.astimezone(tz).isoformat() if self.last_run else None,
                "next_run": max(nxt, now).astimezone(tz).isoformat(),
                "due_in": max(0.0, (nxt - now).total_seconds()),
                "total_run_count": self.total_run_count}


def make_entry(name: str, spec: Any) -> Entry:
    """An Entry from one ``beat_schedule`` item; ConfigError names what is wrong."""
    where = f"beat_schedule entry {name!r}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where} must be a mapping with 'task' and 'schedule'")
    unknown = set(spec) - ENTRY_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                          f"use {', '.join(sorted(ENTRY_KEYS - {'relative'}))}")
    task = spec.get("task")
    if not isinstance(task, str) or not task:
        raise ConfigError(f"{where} has no 'task' (the task's name)")
    if "schedule" not in spec:
        raise ConfigError(f"{where} has no 'schedule'")
    schedule = parse_schedule(spec["schedule"], where)
    args = spec.get("args") or []
    if isinstance(args, (str, bytes)) or not isinstance(args, (list, tuple)):
        raise ConfigError(f"{where}: 'args' must be a list, not {args!r}")
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"{where}: 'kwargs' must be a mapping, not {kwargs!r}")
    return Entry(name=name, task=task, schedule=schedule, args=list(args),
                 kwargs=dict(kwargs), options=_send_options(where, spec.get("options") or {}))


def _send_options(where: str, options: Any) -> dict[str, Any]:
    if not isinstance(options, Mapping):
        raise ConfigError(f"{where}: 'options' must be a mapping, not {options!r}")
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key in ENTRY_OPTIONS:
            out[key] = value
        elif key == "routing_key":
            out.setdefault("queue", value)  # a direct route: the queue's name
        elif key in ("exchange", "exchange_type", "serializer", "headers"):
            log.warning("%s: option %r is not supported by qops; ignored", where, key)
        else:
            raise ConfigError(f"{where}: unknown option {key!r}; use "
                              f"{', '.join(sorted(ENTRY_OPTIONS))}")
    for key, kind in (("priority", int), ("countdown", float), ("time_limit", float),
                      ("soft_time_limit", float), ("expires", float)):
        value = out.get(key)
        if value is None or (key == "expires" and isinstance(value, dt.datetime)):
            continue
        try:
            if isinstance(value, bool):
                raise ValueError
            out[key] = kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {key} {value!r} is not a number"
                              + (" of seconds or a datetime" if key == "expires" else "")) \
                from None
    return out


def collect_entries(app: App) -> dict[str, Entry]:
    """Every periodic task of the app: ``beat_schedule`` then ``add_periodic_task``."""
    fire_app_hooks(app)
    specs: dict[str, Any] = {}
    configured = app.conf.beat_schedule or {}
    if not isinstance(configured, Mapping):
        raise ConfigError("beat_schedule must map entry names to entries")
    specs.update(configured)
    specs.update(periodic_tasks(app))
    return {name: make_entry(str(name), spec) for name, spec in specs.items()}


# -- the schedule file ----------------------------------------------------------------------


class ScheduleFile:
    """Last-run times, kept in a JSON file replaced atomically (write, fsync, rename)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, dict[str, Any]]:
        """name -> {"last_run": aware datetime or None, "since": the same, "total_run_count":
        int}; {} when absent."""
        try:
            content = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(f"cannot read the schedule file {self.path}: "
                              f"{exc.strerror}") from None
        try:
            data = json.loads(content)  # (not UTF-8, e.g. Celery's shelve: a ValueError too)
            if data.get("format") != STATE_FORMAT:
                raise ValueError("not a qops schedule file")
            raw = data["entries"]
            out: dict[str, dict[str, Any]] = {}
            for name, item in raw.items():
                last, since = item.get("last_run"), item.get("since")
                out[name] = {
                    "last_run": dt.datetime.fromisoformat(last) if last else None,
                    "since": dt.datetime.fromisoformat(since) if since else None,
                    "total_run_count": int(item.get("total_run_count") or 0)}
            return out
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("the schedule file %s cannot be read (%s): starting with no "
                        "last-run times; it will be replaced", self.path, exc)
            return {}

    def save(self, entries: Mapping[str, Entry]) -> None:
        data = {"format": STATE_FORMAT, "version": STATE_VERSION,
                "saved": utcnow().isoformat(),
                "entries": {name: {"last_run": e.last_run.isoformat() if e.last_run else None,
                                   "since": e.since.isoformat() if e.since else None,
                                   "total_run_count": e.total_run_count, "task": e.task,
                                   "schedule": e.schedule.human()}
                            for name, e in sorted(entries.items())}}
        directory = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=str(directory))
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


# -- beat -------------------------------------------------------------------------------------


class Beat:
    """Sends each entry's task when it is due. ``run()`` loops; ``tick()`` is one pass."""

    def __init__(self, app: App, *, schedule_file: str | os.PathLike[str] | None = None,
                 max_interval: float | None = None, lock_ttl: float | None = None,
                 lock_name: str | None = None, use_lock: bool = True,
                 now: Callable[[], dt.datetime] | None = None) -> None:
        self.app = app
        schedule_file = file_name(schedule_file, "the schedule file (-s)")
        self.schedule_file = ScheduleFile(schedule_file or app.conf.beat_schedule_filename)
        self.max_interval = float(max_interval or DEFAULT_MAX_INTERVAL)
        if self.max_interval <= 0:
            raise UsageError("--max-interval must be positive")
        low, high = LOCK_TTL_BOUNDS
        self.lock_ttl = float(lock_ttl or min(high, max(low, LOCK_TTL_FACTOR * self.max_interval)))
        self.lock_name = lock_name or f"beat.{app.main}"
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.use_lock = use_lock
        self.now: Callable[[], dt.datetime] = now or utcnow
        self.tz = get_tz(app.conf.timezone)
        self.entries: dict[str, Entry] = {}
        self.holding = False  # the lock (always True-ish when locks are off)
        self.sent = 0
        self._ready = False
        self._standby_logged = False
        self._stop = threading.Event()
        self._parent_pid: int | None = None

    # -- set-up ---------------------------------------------------------------------
    def setup(self, *, check_writable: bool = True) -> None:
        """Read the entries and the schedule file. Entries the file does not know are
        new: their first run is one period (or the next crontab time) from now."""
        self.entries = collect_entries(self.app)
        state = self.schedule_file.load()
        now = self.now()
        for name, entry in self.entries.items():
            saved = state.get(name)
            if saved and saved["last_run"] is not None:
                entry.last_run = saved["last_run"]
                entry.total_run_count = saved["total_run_count"]
            else:
                entry.since = (saved or {}).get("since") or now
        if check_writable:
            try:
                self.schedule_file.save(self.entries)
            except OSError as exc:
                raise ConfigError(f"cannot write the schedule file {self.schedule_file.path}: "
                                  f"{exc.strerror or exc}; choose another with -s "
                                  "/path/to/schedule") from None
        self._ready = True

    def table(self) -> list[dict[str, Any]]:
        """Each entry with its schedule and next run time, soonest first."""
        now = self.now()
        rows = [e.as_dict(now, self.tz) for e in self.entries.values()]
        return sorted(rows, key=lambda r: (r["due_in"], r["name"]))

    # -- one pass -------------------------------------------------------------------
    def tick(self) -> float:
        """Send every entry that is due; return the seconds until the next one."""
        now = self.now()
        wait = self.max_interval
        changed = False
        for entry in sorted(self.entries.values(), key=lambda e: e.name):
            due, next_check = entry.is_due(now, self.tz)
            if due:
                if self.send(entry):
                    entry.last_run = now
                    entry.total_run_count += 1
                    changed = True
                    due, next_check = entry.is_due(now, self.tz)
                else:
                    next_check = SEND_RETRY
            wait = min(wait, next_check)
        if changed:
            self.save()
        return max(0.0, wait)

    def send(self, entry: Entry) -> bool:
        log.info("Scheduler: Sending due task %s (%s)", entry.name, entry.task)
        try:
            # reply_to "": nobody waits for these results, so never open an rpc:// reply
            # queue for them
            res = self.app.send_task(entry.task, entry.args, entry.kwargs, reply_to="",
                                     **entry.options)
        except Exception as exc:
            log.error("beat: could not send %s (%s): %s; trying again in %.0fs",
                      entry.name, entry.task, exc, SEND_RETRY)
            return False
        self.sent += 1
        log.debug("beat: %s sent as %s", entry.name, res.id)
        return True

    def shadow(self, cutoff: dt.datetime) -> None:
        """As a standby: take every run due by ``cutoff`` as sent by the holder."""
        for entry in self.entries.values():
            due, _ = entry.is_due(cutoff, self.tz)
            if due and (entry.last_run is None or entry.last_run < cutoff):
                entry.last_run = cutoff

    def save(self) -> None:
        try:
            self.schedule_file.save(self.entries)
        except OSError as exc:
            log.error("beat: cannot write the schedule file %s: %s", self.schedule_file.path,
                      exc)

    def merge_file(self) -> None:
        """On taking the lock: the file may be newer than us (a holder on this host)."""
        for name, saved in self.schedule_file.load().items():
            entry = self.entries.get(name)
            last = saved["last_run"]
            if entry is not None and last is not None and (
                    entry.last_run is None or last > entry.last_run):
                entry.last_run = last
                entry.total_run_count = max(entry.total_run_count, saved["total_run_count"])

    # -- the lock -------------------------------------------------------------------
    def acquire(self) -> bool | None:
        """True: we hold the lock (or locks are off); False: someone else does; None:
        the broker could not be asked."""
        if not self.use_lock:
            return True
        try:
            return bool(self.app.transport.acquire_lock(self.lock_name, self.owner,
                                                        self.lock_ttl))
        except NotImplementedError as exc:
            log.warning("beat: %s; running without a lock: make sure only one beat runs",
                        exc)
            self.use_lock = False
            return True
        except Exception as exc:
            log.error("beat: cannot reach the broker for the lock %r: %s", self.lock_name, exc)
            return None

    def release(self) -> None:
        if not (self.use_lock and self.holding):
            return
        try:
            self.app.transport.release_lock(self.lock_name, self.owner)
        except Exception as exc:
            log.warning("beat: could not release the lock %r: %s", self.lock_name, exc)

    def step(self) -> float:
        """One turn of the loop: lock, then tick. Returns how long to sleep."""
        held = self.acquire()
        if held is None:
            if self.holding:
                log.warning("beat: lost contact with the broker: not sending until the lock "
                            "is renewed")
            self.holding = False
            return STANDBY_INTERVAL
        if not held:
            # The holder renewed the lock less than lock_ttl ago and had sent everything
            # due then; so every run due before now - ttl is done.
            self.shadow(self.now() - dt.timedelta(seconds=self.lock_ttl))
            if self.holding:
                log.warning("beat: another beat took the lock %r: now standby",
                            self.lock_name)
                self.holding = False
            elif not self._standby_logged:
                log.warning("beat: standby: another beat holds the lock %r; taking over if it "
                            "stops (checking every %.0fs)", self.lock_name, STANDBY_INTERVAL)
            self._standby_logged = True
            return min(STANDBY_INTERVAL, self.lock_ttl / 3)
        if not self.holding:
            self.holding = True
            if self.use_lock:
                log.info("beat: holding the lock %r (ttl %.0fs): sending", self.lock_name,
                         self.lock_ttl)
                self.merge_file()
        wait = self.tick()
        if self.use_lock:
            wait = min(wait, self.lock_ttl / 3)
        return wait

    # -- the loop -------------------------------------------------------------------
    def run(self, *, parent_pid: int | None = None) -> None:
        """Loop until stop() (or until ``parent_pid`` is gone, for ``worker -B``)."""
        if not self._ready:
            self.setup()
        self._parent_pid = parent_pid
        log.info("beat: starting with %d entr%s, schedule file %s", len(self.entries),
                 "y" if len(self.entries) == 1 else "ies", self.schedule_file.path)
        try:
            while not self._stop.is_set():
                if parent_pid is not None and os.getppid() != parent_pid:
                    log.warning("beat: the worker that started this beat is gone: stopping")
                    break
                try:
                    wait = self.step()
                except Exception:
                    log.exception("beat: unexpected error; going on in %.0fs", self.max_interval)
                    wait = self.max_interval
                self._stop.wait(max(wait, 0.01))
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        if self.holding or not self.use_lock:
            self.save()
        self.release()
        self.holding = False
        log.info("beat: stopped (%d task(s) sent)", self.sent)


# -- worker -B ----------------------------------------------------------------------------------


class EmbeddedBeat:
    """Beat in a child process of the worker (``worker -B``), as Celery does it: for
    development; run ``qops beat`` as its own service in production.

    ``start()`` forks (call it before the worker starts its threads); the child runs
    beat until TERM or until its parent is gone. ``stop()`` ends it."""

    def __init__(self, app: App, **options: Any) -> None:
        self.app = app
        self.options = options
        self.pid: int | None = None

    def start(self) -> EmbeddedBeat:
        log.warning("worker -B runs beat inside the worker: fine for development; in "
                    "production run `qops beat` as its own service (one per schedule)")
        beat = Beat(self.app, **self.options)
        beat.setup()  # bad entries fail here, in the worker's own start-up
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child
            code = 0
            try:
                signal.signal(signal.SIGTERM, lambda *_: beat.stop())
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker handles Ctrl-C
                beat.run(parent_pid=parent)
            except BaseException as exc:  # noqa: BLE001 - the child must never return
                log.error("beat: %s", exc)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        self.pid = pid
        return self

    def stop(self, timeout: float = 10.0) -> None:
        pid, self.pid = self.pid, None
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done:
                return
            time.sleep(0.05)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
