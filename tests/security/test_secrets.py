"""Secrets out of sight: passwords masked in config show, --json, logs, banners and
errors (config show --secrets for the config file's owner); the mode of every file
qops writes; warnings for world-writable config, key and pidfile directories."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qops.beat import ScheduleFile
from qops.errors import UsageError
from qops.ops import pidfile
from tests.helpers import REPLY_TIMEOUT, WorkerProcess, qops_env, run_qops, wait_until

SECRET = "s3cr3t-pw"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_config_show_masks_every_password() -> None:
    env = qops_env(QOPS_BROKER_URL=f"amqp://user:{SECRET}@127.0.0.1:5672/v",
                   QOPS_RESULT_BACKEND=f"redis://:{SECRET}@127.0.0.1:6379/1",
                   QOPS_BROKER_API=f"http://user:{SECRET}@127.0.0.1:15672/api/",
                   QOPS_BROKER_TRANSPORT_OPTIONS=json.dumps(
                       {"sentinel_kwargs": {"password": SECRET}, "visibility": 5}))
    for args in (("config", "show"), ("--json", "config", "show")):
        r = run_qops(*args, env=env)
        assert r.returncode == 0, r.stderr
        assert SECRET not in r.stdout + r.stderr
        assert "user:**@127.0.0.1" in r.stdout
    r = run_qops("--json", "config", "show", "--secrets", env=env)
    assert r.returncode == 0 and SECRET in r.stdout  # no config file: the caller's own


def test_secrets_only_for_the_config_files_owner(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from qops.cli.config_cmd import check_may_reveal

    config = tmp_path / "qops.yaml"
    config.write_text(f"broker_url: redis://:{SECRET}@localhost:6379/0\n")
    monkeypatch.setenv("QOPS_CONFIG", str(config))
    owner = config.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner)
    check_may_reveal()
    monkeypatch.setattr(os, "geteuid", lambda: owner + 4242)
    with pytest.raises(UsageError, match="only its owner or root"):
        check_may_reveal()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    check_may_reveal()


def test_errors_mask_passwords() -> None:
    r = run_qops("-b", f"redis://:{SECRET}@127.0.0.1:6379/99", "status", "--timeout", "1")
    assert r.returncode != 0 and SECRET not in r.stdout + r.stderr
    r = run_qops("-b", f"amqp://guest:{SECRET}@127.0.0.1:5672/nope", "--json", "status",
                 "--timeout", "1")
    assert r.returncode != 0 and SECRET not in r.stdout + r.stderr, r.stderr


def test_logs_banner_and_json_mask_the_amqp_password(amqp_url: str, tmp_path: Path) -> None:
    assert "guest:guest@" in amqp_url
    log = tmp_path / "w.log"
    env = qops_env(QOPS_BROKER_TRANSPORT_OPTIONS=json.dumps(
        {"sentinel_kwargs": {"password": SECRET}}))  # inspect conf shows settings
    with WorkerProcess("-n", "mask@sec.test", "-P", "threads", "-c", "1", "-l", "INFO",
                       broker=amqp_url, logfile=log, env=env) as w:
        w.wait_ready()
        assert wait_until(lambda: run_qops("-b", amqp_url, "status", "-d", "mask@sec.test",
                                           "--timeout", "2").returncode == 0, timeout=30)
        outputs = [run_qops("-b", amqp_url, "--json", "inspect", what, "-d",
                            "mask@sec.test", "--timeout", REPLY_TIMEOUT)
                   for what in ("stats", "conf", "report")]
    for r in outputs:
        assert r.returncode == 0, r.stderr
        assert "guest:guest@" not in r.stdout + r.stderr and SECRET not in r.stdout
    assert "guest:**@" in outputs[0].stdout
    assert "sentinel_kwargs" in outputs[1].stdout
    text = log.read_text()
    assert "guest:**@" in text and "guest:guest@" not in text
    assert "remote control: unauthenticated" in text


def test_generated_files_are_private(tmp_path: Path) -> None:
    url = f"redis://:{SECRET}@127.0.0.1:6379/0"
    r = run_qops("-A", "proj", "-b", url, "--workdir", str(tmp_path), "generate", "systemd",
                 "-o", str(tmp_path / "units"), "--control-key-file", "/etc/qops/control.key")
    assert r.returncode == 0, r.stderr
    units = tmp_path / "units"
    assert mode(units / "qops.env") == 0o600
    assert "QOPS_CONTROL_KEY_FILE=/etc/qops/control.key" in (units / "qops.env").read_text()
    for unit in units.iterdir():
        if unit.name != "qops.env":
            assert SECRET not in unit.read_text(), unit
            assert mode(unit) == 0o644
    conf = tmp_path / "supervisor.conf"
    conf.write_text("old")
    conf.chmod(0o644)
    r = run_qops("-A", "proj", "-b", url, "--workdir", str(tmp_path), "generate",
                 "supervisor", "-o", str(conf), "--control-key-file", "/etc/qops/k")
    assert r.returncode == 0, r.stderr
    assert mode(conf) == 0o600 and 'QOPS_CONTROL_KEY_FILE="/etc/qops/k"' in conf.read_text()
    key = tmp_path / "control.key"
    r = run_qops("generate", "key", str(key))
    assert r.returncode == 0 and mode(key) == 0o600, r.stderr
    r = run_qops("generate", "key", str(tmp_path / "g.key"), "--group", "0")
    assert r.returncode == 0 and mode(tmp_path / "g.key") == 0o640, r.stderr
    key.chmod(0o644)
    r = run_qops("generate", "key", str(key))
    assert r.returncode != 0 and "other users could read" in r.stderr


def test_schedule_file_is_private(tmp_path: Path) -> None:
    f = ScheduleFile(tmp_path / "beat-schedule")
    f.save({})
    assert mode(f.path) == 0o600


def test_files_of_a_node(tmp_path: Path) -> None:
    """multi start: record 0600, pidfile 0644 (only a pid), log 0640, broker file 0600."""
    broker = f"sqlite:///{tmp_path}/broker.db"
    env = qops_env()
    proc_args = [sys.executable, "-m", "qops", "multi", "start", "w1", "-A", "proj",
                 "-b", broker, "-P", "threads", "-c", "1", "--pidfile",
                 f"{tmp_path}/%n.pid", "--logfile", f"{tmp_path}/%n.log"]
    try:
        r = subprocess.run(proc_args, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert mode(tmp_path / "w1.pid.cmd") == 0o600
        assert mode(tmp_path / "w1.pid") == 0o644
        assert mode(tmp_path / "w1.log") == 0o640
        for name in ("broker.db", "broker.db-wal", "broker.db-shm"):
            if (tmp_path / name).exists():
                assert mode(tmp_path / name) == 0o600, name
        assert SECRET not in (tmp_path / "w1.pid.cmd").read_text()
    finally:
        info = pidfile.read(tmp_path / "w1.pid")
        if info and pidfile.pid_alive(info.pid):
            os.killpg(os.getpgid(info.pid), signal.SIGKILL)


def test_world_writable_paths_are_warned_about(tmp_path: Path) -> None:
    config = tmp_path / "qops.yaml"
    config.write_text(f"broker_url: sqlite:///{tmp_path}/broker.db\n")
    config.chmod(0o666)
    rundir = tmp_path / "run"
    rundir.mkdir()
    rundir.chmod(0o777)
    env = qops_env(QOPS_CONFIG=str(config))
    r = run_qops("-A", "proj", "worker", "--check", "--pidfile", f"{rundir}/w.pid", env=env)
    assert r.returncode == 0, r.stderr
    assert f"config file {config} is writable by every user" in r.stderr
    assert f"pidfile directory {rundir} is writable by every user" in r.stderr
    config.chmod(0o600)
    rundir.chmod(0o700)
    r = run_qops("-A", "proj", "worker", "--check", "--pidfile", f"{rundir}/w.pid", env=env)
    assert "writable by every user" not in r.stderr


def test_bad_key_file_is_a_one_line_error(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("x" * 40 + "\n")
    key.chmod(0o644)
    env = qops_env(QOPS_CONTROL_KEY_FILE=str(key), QOPS_BROKER_URL=f"sqlite:///{tmp_path}/b.db")
    for args in (("-A", "proj", "worker", "--check"), ("status", "--timeout", "1")):
        r = run_qops(*args, env=env)
        assert r.returncode != 0
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "other users could read or change it" in lines[0], r.stderr
