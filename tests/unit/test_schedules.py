"""crontab parsing and next-run tables (DST included), interval schedules, is_due."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from qops.errors import ConfigError
from qops.schedules import crontab, get_tz, interval, parse_schedule

UTC = dt.timezone.utc
PARIS = ZoneInfo("Europe/Paris")


def table(c: crontab, start: dt.datetime, n: int, tz: str = "UTC") -> list[str]:
    out, t = [], start
    for _ in range(n):
        t = c.next_run(t, tz)
        out.append(t.isoformat())
    return out


# -- parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "text", "expected"), [
    ("minute", "*/15", {0, 15, 30, 45}),
    ("minute", "5/15", {5, 20, 35, 50}),
    ("minute", "0-30/10", {0, 10, 20, 30}),
    ("minute", "1,2,5", {1, 2, 5}),
    ("minute", "0,30", {0, 30}),
    ("hour", "9-17", set(range(9, 18))),
    ("hour", "22-2", {22, 23, 0, 1, 2}),
    ("hour", "*", set(range(24))),
    ("day_of_week", "mon-fri", {1, 2, 3, 4, 5}),
    ("day_of_week", "1-5", {1, 2, 3, 4, 5}),
    ("day_of_week", "sat,sun", {0, 6}),
    ("day_of_week", "fri-mon", {5, 6, 0, 1}),
    ("day_of_week", "7", {0}),
    ("day_of_week", "1-7", set(range(7))),
    ("day_of_week", "0-7", set(range(7))),
    ("day_of_week", "Monday", {1}),
    ("day_of_week", "*/2", {0, 2, 4, 6}),
    ("day_of_month", "1,15", {1, 15}),
    ("day_of_month", "*/10", {1, 11, 21, 31}),
    ("month_of_year", "jan-mar", {1, 2, 3}),
    ("month_of_year", "*/3", {1, 4, 7, 10}),
])
def test_field_syntax(field: str, text: str, expected: set[int]) -> None:
    assert getattr(crontab(**{field: text}), field) == expected


def test_python_values() -> None:
    c = crontab(minute=[0, 30], hour=range(9, 12), day_of_week=1)
    assert c.minute == {0, 30} and c.hour == {9, 10, 11} and c.day_of_week == {1}
    assert crontab(hour=7, minute=30, day_of_week=1) == crontab.from_string("30 7 * * 1")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"minute": "61"}, "crontab minute='61': 61 is out of range 0-59"),
    ({"hour": "24"}, "crontab hour='24': 24 is out of range 0-23"),
    ({"minute": "*/0"}, "crontab minute='*/0': step '0' must be a positive number"),
    ({"minute": "*/x"}, "crontab minute='*/x'"),
    ({"day_of_week": "funday"}, "crontab day_of_week='funday': 'funday' is not a number"),
    ({"month_of_year": "13"}, "crontab month_of_year='13': 13 is out of range 1-12"),
    ({"day_of_month": "0"}, "crontab day_of_month='0': 0 is out of range 1-31"),
    ({"minute": ""}, "crontab minute='': empty"),
    ({"hour": "1-2-3"}, "crontab hour='1-2-3'"),
    ({"minute": True}, "crontab minute=True"),
    ({"day_of_month": 30, "month_of_year": 2}, "no such day ever comes"),
])
def test_bad_fields_name_the_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        crontab(**kwargs)
    assert message in str(err.value)


def test_cron_string() -> None:
    c = crontab.from_string("*/15 9-17 * * mon-fri")
    assert c.minute == {0, 15, 30, 45} and c.hour == set(range(9, 18))
    assert c.day_of_week == {1, 2, 3, 4, 5}
    assert repr(c) == "<crontab: */15 9-17 * * mon-fri (m/h/dM/MY/d)>"
    with pytest.raises(ConfigError, match="must have 5 fields"):
        crontab.from_string("* * *")


def test_parse_schedule_from_config() -> None:
    assert parse_schedule(30) == interval(30)
    assert parse_schedule(2.5) == interval(dt.timedelta(seconds=2.5))
    assert parse_schedule("10") == interval(10)
    assert parse_schedule(dt.timedelta(minutes=5)) == interval(300)
    assert parse_schedule("*/15 * * * *") == crontab(minute="*/15")
    assert parse_schedule({"minute": 30, "hour": 7, "day_of_week": 1}) == \
        crontab(minute=30, hour=7, day_of_week=1)
    with pytest.raises(ConfigError, match="entry 'x': unknown crontab field"):
        parse_schedule({"minutes": 1}, "entry 'x'")
    with pytest.raises(ConfigError, match="entry 'x': crontab hour='25'"):
        parse_schedule("0 25 * * *", "entry 'x'")
    with pytest.raises(ConfigError, match="is not a schedule"):
        parse_schedule(None)
    with pytest.raises(ConfigError, match="must be positive"):
        parse_schedule(0)


def test_celery_objects_are_read_by_their_attributes() -> None:
    class CeleryCrontab:
        _orig_minute, _orig_hour, _orig_day_of_week = "30", "7", "1"
        _orig_day_of_month, _orig_month_of_year = "*", "*"

    class CelerySchedule:
        run_every = dt.timedelta(seconds=10)

    assert parse_schedule(CeleryCrontab()) == crontab(minute=30, hour=7, day_of_week=1)
    assert parse_schedule(CelerySchedule()) == interval(10)


def test_timezone_names() -> None:
    assert get_tz("UTC") is UTC
    assert get_tz("Europe/Paris") == PARIS
    with pytest.raises(ConfigError, match="not a known time zone"):
        get_tz("Mars/Olympus")


# -- next-run tables --------------------------------------------------------------------


def test_seed_example_monday_morning() -> None:
    """crontab(hour=7, minute=30, day_of_week=1): Mondays at 07:30."""
    c = crontab(hour=7, minute=30, day_of_week=1)
    start = dt.datetime(2024, 1, 3, 12, 0, tzinfo=UTC)  # a Wednesday
    assert table(c, start, 3) == ["2024-01-08T07:30:00+00:00", "2024-01-15T07:30:00+00:00",
                                  "2024-01-22T07:30:00+00:00"]


def test_every_fifteen_minutes_and_strictly_after() -> None:
    c = crontab(minute="*/15")
    start = dt.datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    assert table(c, start, 5) == [f"2024-05-01T{t}:00+00:00"
                                  for t in ("10:15", "10:30", "10:45", "11:00", "11:15")]
    # seconds past a match: the next one, not the same minute again
    assert c.next_run(dt.datetime(2024, 5, 1, 10, 15, 30, tzinfo=UTC)).minute == 30


def test_weekdays_business_hours() -> None:
    c = crontab(minute=0, hour="9-17/4", day_of_week="mon-fri")
    start = dt.datetime(2024, 5, 3, 14, 0, tzinfo=UTC)  # Friday
    assert table(c, start, 4) == ["2024-05-03T17:00:00+00:00", "2024-05-06T09:00:00+00:00",
                                  "2024-05-06T13:00:00+00:00", "2024-05-06T17:00:00+00:00"]


def test_day_of_month_and_week_must_both_match() -> None:
    """Celery's rule (cron would fire on either): Friday the 13th."""
    c = crontab(minute=0, hour=0, day_of_month=13, day_of_week="fri")
    start = dt.datetime(2024, 1, 1, tzinfo=UTC)
    assert table(c, start, 2) == ["2024-09-13T00:00:00+00:00", "2024-12-13T00:00:00+00:00"]


def test_leap_day() -> None:
    c = crontab(minute=0, hour=12, day_of_month=29, month_of_year=2)
    assert table(c, dt.datetime(2024, 3, 1, tzinfo=UTC), 1) == ["2028-02-29T12:00:00+00:00"]


def test_local_time_zone() -> None:
    c = crontab(minute=30, hour=7)
    nxt = c.next_run(dt.datetime(2024, 1, 10, 12, 0, tzinfo=UTC), "Europe/Paris")
    assert nxt.isoformat() == "2024-01-11T07:30:00+01:00"
    assert nxt.astimezone(UTC).hour == 6
    # naive "after" is UTC
    assert c.next_run(dt.datetime(2024, 1, 10, 12, 0), "Europe/Paris") == nxt


def test_paris_spring_forward_skips_the_missing_time() -> None:
    """2024-03-31: 02:00 -> 03:00 in Paris; 02:30 does not exist that day."""
    c = crontab(minute=30, hour=2)
    start = dt.datetime(2024, 3, 29, 12, 0, tzinfo=UTC)
    assert table(c, start, 3, "Europe/Paris") == [
        "2024-03-30T02:30:00+01:00", "2024-04-01T02:30:00+02:00", "2024-04-02T02:30:00+02:00"]
    hourly = crontab(minute=0)
    start = dt.datetime(2024, 3, 31, 0, 30, tzinfo=UTC)  # 01:30 CET
    runs = table(hourly, start, 3, "Europe/Paris")
    assert runs == ["2024-03-31T03:00:00+02:00", "2024-03-31T04:00:00+02:00",
                    "2024-03-31T05:00:00+02:00"]
    # 03:00 CEST is 01:00 UTC: only 30 real minutes after the start
    assert dt.datetime.fromisoformat(runs[0]) - start == dt.timedelta(minutes=30)


def test_paris_fall_back_runs_a_repeated_time_once() -> None:
    """2024-10-27: 03:00 -> 02:00 in Paris; 02:00-02:59 happens twice."""
    c = crontab(minute=30, hour=2)
    start = dt.datetime(2024, 10, 26, 12, 0, tzinfo=UTC)
    assert table(c, start, 3, "Europe/Paris") == [
        "2024-10-27T02:30:00+02:00", "2024-10-28T02:30:00+01:00", "2024-10-29T02:30:00+01:00"]
    half_hourly = crontab(minute="*/30")
    start = dt.datetime(2024, 10, 26, 23, 50, tzinfo=UTC)  # 01:50 CEST
    runs = table(half_hourly, start, 5, "Europe/Paris")
    assert runs == ["2024-10-27T02:00:00+02:00", "2024-10-27T02:30:00+02:00",
                    "2024-10-27T03:00:00+01:00", "2024-10-27T03:30:00+01:00",
                    "2024-10-27T04:00:00+01:00"]
    # after the first 02:30 has run, during the second pass over 02:xx, nothing repeats
    second_pass = dt.datetime(2024, 10, 27, 1, 10, tzinfo=UTC)  # 02:10 CET (fold 1)
    assert c.next_run(second_pass, "Europe/Paris").isoformat() == "2024-10-28T02:30:00+01:00"
    assert half_hourly.next_run(second_pass, "Europe/Paris").isoformat() == \
        "2024-10-27T03:00:00+01:00"


def test_is_due_like_celery() -> None:
    c = crontab(minute="*/15")
    last = dt.datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    due, wait = c.is_due(last, dt.datetime(2024, 5, 1, 10, 10, tzinfo=UTC))
    assert not due and wait == 300
    due, wait = c.is_due(last, dt.datetime(2024, 5, 1, 10, 15, 1, tzinfo=UTC))
    assert due and wait == 899


# -- intervals ----------------------------------------------------------------------------


def test_interval_is_due_and_remaining() -> None:
    every = interval(dt.timedelta(seconds=10))
    last = dt.datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)
    assert every.is_due(last, last + dt.timedelta(seconds=4)) == (False, 6.0)
    assert every.is_due(last, last + dt.timedelta(seconds=10)) == (True, 10.0)
    assert every.remaining(last, last + dt.timedelta(seconds=3)) == dt.timedelta(seconds=7)
    assert every.human() == "every 10s" and interval(5400).human() == "every 1h 30m"


def test_missed_runs_fire_once() -> None:
    """Down for ten intervals: due once; after that run, the next is one period later."""
    every = interval(60)
    last = dt.datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    now = last + dt.timedelta(minutes=10, seconds=5)
    due, wait = every.is_due(last, now)
    assert due and wait == 60.0
    # the run is sent and recorded at `now`: nothing more is due until a period later
    assert every.is_due(now, now + dt.timedelta(seconds=1)) == (False, 59.0)
    daily = crontab(minute=30, hour=7)
    last = dt.datetime(2024, 5, 1, 7, 30, tzinfo=UTC)
    now = dt.datetime(2024, 5, 5, 9, 0, tzinfo=UTC)  # four runs missed
    due, _ = daily.is_due(last, now)
    assert due
    assert daily.is_due(now, now + dt.timedelta(minutes=1))[0] is False
