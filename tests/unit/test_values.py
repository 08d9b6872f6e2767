"""The checkers shared by the remote-control client, the worker and the settings."""

from __future__ import annotations

from typing import Any

import pytest

from qops.errors import UsageError
from qops.rates import parse_rate
from qops.values import (
    check_arguments,
    expired,
    queue_name,
    signal_name,
    target,
    time_limits,
)


def test_time_limits() -> None:
    assert time_limits(10, 20) == (10.0, 20.0)
    assert time_limits("1.5", None) == (1.5, None)
    assert time_limits(None, None) == (None, None)
    for soft, hard in [(-1, None), (0, None), (None, 0), (10, 5), (5, 5),
                       (float("nan"), None), (float("inf"), None), (None, 1e12),
                       (True, None), ("x", None), ([1], None)]:
        with pytest.raises(UsageError):
            time_limits(soft, hard)


@pytest.mark.parametrize("rate", [-1, -0.5, "-1", float("nan"), float("inf"), True,
                                  "10/x", [10], {"r": 1}, "9" * 400])
def test_bad_rates(rate: Any) -> None:
    with pytest.raises(UsageError, match="invalid rate limit"):
        parse_rate(rate)


def test_good_rates() -> None:
    assert parse_rate("10/m") == pytest.approx(1 / 6)
    assert parse_rate("0") == parse_rate("0/h") == parse_rate(0) == parse_rate(None) == 0


def test_signal_names() -> None:
    assert signal_name("TERM") == signal_name("sigterm") == signal_name(15) == "SIGTERM"
    assert signal_name("9") == "SIGKILL"
    for bad in ("FOO", "SIG_IGN", "", 0, 9999, None, True, 1.5):
        with pytest.raises(UsageError):
            signal_name(bad)


def test_queue_names() -> None:
    assert queue_name("celery") == "celery" and queue_name("a.b-c:d") == "a.b-c:d"
    for bad in ("", " ", "a b", "a,b", "a\nb", "amq.gen", "x" * 256, None, 5, ["q"]):
        with pytest.raises(UsageError):
            queue_name(bad)


def test_expires_header() -> None:
    assert expired(None, 100.0) is False
    assert expired(0, 100.0) is False  # kombu's "never expires"
    assert expired(99.5, 100.0) is True
    assert expired(101, 100.0) is False
    for bad in ("soon", [1], {}, True, float("nan")):
        with pytest.raises(UsageError):
            expired(bad, 100.0)


def test_target_exact_names_and_patterns() -> None:
    names, test = target("w1@h", None, None)
    assert names == ["w1@h"] and test is None  # a string is one name, not a substring
    names, test = target(None, "w*@h", None)
    assert names is None and test is not None and test("w11@h") and not test("x@h")
    _, test = target(None, r"^w\d@", "pcre")
    assert test is not None and test("w1@h") and not test("w11@h")
    for dest, pattern, matcher in [(5, None, None), ([1], None, None), (None, "(", "pcre"),
                                   (None, "*", "regex"), (None, ["x"], None)]:
        with pytest.raises(UsageError):
            target(dest, pattern, matcher)


@pytest.mark.parametrize("method, arguments, says", [
    ("time_limit", {"task_name": "t", "soft": -1}, "greater than 0"),
    ("time_limit", {"task_name": "t", "soft": 10, "hard": 5}, "less than"),
    ("time_limit", {"soft": 10}, "task name"),
    ("rate_limit", {"task_name": "t", "rate_limit": "-1/s"}, "invalid rate"),
    ("rate_limit", {"task_name": "t"}, "needs a rate_limit"),
    ("pool_grow", {"n": 0}, "at least 1"),
    ("pool_shrink", {"n": "two"}, "whole number"),
    ("pool_grow", {"n": 2000}, "at most 1024"),
    ("autoscale", {"max": 2, "min": 3}, "at least min"),
    ("autoscale", {"max": 2, "min": -1}, "at least 0"),
    ("add_consumer", {"queue": ""}, "queue name"),
    ("cancel_consumer", {"queue": "amq.q"}, "reserved"),
    ("revoke", {"task_id": "x", "terminate": True, "signal": "NOPE"}, "unknown signal"),
    ("revoke", {"task_id": 5}, "task id"),
    ("revoke", {"task_id": "x", "terminate": "yes"}, "true or false"),
    ("query_task", {"ids": [1]}, "ids"),
    ("ping", [1, 2], "must be an object"),
])
def test_bad_arguments_name_the_command(method: str, arguments: Any, says: str) -> None:
    with pytest.raises(UsageError, match=f"^{method}: .*{says}"):
        check_arguments(method, arguments)


def test_good_arguments_come_out_in_one_form() -> None:
    assert check_arguments("time_limit", {"task_name": "t", "soft": "10"}) == \
        {"task_name": "t", "soft": 10.0, "hard": None}
    assert check_arguments("revoke", {"task_id": ["a"], "signal": "kill"}) == \
        {"task_id": ["a"], "terminate": False, "signal": "SIGKILL"}
    # what Celery's clients add is passed on
    assert check_arguments("add_consumer", {"queue": "q", "exchange": "q"}) == \
        {"queue": "q", "exchange": "q"}
    assert check_arguments("pool_grow", {}) == {"n": 1}
    assert check_arguments("no_such_command", None) == {}


def test_task_options_are_checked_at_definition() -> None:
    from qops import App

    app = App("v", broker="memory://")
    for options in ({"time_limit": -1}, {"soft_time_limit": 0},
                    {"soft_time_limit": 10, "time_limit": 5}, {"rate_limit": "-3/s"}):
        with pytest.raises(UsageError, match="task v.bad: "):
            app.task(name="v.bad", **options)(lambda: None)
    assert "v.bad" not in app.tasks
    app.task(name="v.good", soft_time_limit=0.5, time_limit=1, rate_limit="5/m")(lambda: None)


@pytest.mark.parametrize("timelimit, ok", [([None, None], (None, None)), ([0, 0], (None, None)),
                                           ([10, 5], (10.0, 5.0)), ([-1, None], None),
                                           ([None, "nan"], None), ([1e300, None], None)])
def test_message_time_limits(timelimit: list[Any], ok: Any) -> None:
    from qops import protocol
    from qops.errors import ProtocolError

    m = protocol.build_task_message("t", [], {})
    m.headers["timelimit"] = timelimit
    if ok is None:
        with pytest.raises(ProtocolError, match="invalid time limit"):
            protocol.parse_task_message(m)
    else:
        req = protocol.parse_task_message(m)
        assert (req.time_limit, req.soft_time_limit) == ok
