"""task_signing: a worker runs signed tasks and dead-letters unsigned or forged ones
with the reason (SQLite, Redis, RabbitMQ: the signature header must survive each)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qops import App
from qops.signing import write_key_file
from tests.helpers import WorkerProcess, qops_env, wait_until


@pytest.fixture
def queue() -> str:
    return f"signed-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def worker(broker: str, key: Path, queue: str, tmp_path: Path) -> Iterator[WorkerProcess]:
    env = qops_env(QOPS_TASK_SIGNING="1", QOPS_TASK_KEY_FILE=str(key))
    backend = None if broker.startswith("amqp") else broker
    with WorkerProcess("-n", "ts@signed.test", "-Q", queue, "-P", "threads", "-c", "1", "-l", "INFO",
                       broker=broker, backend=backend, env=env,
                       logfile=tmp_path / "w.log") as w:
        yield w


def producer(broker: str, key: Path | None) -> App:
    backend = None if broker.startswith("amqp") else broker
    settings = {"task_signing": True, "task_key_file": str(key)} if key else {}
    return App(f"producer-{uuid.uuid4().hex[:6]}", broker=broker, backend=backend,
               **settings)


def dead_reasons(app: App, queue: str) -> list[str]:
    """The reasons of the dead letters from ``queue`` (the RabbitMQ vhost is shared
    by the session's tests: other tests' dead letters are there too)."""
    return [d.reason for d in app.transport.dead_letters(1000) if d.queue == queue]


def test_unsigned_and_forged_tasks_are_dead_lettered(broker: str, key: Path, queue: str,
                                                      worker: WorkerProcess,
                                                      tmp_path: Path) -> None:
    plain = producer(broker, None)
    forged_key = tmp_path / "forged.key"
    write_key_file(forged_key)
    forger = producer(broker, forged_key)
    signed = producer(broker, key)
    try:
        plain.send_task("proj.tasks.add", (1, 1), queue=queue)
        forger.send_task("proj.tasks.add", (2, 2), queue=queue)
        assert wait_until(lambda: len(dead_reasons(plain, queue)) >= 2, timeout=30), \
            (tmp_path / "w.log").read_text()
        reasons = dead_reasons(plain, queue)
        assert any("task message refused: unsigned" in r for r in reasons), reasons
        assert any("task message refused: bad signature" in r for r in reasons), reasons
        res = signed.send_task("proj.tasks.add", (2, 3), queue=queue)
        if signed.has_backend:
            assert res.get(timeout=30) == 5
        else:
            assert wait_until(lambda: "succeeded" in (tmp_path / "w.log").read_text(),
                              timeout=30), (tmp_path / "w.log").read_text()
        assert len(dead_reasons(plain, queue)) == 2
    finally:
        for a in (plain, forger, signed):
            a.close()
