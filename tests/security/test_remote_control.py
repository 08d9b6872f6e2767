"""Signed remote control against real nodes, on SQLite, Redis and RabbitMQ: an
unsigned command sent straight to the broker (as Celery's tools would) is refused and
logged, a replayed signed one is refused, a wrong key gets a clear client error."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from qops import App
from qops.control import reply_queue_name
from qops.protocol import Message
from qops.signing import HEADER, Signer, load_keys, write_key_file
from tests.conftest import shared_broker_url
from tests.helpers import REPLY_TIMEOUT, WorkerProcess, qops_env, run_qops, wait_until

NODE = "w1@signed.test"


@dataclass
class Signed:
    """The node shared by this module's tests on one broker (each test sees the log
    lines written since it began)."""

    broker: str
    key: Path
    worker: WorkerProcess
    log_from: int = 0

    def log(self) -> str:
        return self.worker.log()[self.log_from:]


@pytest.fixture(scope="module", params=["sqlite", "redis", "amqp"])
def signed(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signed]:
    """One signed node per broker for the whole module: none of these tests changes
    it (each checks the node is still up), so it starts once instead of five times."""
    folder = tmp_path_factory.mktemp(f"signed-{request.param}")
    key = folder / "qops.key"
    write_key_file(key)
    with shared_broker_url(request.param, request, folder) as broker:
        w = WorkerProcess("-n", NODE, "-Q", f"q-{uuid.uuid4().hex[:8]}", "-P", "threads",
                          "-c", "1", "-l", "INFO", broker=broker,
                          env=qops_env(QOPS_CONTROL_KEY_FILE=str(key)),
                          logfile=folder / "w1.log")
        with w:
            w.wait_ready()
            assert wait_until(lambda: status(broker, key).returncode == 0, timeout=30), \
                w.log()
            yield Signed(broker, key, w)


@pytest.fixture
def node(signed: Signed) -> Iterator[Signed]:
    assert signed.worker.proc is not None and signed.worker.proc.poll() is None, \
        "the shared node is down:\n" + signed.worker.log()[-3000:]
    signed.log_from = len(signed.worker.log())
    yield signed


def status(broker: str, key: Path | None) -> object:
    env = qops_env(**({"QOPS_CONTROL_KEY_FILE": str(key)} if key else {}))
    return run_qops("-b", broker, "--json", "status", "-d", NODE, "--timeout", "5", env=env)


def test_signed_status(node: Signed) -> None:
    r = status(node.broker, node.key)
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and list(doc["nodes"]) == [NODE]
    assert doc["remote_control"] == "signed"
    assert "unauthenticated" not in r.stderr


def test_raw_unsigned_shutdown_is_refused(node: Signed) -> None:
    """Celery's `celery control shutdown`: a plain pidbox message, no reply wanted."""
    app = App("celery-cli", broker=node.broker)
    try:
        body = {"method": "shutdown", "arguments": {}, "destination": None,
                "pattern": None, "matcher": None}
        app.transport.broadcast(app.names["mailbox"], Message(
            body=json.dumps(body).encode(),
            headers={"clock": 1, "expires": int(time.time() + 10)}))
    finally:
        app.close()
    assert wait_until(lambda: "refused shutdown" in node.log(), timeout=10)
    time.sleep(1.0)
    assert node.worker.proc is not None and node.worker.proc.poll() is None, \
        "the node shut down"
    assert status(node.broker, node.key).returncode == 0
    lines = [ln for ln in node.log().splitlines() if "refused shutdown" in ln]
    assert len(lines) == 1 and "unsigned" in lines[0] and "no sender" in lines[0]


def test_unsigned_client_gets_an_error_reply(node: Signed) -> None:
    r = run_qops("-b", node.broker, "--json", "control", "shutdown", "-d", NODE,
                 "--timeout", REPLY_TIMEOUT)
    doc = json.loads(r.stdout)
    assert r.returncode != 0
    assert "refused (unsigned)" in doc["replies"][NODE]["error"]
    assert node.worker.proc is not None and node.worker.proc.poll() is None
    r = status(node.broker, None)
    assert "remote control: unauthenticated" in r.stderr
    assert json.loads(r.stdout)["remote_control"] == "unauthenticated"
    r = run_qops("-b", node.broker, "status", "--timeout", REPLY_TIMEOUT)  # plain text
    assert r.returncode == 1 and f"{NODE}: ERROR refused (unsigned)" in r.stdout, r.stdout
    assert "online" not in r.stdout  # a node that refuses us is not counted


def test_wrong_key_is_a_clear_client_error(node: Signed, tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    write_key_file(other)
    env = qops_env(QOPS_CONTROL_KEY_FILE=str(other))
    # a rejected reply is no answer: each command waits out its --timeout, so the plain
    # and the JSON one run side by side
    with ThreadPoolExecutor(2) as pool:
        r, rj = pool.map(lambda json_: run_qops("-b", node.broker, *json_, "inspect", "ping", "-d",
                                                NODE, "--timeout", "5", env=env),
                         [(), ("--json",)])
    assert r.returncode != 0
    assert "signatures of 1 reply did not verify" in r.stderr, r.stderr
    assert "ignored the reply of " + NODE in r.stderr
    assert "no reply within" not in r.stderr  # it replied; the reply was not valid
    assert wait_until(lambda: "bad signature" in node.log(), timeout=5)
    doc = json.loads(rj.stdout)
    assert doc["replies"] == {} and doc["rejected"] == {NODE: "bad signature"}


def test_replayed_signed_message_is_refused(node: Signed) -> None:
    """A signed ping copied off the broker and sent again: one reply, then a refusal."""
    app = App("replay", broker=node.broker)
    signer = Signer(load_keys(node.key), "tester@host")
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
    assert wait_until(lambda: "replayed" in node.log(), timeout=5)
    assert "refused ping from 'tester@host'" in node.log()
