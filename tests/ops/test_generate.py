"""``qops generate systemd|supervisor``: the files, read as an operator reads them, and
checked by systemd's own tools (``systemd-analyze verify``, ``systemd-tmpfiles``).

The supervisor configs are run under a real supervisord in test_supervisor.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qops.app import App
from qops.ops import deploy
from tests.conftest import IN_CI
from tests.helpers import ROOT, qops_env, run_qops

CONTRIB = ROOT / "contrib"
# The commands that made contrib/: deterministic inputs (no path of this machine in them)
CONTRIB_GLOBALS = ["-A", "proj", "-b", "redis://localhost:6379/0",
                   "--result-backend", "redis://localhost:6379/1"]
CONTRIB_ARGS = ["w1", "w2", "--user", "qops", "--workdir", "/srv/proj",
                "--qops-bin", "/usr/local/bin/qops"]
CONTRIB_RUNS = {
    "systemd": ["generate", "systemd", *CONTRIB_ARGS, "--group", "qops"],
    "systemd/multi": ["generate", "systemd", *CONTRIB_ARGS, "--group", "qops", "--multi"],
    "supervisor": ["generate", "supervisor", *CONTRIB_ARGS],
}

# Every signal and timeout setting carries a comment on the line above it
SYSTEMD_COMMENTED = ("Type", "NotifyAccess", "KillSignal", "KillMode", "TimeoutStopSec",
                     "TimeoutStartSec", "Restart", "RestartSec", "RestartPreventExitStatus",
                     "ExecReload", "ExecStop", "GuessMainPID")
SUPERVISOR_COMMENTED = ("stopsignal", "stopwaitsecs", "stopasgroup", "killasgroup",
                        "startsecs", "autorestart")


def generate(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qops", *args], env=qops_env(),
                          capture_output=True, text=True, timeout=60, cwd=str(cwd or ROOT))


def systemd_files(tmp_path: Path, *args: str, multi: bool = False) -> dict[str, str]:
    out = tmp_path / ("multi" if multi else "units")
    r = generate("-A", "proj", "generate", "systemd", "w1", "w2", "--user", "qops",
                 "--workdir", str(tmp_path), "-o", str(out), *(["--multi"] if multi else []),
                 *args)
    assert r.returncode == 0, r.stderr
    return {p.name: p.read_text() for p in out.iterdir()}


def settings(text: str, sep: str = "=") -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line and line[0] not in "#;[" and sep in line:
            key, _, value = line.partition(sep)
            out.setdefault(key.strip(), value.strip())
    return out


def need_tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}")
                                  else None)
    if path is None:
        msg = f"{name} is not installed here (it comes with systemd); CI runs this check"
        if IN_CI:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return path


# -- contrib/ is what generate prints ---------------------------------------------------


@pytest.mark.parametrize("where", sorted(CONTRIB_RUNS))
def test_contrib_files_are_what_generate_writes(where: str, tmp_path: Path) -> None:
    supervisor = where == "supervisor"
    out = tmp_path / "out"
    target = out / "qops.conf" if supervisor else out
    r = run_qops(*CONTRIB_GLOBALS, *CONTRIB_RUNS[where], "-o", str(target))
    assert r.returncode == 0, r.stderr
    fresh = {p.name: p.read_bytes() for p in out.iterdir()}
    kept = {p.name: p.read_bytes() for p in (CONTRIB / where).iterdir() if p.is_file()}
    command = " ".join(["qops", *CONTRIB_GLOBALS, *CONTRIB_RUNS[where], "-o",
                        f"contrib/{where}" + ("/qops.conf" if supervisor else "")])
    assert sorted(kept) == sorted(fresh), f"regenerate with: PYTHONPATH=examples {command}"
    for name in fresh:
        assert kept[name] == fresh[name], \
            f"contrib/{where}/{name} is stale; regenerate with: PYTHONPATH=examples {command}"


# -- systemd: verified by systemd's tools ---------------------------------------------------


@pytest.mark.parametrize("multi", [False, True], ids=["template", "multi"])
def test_units_pass_systemd_analyze_verify(multi: bool, tmp_path: Path) -> None:
    analyze = need_tool("systemd-analyze")
    # the default --qops-bin is this installation's qops: verify checks that it exists
    files = systemd_files(tmp_path, multi=multi)
    folder = tmp_path / ("multi" if multi else "units")
    units = ([deploy.MULTI_UNIT] if multi else ["qops-worker@w1.service", "qops-worker@w2.service"])
    units += [deploy.BEAT_UNIT, deploy.TARGET]
    assert (deploy.MULTI_UNIT in files) is multi and (deploy.WORKER_UNIT in files) is not multi
    r = subprocess.run([analyze, "verify", "--man=no", *[str(folder / u) for u in units]],
                       capture_output=True, text=True, timeout=60, cwd=str(folder))
    # verify exits 0 even for an unknown key or a bad value: it must print nothing at all
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a missing binary are reported."""
    analyze = need_tool("systemd-analyze")
    files = systemd_files(tmp_path, "--qops-bin", "/nonexistent/qops")
    unit = tmp_path / "broken" / "qops-worker@.service"
    unit.parent.mkdir()
    unit.write_text(files[deploy.WORKER_UNIT].replace("KillMode=mixed", "KillMod=mixed"))
    r = subprocess.run([analyze, "verify", "--man=no", str(unit.parent / "qops-worker@w1.service")],
                       capture_output=True, text=True, timeout=60)
    assert "KillMod" in r.stderr and "/nonexistent/qops" in r.stderr


def test_tmpfiles_entry_is_applied_by_systemd_tmpfiles(tmp_path: Path) -> None:
    tmpfiles = need_tool("systemd-tmpfiles")
    user = "nobody" if os.getuid() == 0 else os.environ.get("USER", "nobody")
    files = systemd_files(tmp_path, "--user", user, "--logdir", "/var/log/qops-test")
    conf = tmp_path / "qops.conf"
    conf.write_text(files[deploy.TMPFILES])
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group"):  # --root resolves user names in root/etc
        shutil.copy(f"/etc/{name}", root / "etc" / name)
    r = subprocess.run([tmpfiles, "--create", f"--root={root}", str(conf)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for path in ("run/qops", "var/log/qops-test"):
        st = (root / path).stat()
        assert (root / path).is_dir() and st.st_mode & 0o777 == 0o755
        if os.getuid() == 0:
            import pwd

            assert st.st_uid == pwd.getpwnam(user).pw_uid


def test_worker_template_unit_as_an_operator_reads_it(tmp_path: Path) -> None:
    files = systemd_files(tmp_path, "--group", "qops", "-c", "4", "-Q", "a,b")
    assert sorted(files) == sorted([deploy.WORKER_UNIT, deploy.BEAT_UNIT, deploy.TARGET,
                                    deploy.ENV_FILE, deploy.TMPFILES])
    unit = files[deploy.WORKER_UNIT]
    s = settings(unit)
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["KillMode"] == "mixed" and s["KillSignal"] == "SIGTERM"
    assert s["Restart"] == "on-failure"
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["User"] == "qops" and s["Group"] == "qops"
    assert s["WorkingDirectory"] == str(tmp_path)
    assert s["EnvironmentFile"] == "-/etc/qops/qops.env"
    start = s["ExecStart"]
    assert start.startswith("/") and " -A proj worker " in start
    # systemd's own specifiers for the node name; qops's templates escaped as %%
    assert " -n %i@%H " in start
    assert "--logfile /var/log/qops/%%n%%I.log" in start
    assert "-c 4 -Q a,b" in start and start.endswith("$QOPS_WORKER_OPTS")
    # foreground, supervised by systemd: no daemon options
    for option in ("--detach", "--pidfile", "--uid"):
        assert option not in start
    assert "PIDFile" not in s
    assert "[Install]" in unit and "WantedBy=qops.target" in unit
    target = settings(files[deploy.TARGET])
    assert target["Wants"] == "qops-worker@w1.service qops-worker@w2.service qops-beat.service"
    beat = settings(files[deploy.BEAT_UNIT])
    assert beat["Type"] == "notify" and beat["StateDirectory"] == "qops"
    assert " beat -s /var/lib/qops/beat-schedule " in beat["ExecStart"]
    tmpfiles = files[deploy.TMPFILES]
    assert "d /run/qops 0755 qops qops -" in tmpfiles
    assert "d /var/log/qops 0755 qops qops -" in tmpfiles


@pytest.mark.parametrize("multi", [False, True], ids=["template", "multi"])
def test_every_signal_and_timeout_setting_says_why(multi: bool, tmp_path: Path) -> None:
    files = systemd_files(tmp_path, multi=multi)
    for name, text in files.items():
        if not name.endswith(".service"):
            continue
        lines = text.splitlines()
        for i, line in enumerate(lines):
            key = line.partition("=")[0]
            if key in SYSTEMD_COMMENTED or key.startswith("Timeout") or "Signal" in key:
                assert lines[i - 1].startswith("# ") and len(lines[i - 1]) > 20, \
                    f"{name}: {line!r} has no comment saying why"


def test_multi_unit_runs_qops_multi(tmp_path: Path) -> None:
    files = systemd_files(tmp_path, "--stop-timeout", "120", multi=True)
    assert deploy.WORKER_UNIT not in files
    s = settings(files[deploy.MULTI_UNIT])
    assert s["Type"] == "forking" and s["GuessMainPID"] == "no"
    assert "PIDFile" not in s
    assert " -A proj multi start w1 w2 --pidfile=/run/qops/%%n.pid " \
           "--logfile=/var/log/qops/%%n%%I.log " in s["ExecStart"]
    assert " multi stopwait w1 w2 --pidfile=/run/qops/%%n.pid --timeout 120" in s["ExecStop"]
    assert " multi restart w1 w2 --pidfile=/run/qops/%%n.pid --timeout 120" in s["ExecReload"]
    # stopwait's timeout, then QUIT and KILL (10 s a node), then a margin
    assert int(s["TimeoutStopSec"]) == 120 + 2 * 10 + 30
    assert settings(files[deploy.TARGET])["Wants"] == "qops-workers.service qops-beat.service"


def test_multi_commands_run_as_written(tmp_path: Path) -> None:
    """The --multi unit's ExecStart/ExecStop, with systemd's %% unescaping, really start
    and stop the nodes (a real qops multi on a SQLite broker)."""
    run = tmp_path / "run"
    files = systemd_files(tmp_path, "--rundir", str(run), "--logdir", str(tmp_path / "log"),
                          "--stop-timeout", "10", "-c", "1", multi=True)
    s = settings(files[deploy.MULTI_UNIT])
    env = qops_env(QOPS_BROKER_URL=f"sqlite:///{tmp_path}/broker.db", QOPS_WORKER_OPTS="")
    start = systemd_expand(s["ExecStart"], env)
    stop = systemd_expand(s["ExecStop"], env)
    try:
        r = subprocess.run(start, env=env, capture_output=True, text=True, timeout=90,
                           cwd=s["WorkingDirectory"])
        assert r.returncode == 0, r.stdout + r.stderr
        assert sorted(p.name for p in run.glob("*.pid")) == ["w1.pid", "w2.pid"]
        assert (tmp_path / "log" / "w1.log").exists()
    finally:
        r = subprocess.run(stop, env=env, capture_output=True, text=True, timeout=60,
                           cwd=s["WorkingDirectory"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert list(run.glob("*.pid")) == []


def systemd_expand(line: str, env: dict[str, str], instance: str = "w1") -> list[str]:
    """What systemd makes of an Exec*= line (enough of it for these units): %i, %H and
    %% specifiers, $VAR split into words, $$ a literal $, quotes."""
    import shlex

    def spec(m: re.Match[str]) -> str:
        return {"%": "%", "i": instance, "H": socket.gethostname()}[m.group(1)]

    words = []
    for word in shlex.split(line):
        if re.fullmatch(r"\$[A-Z_]+", word):
            words += env.get(word[1:], "").split()
            continue
        words.append(re.sub(r"%(.)", spec, word).replace("$$", "$"))
    return words


def test_worker_unit_reports_ready_to_systemd(tmp_path: Path) -> None:
    """Type=notify: the ExecStart line, run as systemd would, sends READY=1 on
    NOTIFY_SOCKET once the node answers; TERM then stops it warm (exit 0)."""
    files = systemd_files(tmp_path, "--logdir", str(tmp_path / "log"), "-c", "1")
    s = settings(files[deploy.WORKER_UNIT])
    broker = f"sqlite:///{tmp_path}/broker.db"
    sock_path = str(tmp_path / "notify.sock")
    env = qops_env(QOPS_BROKER_URL=broker, NOTIFY_SOCKET=sock_path)
    argv = systemd_expand(s["ExecStart"], env, instance="w7")
    assert "w7@" + socket.gethostname() in argv
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(sock_path)
        sock.settimeout(30)
        proc = subprocess.Popen(argv, env=env, cwd=s["WorkingDirectory"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            assert notified(sock, "READY=1")
            r = run_qops("-b", broker, "--json", "inspect", "ping", "-d",
                         f"w7@{socket.gethostname()}", "--timeout", "5")
            assert r.returncode == 0, r.stdout + r.stderr
            proc.send_signal(signal.SIGTERM)  # what KillSignal= sends
            assert notified(sock, "STOPPING=1")
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    assert (tmp_path / "log" / "w7.log").exists()  # %%n%%I reached qops as %n%I


def notified(sock: socket.socket, state: str) -> bool:
    """Read sd_notify datagrams until one carries ``state`` (False on timeout)."""
    try:
        while True:
            if state in sock.recv(4096).decode().splitlines():
                return True
    except TimeoutError:
        return False


# -- stop timeouts follow the app's time limits ---------------------------------------------


def test_stop_timeout_from_the_app_time_limits() -> None:
    app = App("limits")
    app.task(name="limits.short", time_limit=20)(lambda: None)
    app.task(name="limits.long", soft_time_limit=500, time_limit=600)(lambda: None)
    t = deploy.stop_timeout(app)
    assert t.seconds == 600 + deploy.STOP_MARGIN and "limits.long" in t.why
    app.task(name="limits.free")(lambda: None)  # no limit: may run for ever
    t = deploy.stop_timeout(app)
    assert t.seconds == deploy.DEFAULT_STOP_TIMEOUT and "limits.free" in t.why
    app.conf.task_time_limit = 900  # now the free one is bounded too
    t = deploy.stop_timeout(app)
    assert t.seconds == 900 + deploy.STOP_MARGIN
    assert deploy.stop_timeout(None).seconds == deploy.DEFAULT_STOP_TIMEOUT
    assert deploy.stop_timeout(app, override=45.5).seconds == 46


def test_generated_stop_timeouts_cover_the_longest_limit(tmp_path: Path) -> None:
    (tmp_path / "limited_app.py").write_text(
        "from qops import App\n"
        "app = App('limited_app')\n"
        "app.conf.task_time_limit = 120\n"
        "@app.task(time_limit=900)\n"
        "def long(): pass\n"
        "@app.task\n"
        "def short(): pass\n")
    out = tmp_path / "out"
    r = generate("-A", "limited_app", "generate", "systemd", "-o", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    unit = (out / deploy.WORKER_UNIT).read_text()
    assert settings(unit)["TimeoutStopSec"] == "930"
    assert "900 s (limited_app.long)" in unit
    conf = tmp_path / "qops.conf"
    r = generate("-A", "limited_app", "generate", "supervisor", "-o", str(conf), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "stopwaitsecs=930" in conf.read_text()


# -- supervisor: the text -------------------------------------------------------------------


def test_supervisor_config_as_an_operator_reads_it() -> None:
    r = run_qops("-A", "proj", "-b", "redis://:p%40ss@localhost:6379/0", "generate",
                 "supervisor", "--nodes", "2", "--user", "qops", "--workdir", "/srv/proj",
                 "--qops-bin", "/usr/local/bin/qops", "--stop-timeout", "100")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    sections = re.findall(r"^\[(.+)\]$", text, re.M)
    assert sections == ["program:qops-w1", "program:qops-w2", "program:qops-beat",
                        "group:qops"]
    assert "programs=qops-w1,qops-w2,qops-beat" in text
    w1 = settings(text.split("[program:qops-w1]")[1].split("[program:")[0])
    assert w1["command"] == "/usr/local/bin/qops -A proj worker -n w1@%%h -l INFO"
    assert w1["stopsignal"] == "TERM" and w1["stopwaitsecs"] == "100"
    assert w1["killasgroup"] == "true" and w1["stopasgroup"] == "false"
    assert w1["user"] == "qops" and w1["directory"] == "/srv/proj"
    assert w1["stdout_logfile"] == "/var/log/qops/w1.log" and w1["redirect_stderr"] == "true"
    # % escaped for supervisor, and the password kept out of the command line
    assert w1["environment"] == 'QOPS_BROKER_URL="redis://:p%%40ss@localhost:6379/0"'
    assert "p%%40ss" not in w1["command"]
    assert "QOPS_FORCE_ROOT" not in text
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.partition("=")[0] in SUPERVISOR_COMMENTED:
            assert lines[i - 1].startswith("; "), f"{line!r} has no comment saying why"


def test_supervisor_force_root_says_what_it_risks() -> None:
    r = run_qops("-A", "proj", "generate", "supervisor", "w1", "--force-root", "--no-beat",
                 "--workdir", "/srv/proj", "--stop-timeout", "60")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "\nuser=" not in text
    assert 'environment=QOPS_FORCE_ROOT="1"' in text
    comment = text.split('environment=QOPS_FORCE_ROOT="1"')[0].splitlines()[-1]
    assert comment.startswith("; RISK:") and "root" in comment


# -- the command line ----------------------------------------------------------------------


def test_stdout_and_json_forms() -> None:
    r = run_qops("generate", "systemd", "--workdir", "/srv/x", "--qops-bin", "/usr/bin/qops")
    assert r.returncode == 0, r.stderr
    headers = re.findall(r"^# ---- (.+) ----$", r.stdout, re.M)
    assert headers == [deploy.WORKER_UNIT, deploy.BEAT_UNIT, deploy.TARGET, deploy.ENV_FILE,
                       deploy.TMPFILES]
    # without -A: no app to read limits from (said so), and QOPS_APP must be set
    assert "TimeoutStopSec=300" in r.stdout and "no -A to read task time limits" in r.stdout
    assert "\nQOPS_APP=\n" in r.stdout
    r = run_qops("--json", "generate", "systemd", "--nodes", "3", "--workdir", "/srv/x",
                 "--qops-bin", "/usr/bin/qops")
    assert r.returncode == 0, r.stderr
    files = json.loads(r.stdout)
    assert "qops-worker@w3.service" in files[deploy.TARGET]


@pytest.mark.parametrize("args, message", [
    (["w1", "--nodes", "2"], "not both"),
    (["w1@host"], "node name"),
    (["--qops-bin", "qops"], "absolute"),
    (["--logdir", "logs"], "absolute"),
    (["-P", "gevent"], "unknown pool"),
    (["--stop-timeout", "0"], "positive"),
])
def test_bad_options_are_usage_errors(args: list[str], message: str) -> None:
    r = run_qops("generate", "systemd", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_workdir_need_not_exist_here(tmp_path: Path) -> None:
    """--workdir names the directory on the target host; the app is imported from here."""
    r = run_qops("-A", "proj", "generate", "supervisor", "--workdir", "/nonexistent/proj",
                 "--qops-bin", "/usr/bin/qops")
    assert r.returncode == 0, r.stderr
    assert "directory=/nonexistent/proj" in r.stdout
    assert "proj.tasks.add and others have no time limit" in r.stdout
