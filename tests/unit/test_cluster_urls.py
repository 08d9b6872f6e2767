"""A RabbitMQ cluster as a broker URL list: ``amqp://h1;amqp://h2`` or a YAML list, the
checks made on it, the failover strategy, and a connection that moves to the next node
when one is down (real sockets: a closed port of 127.0.0.1 refuses at once)."""

from __future__ import annotations

import socket
from collections import Counter

import pytest

from qops import App
from qops.errors import BrokerUnreachable, ConfigError, UsageError
from qops.transports.base import TransportOptions, transport_class
from qops.transports.failover import NodeOrder
from qops.transports.urls import mask_password


def test_a_url_list_is_one_node_each() -> None:
    from qops.transports.amqp import AMQPTransport

    t = AMQPTransport("amqp://u:p1@h1:5673/v;amqp://u:p2@h2/v?heartbeat=10")
    assert [(n.host, n.port, n.password) for n in t.nodes] == [("h1", 5673, "p1"),
                                                                  ("h2", 5672, "p2")]
    assert t.params is t.nodes[0] and t.nodes[1].heartbeat == 10
    assert t.safe_url() == "amqp://u:**@h1:5673/v;amqp://u:**@h2/v?heartbeat=10"
    t.close()


@pytest.mark.parametrize(("url", "says"), [
    ("amqp://h1;", "an empty entry"),
    ("amqp://h1;amqp://h2:x", "bad port"),
    ("amqp://h1/a;amqp://h2/b", "different vhosts"),
    ("amqp://h1?dead_letter_queue=a;amqp://h2", "different dead_letter_queue"),
    ("amqp://h1;redis://h2", "not an AMQP URL"),
])
def test_bad_url_lists_are_one_line_usage_errors(url: str, says: str) -> None:
    with pytest.raises(UsageError) as info:
        transport_class(url)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_broker_url_as_a_yaml_list(tmp_path) -> None:
    cfg = tmp_path / "qops.yaml"
    cfg.write_text("broker_url:\n  - amqp://u:s1@h1//\n  - amqp://u:s2@h2//\n"
                   "broker_failover_strategy: shuffle\n")
    app = App("t")
    app.conf.load_yaml(cfg)
    assert app.broker_url == "amqp://u:s1@h1//;amqp://u:s2@h2//"
    assert app.transport_options().failover_strategy == "shuffle"
    assert "s1" not in mask_password(app.broker_url)
    with pytest.raises(ConfigError):
        App("t").conf.set("broker_url", [], layer="cli")
    with pytest.raises(ConfigError) as info:
        App("t").conf.set("broker_failover_strategy", "random", layer="cli")
    assert "'round-robin' or 'shuffle'" in str(info.value)


def test_round_robin_stays_on_the_node_that_answered_shuffle_spreads() -> None:
    rr = NodeOrder(3)
    assert rr.order() == [0, 1, 2]
    rr.reached(1)
    assert rr.order() == [1, 2, 0]
    firsts = Counter(NodeOrder(3, "shuffle").order()[0] for _ in range(300))
    assert set(firsts) == {0, 1, 2}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connecting_skips_nodes_that_are_down() -> None:
    from qops.transports.amqp import AMQPTransport
    from tests.conftest import AMQP_HOST, AMQP_PORT, require_service

    require_service("amqp", AMQP_HOST, AMQP_PORT)
    down = _closed_port()
    t = AMQPTransport(f"amqp://guest:guest@127.0.0.1:{down}//;"
                      f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}//")
    try:
        conn = t.connect("test")
        assert conn.is_open
        conn.close()
        assert t._order.order()[0] == 1  # round-robin: the next connection goes there first
    finally:
        t.close()
    both_down = AMQPTransport(f"amqp://guest:secret@127.0.0.1:{down}//;"
                              f"amqp://guest:secret@127.0.0.1:{_closed_port()}//",
                              TransportOptions(connect_timeout=2))
    with pytest.raises(BrokerUnreachable) as info:
        both_down.connect("test")
    text = str(info.value)
    assert "any node of the cluster" in text and f"127.0.0.1:{down}:" in text
    assert "secret" not in text
