"""Schedules for periodic tasks: ``crontab`` and ``interval``. Pure functions, no I/O.

Both answer the same two questions, the way Celery's schedules do:

- ``next_run(after, tz)``: the first time strictly after ``after`` when the entry is due;
- ``is_due(last_run, now, tz) -> (due, next_check_seconds)``: is a run due now, given
  the last run, and how long until it is worth looking again.

A run that was missed (beat was down for ten intervals) is due once, not once per missed
interval: ``next_run(last_run)`` is in the past, so the entry is due; after it has been
sent, the last run is *now* and the next one is computed from there.

Crontabs are evaluated in a time zone (the ``timezone`` setting) on the local wall clock,
with daylight saving time handled like this:

- a local time that does not exist (the hour skipped when clocks go forward) is skipped:
  a job at 02:30 does not run on that day;
- a local time that happens twice (the hour repeated when clocks go back) runs once, at
  its first occurrence.

``crontab`` follows Celery's rules: ``day_of_week`` 0 (or 7) is Sunday, names ``mon``..
``sun`` and ``jan``..``dec`` are accepted, and when both ``day_of_month`` and
``day_of_week`` are restricted a day must match *both* (classic cron matches either).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Iterator
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from qops.errors import ConfigError

UTC = dt.timezone.utc

DAY_NAMES = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
MONTH_NAMES = {"jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6, "jul": 7,
               "aug": 8, "sep": 9, "oct": 10, "nov": 11, "dec": 12}

# field -> (lowest, highest, names)
FIELDS: dict[str, tuple[int, int, dict[str, int]]] = {
    "minute": (0, 59, {}),
    "hour": (0, 23, {}),
    "day_of_week": (0, 6, DAY_NAMES),
    "day_of_month": (1, 31, {}),
    "month_of_year": (1, 12, MONTH_NAMES),
}
FULL_NAMES = {"sunday": "sun", "monday": "mon", "tuesday": "tue", "wednesday": "wed",
              "thursday": "thu", "friday": "fri", "saturday": "sat", "january": "jan",
              "february": "feb", "march": "mar", "april": "apr", "june": "jun",
              "july": "jul", "august": "aug", "september": "sep", "october": "oct",
              "november": "nov", "december": "dec"}

#: a crontab string's fields, in cron's order
CRON_ORDER = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
DAYS_IN_MONTH = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31,
                 11: 30, 12: 31}
#: how far next_run() looks ahead: 29 years covers Feb 29 falling on a given weekday
SEARCH_DAYS = 366 * 29

_PART = re.compile(r"^(?P<range>\*|[a-z0-9]+(?:-[a-z0-9]+)?)(?:/(?P<step>[^/]*))?$")


def get_tz(name: str | dt.tzinfo | None) -> dt.tzinfo:
    """The tzinfo for a ``timezone`` setting (None and "UTC" give UTC)."""
    if name is None:
        return UTC
    if isinstance(name, dt.tzinfo):
        return name
    text = str(name).strip()
    if text.upper() in ("UTC", "Z", "ETC/UTC", "GMT"):
        return UTC
    try:
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"timezone {text!r} is not a known time zone: use an IANA name "
                          "such as 'Europe/Paris' or 'UTC'") from None


def aware(value: dt.datetime) -> dt.datetime:
    """A datetime with a time zone (naive ones are taken as UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def utcnow() -> dt.datetime:
    return dt.datetime.now(UTC)


class BaseSchedule:
    """What beat needs from a schedule."""

    def next_run(self, after: dt.datetime, tz: dt.tzinfo | str | None = None) -> dt.datetime:
        raise NotImplementedError

    def is_due(self, last_run: dt.datetime, now: dt.datetime | None = None,
               tz: dt.tzinfo | str | None = None) -> tuple[bool, float]:
        """(due now, seconds until the next check), as Celery's ``is_due``."""
        now = aware(now or utcnow())
        nxt = self.next_run(aware(last_run), tz)
        if nxt <= now:
            return True, max(0.0, (self.next_run(now, tz) - now).total_seconds())
        return False, (nxt - now).total_seconds()

    def remaining(self, last_run: dt.datetime, now: dt.datetime | None = None,
                  tz: dt.tzinfo | str | None = None) -> dt.timedelta:
        """Time left until the run after ``last_run`` (negative when overdue)."""
        now = aware(now or utcnow())
        return self.next_run(aware(last_run), tz) - now

    def human(self) -> str:
        return repr(self)


class interval(BaseSchedule):  # noqa: N801 - reads like Celery's schedule names
    """Every ``run_every`` (a timedelta or a number of seconds), counted from the last run."""

    def __init__(self, run_every: dt.timedelta | float) -> None:
        if isinstance(run_every, bool):
            raise ConfigError(f"schedule {run_every!r} is not a number of seconds")
        if isinstance(run_every, dt.timedelta):
            seconds = run_every.total_seconds()
        else:
            try:
                seconds = float(run_every)
            except (TypeError, ValueError):
                raise ConfigError(f"schedule {run_every!r} is not a number of seconds "
                                  "or a timedelta") from None
        if not seconds > 0:
            raise ConfigError(f"schedule every {seconds!r}s: the interval must be positive")
        self.run_every = dt.timedelta(seconds=seconds)

    @property
    def seconds(self) -> float:
        return self.run_every.total_seconds()

    def next_run(self, after: dt.datetime, tz: dt.tzinfo | str | None = None) -> dt.datetime:
        return aware(after) + self.run_every

    def human(self) -> str:
        return f"every {_human_seconds(self.seconds)}"

    def __repr__(self) -> str:
        return f"<interval: {self.human()}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, interval) and other.run_every == self.run_every

    def __hash__(self) -> int:
        return hash(self.run_every)


#: Celery's name for an interval schedule
schedule = interval


def _human_seconds(seconds: float) -> str:
    if seconds < 60 or seconds % 1:
        return f"{seconds:g}s"
    parts = []
    rest = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return " ".join(parts)


class crontab(BaseSchedule):  # noqa: N801 - Celery's name
    """``crontab(minute='*/15')``, ``crontab(hour=7, minute=30, day_of_week=1)``,
    ``crontab(minute=0, hour='9-17', day_of_week='mon-fri')``.

    Each field takes ``*``, a number, a name (``mon``, ``jan``), a range (``1-5``,
    ``fri-mon`` wraps), a step (``*/15``, ``0-30/10``, ``5/15`` = 5-max/15), lists of
    those (``1,15,30``), or Python ints / iterables of ints."""

    def __init__(self, minute: Any = "*", hour: Any = "*", day_of_week: Any = "*",
                 day_of_month: Any = "*", month_of_year: Any = "*") -> None:
        self._orig = {"minute": minute, "hour": hour, "day_of_week": day_of_week,
                      "day_of_month": day_of_month, "month_of_year": month_of_year}
        self.minute = parse_field("minute", minute)
        self.hour = parse_field("hour", hour)
        self.day_of_week = parse_field("day_of_week", day_of_week)
        self.day_of_month = parse_field("day_of_month", day_of_month)
        self.month_of_year = parse_field("month_of_year", month_of_year)
        if not any(d <= DAYS_IN_MONTH[m] for m in self.month_of_year
                   for d in self.day_of_month):
            raise ConfigError(f"crontab day_of_month={day_of_month!r} "
                              f"month_of_year={month_of_year!r}: no such day ever comes")
        self._minutes = sorted(self.minute)
        self._hours = sorted(self.hour)

    @classmethod
    def from_string(cls, text: str) -> crontab:
        """``"*/15 * * * *"``: minute hour day-of-month month day-of-week, as in cron."""
        fields = str(text).split()
        if len(fields) != 5:
            raise ConfigError(f"crontab {text!r} must have 5 fields (minute hour "
                              f"day_of_month month_of_year day_of_week), not {len(fields)}")
        return cls(**dict(zip(CRON_ORDER, fields, strict=True)))

    # -- matching ----------------------------------------------------------------------
    def _day_matches(self, day: dt.date) -> bool:
        return (day.month in self.month_of_year and day.day in self.day_of_month
                and (day.weekday() + 1) % 7 in self.day_of_week)

    def _candidates(self, start: dt.datetime) -> Iterator[dt.datetime]:
        """Matching naive wall-clock times >= ``start`` (naive), in order."""
        day = start.date()
        first = True
        for _ in range(SEARCH_DAYS):
            if self._day_matches(day):
                for h in self._hours:
                    if first and h < start.hour:
                        continue
                    for m in self._minutes:
                        cand = dt.datetime(day.year, day.month, day.day, h, m)
                        if cand >= start:
                            yield cand
            first = False
            day += dt.timedelta(days=1)

    def next_run(self, after: dt.datetime, tz: dt.tzinfo | str | None = None) -> dt.datetime:
        """The first matching local time strictly after ``after``, as an aware datetime
        in ``tz``. Nonexistent local times are skipped; a repeated one counts once."""
        zone = get_tz(tz)
        after_utc = aware(after).astimezone(UTC)
        local = after_utc.astimezone(zone).replace(tzinfo=None, fold=0)
        start = local.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
        for cand in self._candidates(start):
            when = cand.replace(tzinfo=zone)  # fold=0: the first of a repeated time
            if when.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != cand:
                continue  # does not exist (clocks went forward over it)
            if when.astimezone(UTC) <= after_utc:
                continue  # the first occurrence of a repeated time, already past
            return when
        raise ConfigError(f"{self!r} never matches")  # excluded by __init__'s check

    # -- showing -----------------------------------------------------------------------
    def _text(self, name: str) -> str:
        value = self._orig[name]
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
        return ",".join(str(v) for v in sorted(parse_field(name, value)))

    def human(self) -> str:
        """The cron string: ``"30 7 * * 1"`` (minute hour day-of-month month day-of-week)."""
        return " ".join(self._text(f) for f in CRON_ORDER)

    def __repr__(self) -> str:
        return f"<crontab: {self.human()} (m/h/dM/MY/d)>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, crontab) and all(
            getattr(self, f) == getattr(other, f) for f in FIELDS)

    def __hash__(self) -> int:
        return hash(tuple(frozenset(getattr(self, f)) for f in FIELDS))


def parse_field(name: str, value: Any) -> frozenset[int]:
    """The set of values one crontab field stands for. Raises ConfigError naming the field."""
    low, high, names = FIELDS[name]
    if isinstance(value, bool):
        raise ConfigError(f"crontab {name}={value!r}: not a number or a cron expression")
    if isinstance(value, int):
        return frozenset([_check(name, value, low, high, value)])
    if isinstance(value, str):
        return frozenset(_parse_text(name, value))
    if isinstance(value, Iterable):
        out: set[int] = set()
        for item in value:
            out |= parse_field(name, item)
        if not out:
            raise ConfigError(f"crontab {name}={value!r}: empty")
        return frozenset(out)
    raise ConfigError(f"crontab {name}={value!r}: not a number or a cron expression")


def _check(name: str, n: int, low: int, high: int, orig: Any) -> int:
    if name == "day_of_week" and n == 7:
        return 0  # cron's other Sunday
    if not low <= n <= high:
        raise ConfigError(f"crontab {name}={orig!r}: {n} is out of range {low}-{high}")
    return n


def _parse_text(name: str, text: str) -> set[int]:
    low, high, names = FIELDS[name]
    spec = text.strip().lower()
    if not spec:
        raise ConfigError(f"crontab {name}={text!r}: empty")
    out: set[int] = set()

    def number(token: str) -> int:
        if token.isdigit():
            return _check(name, int(token), low, high, text)
        key = FULL_NAMES.get(token, token)
        if key in names:
            return names[key]
        raise ConfigError(f"crontab {name}={text!r}: {token!r} is not a number"
                          + (f" or a name ({', '.join(names)})" if names else ""))

    for part in spec.split(","):
        match = _PART.match(part.strip())
        if not match:
            raise ConfigError(f"crontab {name}={text!r}: cannot read {part!r}")
        rng, step_text = match.group("range"), match.group("step")
        step = 1
        if step_text is not None:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ConfigError(f"crontab {name}={text!r}: step {step_text!r} must be a "
                                  "positive number")
            step = int(step_text)
        if rng == "*":
            values = list(range(low, high + 1))
        elif "-" in rng:
            a_text, b_text = rng.split("-", 1)
            a, b = number(a_text), number(b_text)
            if name == "day_of_week" and b_text.isdigit() and int(b_text) == 7:
                b = 7  # "1-7": Monday to Sunday (taken modulo 7 below)
            if b >= a:
                values = list(range(a, b + 1))
            else:  # wraps around: fri-mon, 22-2
                values = list(range(a, high + 1)) + list(range(low, b + 1))
        else:
            a = number(rng)
            # "5/15" means from 5 to the end in steps of 15, as in cron
            values = list(range(a, high + 1)) if step_text is not None else [a]
        out.update(v % 7 if name == "day_of_week" else v for v in values[::step])
    return out


def parse_schedule(value: Any, where: str = "schedule") -> BaseSchedule:
    """A schedule from configuration: a crontab or interval object, a timedelta, a number
    of seconds, a crontab string (``"*/15 * * * *"``) or a dict of crontab fields
    (``{"minute": 30, "hour": 7}``, as YAML gives it). Celery's own ``crontab`` and
    ``schedule`` objects are read too."""
    if isinstance(value, BaseSchedule):
        return value
    if isinstance(value, dt.timedelta) or (isinstance(value, (int, float))
                                           and not isinstance(value, bool)):
        return _wrap(where, lambda: interval(value))
    if isinstance(value, str):
        text = value.strip()
        try:
            return interval(float(text))
        except (ConfigError, ValueError):
            pass
        return _wrap(where, lambda: crontab.from_string(text))
    if isinstance(value, dict):
        unknown = set(value) - set(FIELDS)
        if unknown:
            raise ConfigError(f"{where}: unknown crontab field(s) {', '.join(sorted(unknown))}; "
                              f"use {', '.join(FIELDS)}")
        return _wrap(where, lambda: crontab(**value))
    celery = _from_celery(value)
    if celery is not None:
        return _wrap(where, lambda: celery)
    raise ConfigError(f"{where}: {value!r} is not a schedule: use a number of seconds, a "
                      "timedelta, crontab(...), a crontab string like '*/15 * * * *' or a "
                      "mapping of crontab fields")


def _from_celery(value: Any) -> BaseSchedule | None:
    """Celery's ``celery.schedules.crontab`` / ``schedule`` objects, by their attributes."""
    if hasattr(value, "_orig_minute"):
        return crontab(minute=value._orig_minute, hour=value._orig_hour,
                       day_of_week=value._orig_day_of_week,
                       day_of_month=value._orig_day_of_month,
                       month_of_year=value._orig_month_of_year)
    run_every = getattr(value, "run_every", None)
    if isinstance(run_every, dt.timedelta):
        return interval(run_every)
    return None


def _wrap(where: str, make: Any) -> BaseSchedule:
    try:
        result: BaseSchedule = make()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return result
