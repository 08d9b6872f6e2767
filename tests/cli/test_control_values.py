"""Bad remote-control values are refused by the client before anything is sent: exit 2,
one line on stderr, and no message on the mailbox channel (a listener there sees
nothing, while it does see a good command)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from qops.transports.base import Transport, from_url
from tests.helpers import run_qops

MAILBOX = "qops.pidbox"  # the bare App's, as the CLI uses it without -A


@pytest.fixture
def listener(request: pytest.FixtureRequest) -> Iterator[tuple[str, Transport, object]]:
    url = str(request.getfixturevalue(getattr(request, "param", "sqlite_url")))
    t = from_url(url)
    sub = t.subscribe(MAILBOX)
    try:
        yield url, t, sub
    finally:
        sub.close()
        t.close()


def sent(sub: object, wait: float) -> list[str]:
    """The methods of the control messages seen on the mailbox channel."""
    out = []
    while (msg := sub.get(wait)) is not None:  # type: ignore[attr-defined]
        out.append(json.loads(msg.body)["method"])
        wait = 0.2
    return out


def refused(url: str, *args: str) -> str:
    r = run_qops("-b", url, "control", "--timeout", "0.3", *args)
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.mark.parametrize("listener", ["sqlite_url", "redis_url", "amqp_url"], indirect=True)
def test_negative_time_limit_exits_2_and_sends_nothing(listener: tuple) -> None:
    url, _, sub = listener
    line = refused(url, "time_limit", "proj.tasks.add", "--", "-1")
    assert "soft time limit must be greater than 0" in line
    assert sent(sub, 1.0) == []
    # the listener does hear a good command
    run_qops("-b", url, "control", "time_limit", "proj.tasks.add", "5", "10",
             "--timeout", "0.3")
    assert sent(sub, 5.0) == ["time_limit"]


@pytest.mark.parametrize("args, says", [
    (("time_limit", "t", "10", "5"), "less than the hard one"),
    (("time_limit", "t", "nan"), "finite"),
    (("rate_limit", "t", "--", "-5"), "invalid rate limit"),
    (("pool_grow", "0"), "at least 1"),
    (("pool_shrink", "5000"), "at most 1024"),
    (("autoscale", "2", "5"), "at least min"),
    (("add_consumer", "amq.x"), "reserved"),
    (("cancel_consumer", "a,b"), "commas"),
    (("revoke", "id1", "--terminate", "--signal", "SIGNOPE"), "unknown signal"),
    (("ping", "--pattern", "(", "--matcher", "pcre"), "invalid pcre pattern"),
])
def test_bad_values_exit_2_and_send_nothing(listener: tuple, args: tuple[str, ...],
                                            says: str) -> None:
    url, _, sub = listener
    assert says in refused(url, *args)
    assert sent(sub, 0.5) == []
