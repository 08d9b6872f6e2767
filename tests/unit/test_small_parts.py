from __future__ import annotations

import os
import time

import pytest

from qops.cli.main import hoist_global_options
from qops.errors import PrivilegeError, UsageError
from qops.ops.nodes import expand, node_name
from qops.ops.privileges import check_root, force_root
from qops.rates import parse_rate
from qops.worker.ratelimit import TokenBucket
from qops.worker.timer import Timer


def test_templates() -> None:
    node = "w1@web.example.com"
    assert expand("%n.pid", node) == "w1.pid"
    assert expand("%h|%d|%p", node) == "web.example.com|example.com|w1@web.example.com"
    assert expand("/var/log/qops/%n%I.log", node) == "/var/log/qops/w1.log"
    assert expand("/var/log/qops/%n%I.log", node, 2) == "/var/log/qops/w1-2.log"
    assert expand("%i 100%%", node, 3) == "3 100%"
    with pytest.raises(UsageError, match="unknown template key %x"):
        expand("%x", node)
    with pytest.raises(UsageError, match="lone"):
        expand("abc%", node)


def test_node_name() -> None:
    assert node_name("w1@example.com") == "w1@example.com"
    assert node_name("w1").startswith("w1@")
    assert node_name(None).startswith("qops@")
    assert "%" not in node_name("w1@%h")


def test_rates() -> None:
    assert parse_rate("10/m") == pytest.approx(10 / 60)
    assert parse_rate("5/s") == 5 and parse_rate("3600/h") == 1 and parse_rate(2) == 2
    assert parse_rate(None) == 0
    with pytest.raises(UsageError, match="10/x"):
        parse_rate("10/x")
    b = TokenBucket(10.0)
    assert b.take() == 0.0
    wait = b.take()
    assert 0 < wait <= 0.1


def test_timer_orders_calls() -> None:
    t = Timer()
    t.start()
    got: list[int] = []
    now = time.time()
    t.call_at(now + 0.2, lambda: got.append(2))
    t.call_at(now + 0.1, lambda: got.append(1))
    t.call_at(now + 30, lambda: got.append(3), item="late")
    time.sleep(0.4)
    assert got == [1, 2]
    assert t.drain() == ["late"]


def test_timer_survives_a_call_in_the_year_9999() -> None:
    """An ETA that far ahead is a wait past threading.TIMEOUT_MAX: the timer thread must
    not die of it (every later ETA task would never run)."""
    t = Timer()
    t.start()
    got: list[int] = []
    t.call_later(2.5e11, lambda: got.append(9999), item="far")
    time.sleep(0.05)
    t.call_later(0.05, lambda: got.append(1))
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == [1]
    assert t.drain() == ["far"]


def test_hoisting_global_options() -> None:
    assert hoist_global_options(["worker", "-A", "proj", "-c", "2"]) == \
        ["-A", "proj", "worker", "-c", "2"]
    assert hoist_global_options(["call", "t", "--json", "--broker=redis://x"]) == \
        ["--json", "--broker=redis://x", "call", "t"]
    assert hoist_global_options(["multi", "start", "w1", "--", "-A", "x"]) == \
        ["multi", "start", "w1", "--", "-A", "x"]


@pytest.mark.skipif(os.getuid() != 0, reason="the guard only acts as root")
def test_root_guard_as_root() -> None:
    with pytest.raises(PrivilegeError, match="QOPS_FORCE_ROOT=1") as info:
        check_root(environ={})
    assert info.value.exit_code == 77
    check_root(environ={"QOPS_FORCE_ROOT": "yes"})
    with pytest.raises(PrivilegeError):
        check_root(environ={"QOPS_FORCE_ROOT": "sure"})  # only 1/true/yes count
    with pytest.raises(PrivilegeError, match="pickle"):
        check_root(accept_content=["json", "pickle"], environ={"QOPS_FORCE_ROOT": "1"})


def test_c_force_root_is_honoured_with_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    assert force_root({"C_FORCE_ROOT": "true"})
    assert "deprecated" in capsys.readouterr().err
    assert not force_root({"C_FORCE_ROOT": "0"})


def test_sd_notify_sends_ready(tmp_path, monkeypatch) -> None:
    import socket

    from qops.ops.daemon import Readiness, sd_notify

    path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    try:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
        assert sd_notify("READY=1") is False  # not under systemd: nothing to do
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        Readiness(None).ready()
        assert server.recv(100) == b"READY=1\nSTATUS=running"
    finally:
        server.close()


def test_read_flat_parses_a_reserve_reply_however_it_arrives():
    """The reserve reply's own parser (qops/transports/redis/link.py): integers and bulk
    strings (which may hold CRLF), read in chunks of any size; an error reply comes back
    as its text; anything else is out of step."""
    import redis

    from qops.transports.redis.link import read_flat

    def feeder(data: bytes, size: int):
        chunks = [data[i:i + size] for i in range(0, len(data), size)]
        return lambda _n: chunks.pop(0) if chunks else b""

    reply = b"*4\r\n:-1\r\n$7\r\na\r\nb\r\nc\r\n:2\r\n$0\r\n\r\n"
    for size in (1, 2, 3, 5, 7, 64, 65536):
        assert read_flat(feeder(reply, size)) == [-1, b"a\r\nb\r\nc", 2, b""]
    assert read_flat(feeder(b"*0\r\n", 1)) == []
    assert read_flat(feeder(b"*-1\r\n", 2)) == []
    assert read_flat(feeder(b"-NOSCRIPT No matching script\r\n", 4)) == \
        "NOSCRIPT No matching script"
    for bad in (b"+OK\r\n", b"*1\r\n$-1\r\n", b"*2\r\n:1\r\n", b"*1\r\n$5\r\nab"):
        with pytest.raises(redis.ConnectionError):
            read_flat(feeder(bad, 3))


def test_pack_push_writes_what_the_general_packer_writes():
    """A bulk send's LPUSH, packed in one join (link.pack_push), is byte for byte what
    ``pack`` (and so redis-py) writes, for any payloads and key."""
    from qops.transports.redis.link import pack, pack_push

    for key, payloads in (("q", [b"a"]), ("pre:q\u00e9", [b"", b"x" * 70000, b"\r\n$3\r\n"]),
                          ("k", [bytes([i % 256]) * i for i in range(300)])):
        assert pack_push(key, payloads) == pack(["LPUSH", key, *payloads])
