"""qops and real Celery 5 sharing queues: declarations in both orders on RabbitMQ
(classic and quorum), compressed messages each way with every codec, presence with mixed
presets and queue listing without Celery's pidbox queues on Redis."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPLY_TIMEOUT, ROOT, WorkerProcess, qops_env, run_qops

CODECS = ("gzip", "bzip2", "lzma")


@contextlib.contextmanager
def celery_worker(broker: str, backend: str, queue: str, log: Path,
                  **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """A real Celery worker running tests/interop/celery_side.py, consuming ``queue``."""
    full = dict(os.environ, INTEROP_BROKER=broker, INTEROP_BACKEND=backend, C_FORCE_ROOT="1",
                PYTHONPATH=str(ROOT / "tests" / "interop"), **env)
    out = open(log, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_side", "worker", "-Q", queue,
         "-P", "solo", "-l", "INFO", "-n", f"c{uuid.uuid4().hex[:6]}@interop",
         "--without-heartbeat", "--without-gossip", "--without-mingle"],
        env=full, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        cwd=str(log.parent))
    try:
        yield proc
    finally:
        # every task the test sent has finished by now: SIGQUIT (Celery's cold
        # shutdown), and SIGKILL after a moment (its shutdown on RabbitMQ can take ~10 s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGQUIT)
        try:
            proc.wait(1.0)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        out.close()


def celery_client(broker: str, backend: str, **conf: Any) -> Any:
    from celery import Celery

    client = Celery("client", broker=broker, backend=backend)
    client.conf.update(conf)
    return client


def check_alive(proc: subprocess.Popen[bytes], log: Path) -> None:
    text = log.read_text("utf-8", "replace")
    assert proc.poll() is None and "Unrecoverable error" not in text, text[-3000:]


@pytest.mark.amqp
def test_queues_declared_by_either_side_first_classic_and_quorum_with_compression(
        amqp_url: str, redis_url: str, tmp_path: Path) -> None:
    """Both sides configured alike: default queue ``a`` (classic), every other queue
    quorum. qops declares ``a`` and ``b`` (quorum) first, sending to them (compressed
    with each codec), then a Celery worker starts on them and runs the tasks. A Celery
    client declares ``c`` (quorum) first, sending compressed tasks, then a qops worker
    starts on it and runs them. Neither side gets a 406 from the other's declarations."""
    from qops import App

    a, b, c = (f"decl-{x}-{uuid.uuid4().hex[:6]}" for x in "abc")
    app = App("qclient", broker=amqp_url, backend=redis_url, compat="celery",
              task_default_queue=a, task_create_missing_queue_type="quorum")
    client = celery_client(amqp_url, redis_url, task_default_queue=a,
                           task_create_missing_queue_type="quorum")
    env = qops_env(QOPS_COMPAT="celery", QOPS_TASK_DEFAULT_QUEUE=a,
                   QOPS_TASK_CREATE_MISSING_QUEUE_TYPE="quorum")
    log = tmp_path / "celery.log"
    try:
        to_celery = [app.send_task("celery_side.mul", [6, 7], queue=a)]
        to_celery += [app.send_task("celery_side.mul", [i, 2], queue=q, compression=codec)
                      for i, (q, codec) in enumerate(zip((a, b, b), CODECS, strict=True))]
        to_qops = [client.send_task("proj.tasks.add", args=(i, 10), queue=c,
                                    compression=codec)
                   for i, codec in enumerate((None, *CODECS))]
        with celery_worker(amqp_url, redis_url, f"{a},{b}", log, INTEROP_DEFAULT_QUEUE=a,
                           INTEROP_MISSING_QUEUE_TYPE="quorum") as proc, \
                WorkerProcess("-Q", c, "-P", "threads", broker=amqp_url, backend=redis_url,
                              env=env, logfile=tmp_path / "qops.log"):
            assert [r.get(timeout=60) for r in to_qops] == [10, 11, 12, 13], \
                (tmp_path / "qops.log").read_text()
            assert [r.get(timeout=60) for r in to_celery] == [42, 0, 2, 4], log.read_text()
            check_alive(proc, log)
        qops_log = (tmp_path / "qops.log").read_text()
        assert "other arguments" not in qops_log and "refuses a channel-wide" not in qops_log
    finally:
        app.close()
        client.close()


def test_redis_mixed_presets_compression_presence_and_listing(redis_url: str,
                                                              tmp_path: Path) -> None:
    """On Redis: a Celery worker and qops workers of both presets share the broker.
    Compressed tasks run each way; ``qops status`` of the qops preset is not waiting for
    the celery-preset node; ``qops queues`` does not list Celery's pidbox queue."""
    from qops import App

    cq, qq = f"cel-{uuid.uuid4().hex[:6]}", f"qop-{uuid.uuid4().hex[:6]}"
    node = f"qp{uuid.uuid4().hex[:6]}@interop"
    celery_env = qops_env(QOPS_COMPAT="celery")
    qops_env_ = qops_env()
    app = App("qclient", broker=redis_url, backend=redis_url, compat="celery")
    client = celery_client(redis_url, redis_url)
    log = tmp_path / "celery.log"
    try:
        with celery_worker(redis_url, redis_url, cq, log) as proc, \
                WorkerProcess("-Q", qq, "-P", "threads", broker=redis_url, backend=redis_url,
                              env=celery_env, logfile=tmp_path / "qc.log"), \
                WorkerProcess("-n", node, "-P", "threads", broker=redis_url,
                              backend=redis_url, env=qops_env_,
                              logfile=tmp_path / "qq.log"):
            to_celery = [app.send_task("celery_side.mul", [i, 3], queue=cq, compression=c)
                         for i, c in enumerate(CODECS)]
            to_qops = [client.send_task("proj.tasks.add", args=(i, 1), queue=qq,
                                        compression=c) for i, c in enumerate(CODECS)]
            assert [r.get(timeout=60) for r in to_celery] == [0, 3, 6], log.read_text()
            assert [r.get(timeout=60) for r in to_qops] == [1, 2, 3]
            check_alive(proc, log)
            base = ["-A", "proj", "-b", redis_url, "--result-backend", redis_url]
            status = _wait_status(base, node)
            assert status.returncode == 0, status.stdout + status.stderr
            assert list(json.loads(status.stdout)["nodes"]) == [node]
            listed = run_qops(*base, "--compat", "celery", "queues", "--json", env=celery_env)
            assert listed.returncode == 0, listed.stderr
            names = {q["name"] for q in json.loads(listed.stdout)}
            assert {cq, qq} <= names, names
            assert not [n for n in names if n.endswith(".pidbox") or
                        n.startswith("celeryev.")], names
    finally:
        app.close()
        client.close()


def _wait_status(base: list[str], node: str) -> subprocess.CompletedProcess[str]:
    """``qops status --json`` of the qops preset, once ``node`` answers."""
    deadline = time.monotonic() + 30
    while True:
        r = run_qops(*base, "status", "--json", "--timeout", REPLY_TIMEOUT)
        if node in r.stdout or time.monotonic() > deadline:
            return r
        time.sleep(0.3)
