"""The command line, run as a user would run it (subprocesses)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from qops.transports.base import from_url
from tests.helpers import WorkerProcess, qops_env, run_qops


def test_help_and_version() -> None:
    r = run_qops("--help")
    assert r.returncode == 0 and "worker" in r.stdout and "call" in r.stdout
    r = run_qops("--version")
    assert r.returncode == 0 and r.stdout.startswith("qops ")


def test_usage_errors_exit_2() -> None:
    assert run_qops("no-such-command").returncode == 2
    r = run_qops("-b", "ftp://x", "call", "t")
    assert r.returncode == 2
    assert "unknown broker URL scheme" in r.stderr and "Traceback" not in r.stderr
    r = run_qops("call", "t", "--args", "[1,")
    assert r.returncode == 2 and "--args is not valid JSON" in r.stderr


def test_worker_needs_the_app() -> None:
    r = run_qops("worker")
    assert r.returncode == 2 and "-A/--app" in r.stderr
    r = run_qops("-A", "no_such_mod_qq", "worker")
    assert r.returncode == 2 and "no such module" in r.stderr


@pytest.mark.skipif(os.getuid() != 0, reason="the guard only acts as root")
def test_worker_root_guard(sqlite_url: str) -> None:
    env = qops_env()
    env.pop("QOPS_FORCE_ROOT")
    r = run_qops("-A", "proj", "-b", sqlite_url, "worker", env=env, timeout=30)
    assert r.returncode == 77
    assert "refusing to run as root" in r.stderr and "QOPS_FORCE_ROOT=1" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_unreachable_broker_exits_74() -> None:
    r = run_qops("-b", "redis://127.0.0.1:1/0", "call", "proj.tasks.add", "--args", "[1, 2]")
    assert r.returncode == 74, r.stderr
    assert "127.0.0.1:1" in r.stderr and "Traceback" not in r.stderr


def test_call_and_result_for_scripts(sqlite_url: str, tmp_path: Path) -> None:
    g = ["-A", "proj", "-b", sqlite_url]
    r = run_qops(*g, "call", "proj.tasks.add", "--args", "[2, 2]")
    assert r.returncode == 0
    task_id = r.stdout.strip()
    uuid.UUID(task_id)
    r = run_qops(*g, "result", task_id)
    assert r.returncode == 75 and r.stdout.strip() == "PENDING"
    with WorkerProcess("-P", "solo", broker=sqlite_url, logfile=tmp_path / "w.log"):
        r = run_qops(*g, "result", task_id, "--wait", "--timeout", "20")
        assert r.returncode == 0 and r.stdout.strip() == "4"
        r = run_qops("call", "proj.tasks.fail", "--args", '["bad"]', "--wait",
                     "--timeout", "20", *g, "--json")  # global options after the command
        assert r.returncode == 1
        doc = json.loads(r.stdout)
        assert doc["status"] == "FAILURE" and doc["result"]["exc_type"] == "ValueError"
        r = run_qops(*g, "call", "proj.tasks.mul", "--kwargs", '{"x": 3, "y": 5}', "--wait")
        assert r.returncode == 0 and r.stdout.strip() == "15"


def test_config_show_names_sources(tmp_path: Path) -> None:
    (tmp_path / "qops.yaml").write_text("broker_url: redis://:secret@h:6379/3\n")
    env = qops_env(QOPS_RESULT_EXPIRES="120")
    r = run_qops("--config", str(tmp_path / "qops.yaml"), "--json", "config", "show", env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["settings"]["broker_url"]["value"] == "redis://:**@h:6379/3"
    assert doc["settings"]["broker_url"]["source"].startswith("file ")
    assert doc["settings"]["result_expires"] == {"value": 120.0,
                                                 "source": "env QOPS_RESULT_EXPIRES"}
    (tmp_path / "bad.yaml").write_text("result_expire: 3\n")
    r = run_qops("--config", str(tmp_path / "bad.yaml"), "config", "show")
    assert r.returncode == 2 and "result_expire" in r.stderr
    (tmp_path / "broken.yaml").write_text("broker_url: redis://h\nresult_expires: [1, 2\n")
    r = run_qops("--config", str(tmp_path / "broken.yaml"), "config", "show")
    assert r.returncode == 2 and "not valid YAML" in r.stderr and "(line 3, column 1)" in \
        r.stderr, r.stderr
    r = run_qops("--config", str(tmp_path), "config", "show")
    assert r.returncode == 2 and "is a directory" in r.stderr


def test_dlq_commands(sqlite_url: str) -> None:
    t = from_url(sqlite_url)
    t.dead_letter("q1", b"garbage", "invalid JSON envelope")
    t.dead_letter("q1", b"more", "unknown task 'x'")
    g = ["-b", sqlite_url]
    r = run_qops(*g, "dlq", "list", "--json")
    assert r.returncode == 0
    items = json.loads(r.stdout)
    assert {i["reason"] for i in items} == {"invalid JSON envelope", "unknown task 'x'"}
    r = run_qops(*g, "dlq", "requeue", items[0]["id"])
    assert r.returncode == 0 and "requeued 1" in r.stdout
    assert t.queue_stats(["q1"])[0].ready == 1
    r = run_qops(*g, "--json", "dlq", "requeue", items[0]["id"], items[1]["id"])  # 1 gone
    assert r.returncode == 1 and json.loads(r.stdout) == {"requeued": 1, "not_found": 1}
    assert "1 of 2 id(s) not found" in r.stderr
    t.dead_letter("q1", b"again", "invalid JSON envelope")
    r = run_qops(*g, "dlq", "purge")
    assert r.returncode == 2 and "--force" in r.stderr
    r = run_qops(*g, "dlq", "purge", "-f")
    assert r.returncode == 0 and "purged 1" in r.stdout
    assert run_qops(*g, "dlq", "requeue").returncode == 2
    t.close()
