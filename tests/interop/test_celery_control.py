"""qops's control plane against a real Celery 5 worker, with the celery preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPLY_TIMEOUT, ROOT, run_qops, stop_group


@pytest.fixture(params=["redis", "amqp"])
def celery_worker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    url = str(request.getfixturevalue(f"{request.param}_url"))
    node = f"cw{uuid.uuid4().hex[:6]}@interop"
    env = dict(os.environ, INTEROP_BROKER=url, INTEROP_BACKEND="", C_FORCE_ROOT="1",
               PYTHONPATH=str(ROOT / "tests" / "interop"))
    log = open(tmp_path / "celery.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_side", "worker", "-n", node,
         "-P", "solo", "-l", "INFO", "--without-gossip", "--without-mingle"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        cwd=str(tmp_path))
    try:
        deadline = time.monotonic() + 60
        # Celery logs "<node> ready." once it consumes: polling before that costs a CLI
        # start and a whole --timeout per try
        while (b" ready." not in (tmp_path / "celery.log").read_bytes()
               and proc.poll() is None and time.monotonic() < deadline):
            time.sleep(0.05)
        while time.monotonic() < deadline:
            r = run_qops("-b", url, "--compat", "celery", "--json", "status", "-d", node)
            if r.returncode == 0:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the Celery worker did not answer:\n{(tmp_path / 'celery.log').read_text()}")
        yield url, node
    finally:
        stop_group(proc)
        log.close()


def test_inspect_status_control_purge_against_celery(celery_worker: tuple[str, str]) -> None:
    url, node = celery_worker
    g = ["-b", url, "--compat", "celery", "--json"]
    r = run_qops(*g, "inspect", "ping", "-d", node, "--timeout", REPLY_TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["replies"] == {node: {"ok": "pong"}}
    r = run_qops(*g, "status", "--timeout", "2")
    assert r.returncode == 0 and node in json.loads(r.stdout)["nodes"]
    r = run_qops(*g, "control", "rate_limit", "celery_side.mul", "10/m", "-d", node,
                 "--timeout", REPLY_TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok" in json.loads(r.stdout)["replies"][node]
    r = run_qops(*g, "inspect", "registered", "-d", node, "--timeout", REPLY_TIMEOUT)
    assert r.returncode == 0
    # Celery lists a task with its rate limit: the one set above came through
    assert "celery_side.mul [rate_limit=10/m]" in json.loads(r.stdout)["replies"][node]
    r = run_qops(*g, "purge", "-Q", "celery", "-f")
    assert r.returncode == 0, r.stderr
    assert "celery" in json.loads(r.stdout)["queues"]
