"""``qops demo`` as ``make demo`` runs it: a subprocess with the example app on its path.

The demo starts two detached nodes with multi. Its directory is put under the test's
tmp_path (TMPDIR), so any process whose command line names tmp_path is one of the
demo's nodes (or their pool processes): the tests check that none is left, and the
fixture stops any that is, by pid and process group.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qops.ops import pidfile
from tests.helpers import EXAMPLES, ROOT, run_qops

# call -> (state, result) as the demo shows them
EXPECTED = {
    "add(2, 3)": ("SUCCESS", "5"),
    "mul(4, 5)": ("SUCCESS", "20"),
    "xsum([1..10])": ("SUCCESS", "55"),
    "add(2, 2) | mul(8)": ("SUCCESS", "32"),
    "sleep(0.5)": ("SUCCESS", "0.5"),
    "fail('kaboom')": ("FAILURE", "ValueError: kaboom"),
}
AS_ROOT = os.geteuid() == 0
ROOT_NOTE = "the demo sets QOPS_FORCE_ROOT=1 for its own worker nodes only"

Demo = Callable[..., subprocess.CompletedProcess[str]]


def demo_env(tmp_path: Path) -> dict[str, str]:
    """A user's shell running ``make demo``: no QOPS_* settings (the root guard's
    QOPS_FORCE_ROOT included: the demo must relax it by itself), the example app on
    PYTHONPATH, and TMPDIR pointing into tmp_path."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("QOPS_") and k != "C_FORCE_ROOT"}
    env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLES), str(ROOT)])
    env["TMPDIR"] = str(tmp_path)
    return env


def processes_naming(path: Path) -> list[int]:
    """Live processes whose command line names ``path`` (the demo's nodes use it in
    their --pidfile and --logfile)."""
    needle = str(path).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and pidfile.pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def stop_leftovers(tmp_path: Path) -> None:
    for path in tmp_path.rglob("*.pid"):
        info = pidfile.read(path)
        if info and info.running:
            _kill_group(info.pid)
    for pid in processes_naming(tmp_path):
        _kill_group(pid)


def _kill_group(pid: int) -> None:
    try:
        pgid = os.getpgid(pid)
        if pgid == os.getpgid(0):
            os.kill(pid, signal.SIGKILL)  # never our own group
        else:
            os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return run_qops("demo", *args, env=demo_env(tmp_path), timeout=120)

    yield run
    stop_leftovers(tmp_path)


def assert_root_note(r: subprocess.CompletedProcess[str]) -> None:
    if AS_ROOT:
        assert ROOT_NOTE in r.stderr and "root guard" in r.stderr
    else:
        assert "QOPS_FORCE_ROOT" not in r.stderr + r.stdout


def assert_all_gone(pids: list[int], tmp_path: Path) -> None:
    assert len(pids) == 2
    assert not [p for p in pids if pidfile.pid_alive(p)]
    assert processes_naming(tmp_path) == []


def line_match(pattern: str, text: str) -> re.Match[str]:
    found = re.search(f"^{pattern}$", text, re.M)
    assert found, f"no line matching {pattern!r} in:\n{text}"
    return found


def test_demo_starts_two_nodes_inspects_and_stops_them(demo: Demo, tmp_path: Path) -> None:
    r = demo("--keep")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    lines = out.splitlines()
    # each step shows the command a user would type
    start_cmd = next(line for line in lines if " multi start w1 w2 " in line)
    assert start_cmd.startswith("$ QOPS_FORCE_ROOT=1 qops -A proj" if AS_ROOT
                                else "$ qops -A proj")
    assert "$ qops -A proj inspect stats" in lines
    assert any(line.startswith("$ qops multi stopwait w1 w2 ") for line in lines)
    started = dict(re.findall(r"^> (w[12])@\S+: OK \(pid (\d+)\) started$", out, re.M))
    assert sorted(started) == ["w1", "w2"], out
    # the results table
    for call, expected in EXPECTED.items():
        row = next(line for line in lines if line.startswith(call + " "))
        cells = row[len(call):].split(None, 2)  # task id, state, result
        assert (cells[1], cells[2].strip()) == expected, row
    # both nodes answered inspect stats, with the pids multi reported
    answered = dict(re.findall(r"^(w[12])@\S+\s+(\d+)\s+prefork x2\s+\d+$", out, re.M))
    assert answered == started, out
    line_match(r"2 nodes answered in \d+ ms\.", out)
    # stopped by multi stopwait, warm
    stopped = dict(re.findall(r"^> (w[12])@\S+: OK \(pid (\d+)\) stopped by TERM$", out,
                              re.M))
    assert stopped == started, out
    assert float(line_match(r"done in ([\d.]+)s\.", out).group(1)) < 30
    kept = Path(line_match(r"demo files kept in (.+)", out).group(1))
    assert kept.parent == tmp_path and (kept / "broker.db").exists()
    assert not list(kept.glob("*.pid"))  # stopwait removed them
    for name in ("w1", "w2"):
        assert "stopped." in (kept / f"{name}.log").read_text()
    assert_all_gone([int(p) for p in started.values()], tmp_path)
    assert_root_note(r)


def test_demo_json(demo: Demo, tmp_path: Path) -> None:
    r = demo("--json")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)  # one JSON document, nothing else on stdout
    assert {row["call"]: (row["state"], row["result"]) for row in doc["results"]} == EXPECTED
    assert [(o["node"].split("@")[0], o["result"], o["message"]) for o in doc["nodes"]] == \
        [("w1", "ok", "started"), ("w2", "ok", "started")]
    pids = {o["node"]: o["pid"] for o in doc["nodes"]}
    assert doc["inspect"]["command"] == "stats"
    assert {n: i["pid"] for n, i in doc["inspect"]["nodes"].items()} == pids
    assert doc["inspect"]["elapsed"] < 2
    assert [(o["node"], o["pid"], o["state"], o["message"]) for o in doc["stopped"]] == \
        [(n, p, "stopped", "stopped by TERM") for n, p in pids.items()]
    # without --keep the demo's directory is gone
    assert doc["workdir"] is None and not list(tmp_path.glob("qops-demo-*"))
    assert_all_gone(list(pids.values()), tmp_path)
    assert_root_note(r)


def test_demo_leaves_the_callers_environment_alone(demo: Demo, tmp_path: Path) -> None:
    """QOPS_FORCE_ROOT (and the demo's broker) reach the demo's nodes only."""
    report = tmp_path / "report.json"
    script = (
        "import json, os, sys\n"
        "from qops.cli.main import main\n"
        "try:\n"
        "    main(['demo', '--json'])\n"
        "    code = 0\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "env = {k: v for k, v in os.environ.items() if k.startswith('QOPS_')}\n"
        "open(sys.argv[1], 'w').write(json.dumps({'code': code, 'env': env}))\n")
    r = subprocess.run([sys.executable, "-c", script, str(report)], env=demo_env(tmp_path),
                       cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(report.read_text()) == {"code": 0, "env": {}}, r.stderr
    doc = json.loads(r.stdout)
    assert_all_gone([o["pid"] for o in doc["nodes"]], tmp_path)
    assert_root_note(r)
