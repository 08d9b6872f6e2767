"""Signed remote control against real nodes, on SQLite, Redis and RabbitMQ: an
unsigned command sent straight to the broker (as Celery's tools would) is refused and
logged, a replayed signed one is refused, a wrong key gets a clear client error."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from qops import App
from qops.control import reply_queue_name
from qops.protocol import Message
from qops.signing import HEADER, Signer, load_keys, write_key_file
from tests.helpers import REPLY_TIMEOUT, WorkerProcess, qops_env, run_qops, wait_until

NODE = "w1@signed.test"


@pytest.fixture
def node(broker: str, key: Path, tmp_path: Path) -> Iterator[WorkerProcess]:
    w = WorkerProcess("-n", NODE, "-Q", f"q-{uuid.uuid4().hex[:8]}", "-P", "threads",
                      "-c", "1", "-l", "INFO", broker=broker,
                      env=qops_env(QOPS_CONTROL_KEY_FILE=str(key)),
                      logfile=tmp_path / "w1.log")
    with w:
        w.wait_ready()
        assert wait_until(lambda: status(broker, key).returncode == 0, timeout=30), \
            (tmp_path / "w1.log").read_text()
        yield w


def status(broker: str, key: Path | None) -> object:
    env = qops_env(**({"QOPS_CONTROL_KEY_FILE": str(key)} if key else {}))
    return run_qops("-b", broker, "--json", "status", "-d", NODE, "--timeout", "5", env=env)


def log_of(tmp_path: Path) -> str:
    return (tmp_path / "w1.log").read_text()


def test_signed_status(broker: str, key: Path, node: WorkerProcess) -> None:
    r = status(broker, key)
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and list(doc["nodes"]) == [NODE]
    assert doc["remote_control"] == "signed"
    assert "unauthenticated" not in r.stderr


def test_raw_unsigned_shutdown_is_refused(broker: str, key: Path, node: WorkerProcess,
                                          tmp_path: Path) -> None:
    """Celery's `celery control shutdown`: a plain pidbox message, no reply wanted."""
    app = App("celery-cli", broker=broker)
    try:
        body = {"method": "shutdown", "arguments": {}, "destination": None,
                "pattern": None, "matcher": None}
        app.transport.broadcast(app.names["mailbox"], Message(
            body=json.dumps(body).encode(),
            headers={"clock": 1, "expires": int(time.time() + 10)}))
    finally:
        app.close()
    assert wait_until(lambda: "refused shutdown" in log_of(tmp_path), timeout=10)
    time.sleep(1.0)
    assert node.proc is not None and node.proc.poll() is None, "the node shut down"
    assert status(broker, key).returncode == 0
    lines = [ln for ln in log_of(tmp_path).splitlines() if "refused shutdown" in ln]
    assert len(lines) == 1 and "unsigned" in lines[0] and "no sender" in lines[0]


def test_unsigned_client_gets_an_error_reply(broker: str, node: WorkerProcess) -> None:
    r = run_qops("-b", broker, "--json", "control", "shutdown", "-d", NODE,
                 "--timeout", REPLY_TIMEOUT)
    doc = json.loads(r.stdout)
    assert r.returncode != 0
    assert "refused (unsigned)" in doc["replies"][NODE]["error"]
    assert node.proc is not None and node.proc.poll() is None
    r = status(broker, None)
    assert "remote control: unauthenticated" in r.stderr
    assert json.loads(r.stdout)["remote_control"] == "unauthenticated"


def test_wrong_key_is_a_clear_client_error(broker: str, node: WorkerProcess,
                                           tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    write_key_file(other)
    env = qops_env(QOPS_CONTROL_KEY_FILE=str(other))
    # a rejected reply is no answer: each command waits out its --timeout, so the plain
    # and the JSON one run side by side
    with ThreadPoolExecutor(2) as pool:
        r, rj = pool.map(lambda json_: run_qops("-b", broker, *json_, "inspect", "ping", "-d",
                                                NODE, "--timeout", "5", env=env),
                         [(), ("--json",)])
    assert r.returncode != 0
    assert "signatures of 1 reply did not verify" in r.stderr, r.stderr
    assert "ignored the reply of " + NODE in r.stderr
    assert wait_until(lambda: "bad signature" in log_of(tmp_path), timeout=5)
    doc = json.loads(rj.stdout)
    assert doc["replies"] == {} and doc["rejected"] == {NODE: "bad signature"}


def test_replayed_signed_message_is_refused(broker: str, key: Path, node: WorkerProcess,
                                            tmp_path: Path) -> None:
    """A signed ping copied off the broker and sent again: one reply, then a refusal."""
    app = App("replay", broker=broker)
    signer = Signer(load_keys(key), "tester@host")
    oid, ticket = uuid.uuid4().hex, str(uuid.uuid4())
    mailbox = app.names["mailbox"]
    reply_to = {"exchange": f"reply.{mailbox}", "routing_key": oid}
    body = json.dumps({"method": "ping", "arguments": {}, "destination": [NODE],
                       "pattern": None, "matcher": None, "ticket": ticket,
                       "reply_to": reply_to}).encode()
    headers = {"clock": 1, "expires": int(time.time() + 30),
               HEADER: signer.sign("control", body)}
    consumer = app.transport.reply_consumer(reply_queue_name(reply_to),
                                            exchange=reply_to["exchange"], routing_key=oid)
    try:
        replies = []
        for _ in range(2):
            app.transport.broadcast(mailbox, Message(body=body, headers=dict(headers)))
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                d = consumer.get(0.2)
                if d is not None:
                    consumer.ack(d)
                    replies.append(d)
        assert len(replies) == 1
        reply = replies[0].message
        assert json.loads(reply.body) == {NODE: {"ok": "pong"}}
        signer.verify("reply", reply.body, reply.headers[HEADER], context=ticket)
    finally:
        consumer.close()
        app.close()
    assert wait_until(lambda: "replayed" in log_of(tmp_path), timeout=5)
    assert "refused ping from 'tester@host'" in log_of(tmp_path)
