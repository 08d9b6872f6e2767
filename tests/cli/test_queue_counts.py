"""``qops queues`` and ``qops purge`` on RabbitMQ: counts that don't lie.

In flight comes from the management HTTP API (the plugin must be enabled: with CI=true a
missing plugin fails the run, locally its tests skip with one line). Its counts lag by
RabbitMQ's stats interval (5 s), so the tests poll.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import AMQP_HOST, IN_CI
from tests.helpers import run_qops

API = f"http://guest:guest@{AMQP_HOST}:15672/api/"


@pytest.fixture(scope="session")
def management_api(amqp_vhost: str) -> str:
    request = urllib.request.Request(
        f"http://{AMQP_HOST}:15672/api/overview",
        headers={"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()})
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            json.loads(response.read())
    except (OSError, ValueError) as exc:
        msg = (f"RabbitMQ management API not reachable on {AMQP_HOST}:15672 ({exc}); "
               "enable it with: rabbitmq-plugins enable rabbitmq_management")
        if IN_CI:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return API


@pytest.fixture
def rabbit(amqp_url: str) -> Iterator[Any]:
    """A pika channel on the test vhost, and the queues made on it deleted after."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    made: list[str] = []
    ch.made = made  # type: ignore[attr-defined]
    yield ch
    for q in made:
        ch.queue_delete(q)
    conn.close()


def _queue(ch: Any, prefix: str, n: int, **kw: Any) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    ch.queue_declare(name, **({"durable": True} | kw))
    ch.made.append(name)
    for _ in range(n):
        ch.basic_publish("", name, b"[[], {}, {}]")
    return name


def _hold(ch: Any, queue: str, n: int) -> None:
    """Consume ``n`` messages of ``queue`` and keep them unacknowledged."""
    got: list[Any] = []
    ch.basic_qos(prefetch_count=n)
    ch.basic_consume(queue, lambda c, m, p, b: got.append(m), auto_ack=False)
    deadline = time.monotonic() + 10
    while len(got) < n and time.monotonic() < deadline:
        ch.connection.process_data_events(0.1)
    assert len(got) == n


def _json(*args: str) -> tuple[int, Any, str]:
    r = run_qops(*args, "--json")
    return r.returncode, json.loads(r.stdout) if r.stdout.strip() else None, r.stderr


def test_in_flight_and_every_queue_from_the_management_api(
        amqp_url: str, management_api: str, rabbit: Any) -> None:
    held = _queue(rabbit, "held", 20)
    orphan = _queue(rabbit, "orphan", 3)  # nobody configures or consumes it
    _hold(rabbit, held, 16)
    # not work queues: left out of the listing, as on the other brokers
    pidbox = _queue(rabbit, "w1@h.celery", 0, durable=False, auto_delete=True) + ".pidbox"
    rabbit.queue_declare(pidbox, auto_delete=True)
    rabbit.made.append(pidbox)
    exclusive = rabbit.queue_declare("", exclusive=True).method.queue
    deadline = time.monotonic() + 20  # the API's counts lag by the stats interval (5 s)
    while True:
        code, doc, err = _json("-b", amqp_url, "queues")
        assert code == 0, err
        rows = {row["name"]: row for row in doc}
        if rows.get(held, {}).get("in_flight") == 16 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert rows[held] == {"name": held, "ready": 4, "in_flight": 16, "consumers": 1}
    assert rows[orphan] == {"name": orphan, "ready": 3, "in_flight": 0, "consumers": 0}
    assert not {pidbox, exclusive} & set(rows), rows
    assert "qops.nodes" not in rows and "qops.dlq" not in rows
    assert "note" not in err
    r = run_qops("-b", amqp_url, "queues", "--broker-api", management_api)
    assert r.returncode == 0
    assert [ln.split() for ln in r.stdout.splitlines() if ln.startswith(held)] == \
        [[held, "4", "16", "1"]]
    code, doc, err = _json("-b", amqp_url, "purge", "-f")
    assert code == 0, err
    assert doc["queues"][held] == {"purged": 4, "in_flight": 16}
    assert doc["queues"][orphan] == {"purged": 3, "in_flight": 0}


def test_without_the_api_in_flight_is_unknown_and_purge_says_what_it_missed(
        amqp_url: str, rabbit: Any) -> None:
    held = _queue(rabbit, "held", 5)
    orphan = _queue(rabbit, "orphan", 3)
    _hold(rabbit, held, 2)
    code, doc, err = _json("-b", amqp_url, "queues", "-Q", f"{held},{orphan}",
                           "--broker-api", "off")
    assert code == 0, err
    assert {row["name"]: row["in_flight"] for row in doc} == {held: None, orphan: 0}
    r = run_qops("-b", amqp_url, "queues", "-Q", held, "--broker-api", "off")
    assert r.returncode == 0
    assert [ln.split() for ln in r.stdout.splitlines() if ln.startswith(held)] == \
        [[held, "3", "?", "1"]]
    # without -Q: the queues it could not see are named on stderr, one line
    code, doc, err = _json("-b", amqp_url, "purge", "--dry-run", "--broker-api", "off")
    assert code == 0, err
    assert orphan not in doc["queues"]
    [line] = err.strip().splitlines()
    assert "in-flight counts" in line and "only the queues the app configures" in line
    assert "--broker-api" in line


def test_an_unreachable_broker_api_given_is_an_error(amqp_url: str) -> None:
    r = run_qops("-b", amqp_url, "queues", "--broker-api", "http://guest:secret@127.0.0.1:1/api/")
    assert r.returncode == 74
    [line] = r.stderr.strip().splitlines()
    assert "management API at http://guest:**@127.0.0.1:1/api/" in line
    assert "secret" not in line
    r = run_qops("-b", amqp_url, "queues", "--broker-api", "ftp://x")
    assert r.returncode == 2 and "http://user:pass@host:15672/api/" in r.stderr


def test_management_api_url_and_hidden_queues() -> None:
    from qops.transports.amqp import parse_url
    from qops.transports.amqp.management import ManagementAPI, default_api_url, hidden

    url = default_api_url(parse_url("amqp://u%40x:p%2Fw@rabbit.example:5673/v"))
    assert url == "http://u%40x:p%2Fw@rabbit.example:15672/api/"
    assert default_api_url(parse_url("amqps://h//")).startswith("https://guest:guest@h:15671")
    assert ManagementAPI("http://h:15672", timeout=1).base == "http://h:15672/api/"
    assert ManagementAPI("http://h/rabbit/api", timeout=1).base == "http://h/rabbit/api/"
    kw = {"exclusive": False, "auto_delete": False, "dead_letter_queue": "qops.dlq"}
    assert not hidden("celery", **kw)
    assert hidden("qops.dlq", **kw) and hidden("qops.nodes", **kw)
    assert hidden("w1@h.celery.pidbox", **kw) and hidden("amq.gen-x", **kw)
    assert hidden("x", **(kw | {"exclusive": True}))
    assert hidden("x", **(kw | {"auto_delete": True}))
