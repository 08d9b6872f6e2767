"""The habits of a shell user: completion, an example in every --help, NO_COLOR and
--no-color, and errors on one line when stderr is not a terminal."""

from __future__ import annotations

import os
import pty
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, qops_env, run_qops

#: an SGR sequence that sets a colour (foreground, background, 256/truecolor)
ESCAPE = re.compile(r"\x1b\[")  # any style: colour, bold, dim
COLOUR = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-8]|4[0-8]|9[0-7]|10[0-7])(?:;[0-9;]*)?m")


def complete(words: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> list[str]:
    """What bash completion offers for the last word of ``words`` (click's protocol)."""
    e = env or qops_env()
    e.update(_QOPS_COMPLETE="complete_bash", COMP_WORDS=words,
             COMP_CWORD=str(len(words.split(" ")) - 1))
    r = subprocess.run([sys.executable, "-m", "qops"], env=e, capture_output=True, text=True,
                       timeout=60, cwd=str(cwd))
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.splitlines() if line]


def test_completion_scripts_for_bash_zsh_fish(tmp_path: Path) -> None:
    # typer finds the shell among qops's parents; '; exit $?' keeps bash from exec'ing
    # qops in its place (then no parent need be a shell: CI started from a service)
    qops = f"{shlex.quote(sys.executable)} -m qops"
    r = subprocess.run(["bash", "-c", f"{qops} --show-completion; exit $?"], env=qops_env(),
                       capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    assert "_QOPS_COMPLETE=complete_bash" in r.stdout and "-F _qops_completion qops" in r.stdout
    r = subprocess.run(["bash", "-c", f"{qops} --install-completion; exit $?"],
                       env=qops_env(HOME=str(tmp_path)), capture_output=True, text=True,
                       timeout=60, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    assert "_QOPS_COMPLETE" in (tmp_path / ".bash_completions" / "qops.sh").read_text()
    assert "qops.sh" in (tmp_path / ".bashrc").read_text()
    # the protocols zsh and fish speak
    for shell in ("zsh", "fish"):
        e = qops_env(_QOPS_COMPLETE=f"complete_{shell}", _TYPER_COMPLETE_ARGS="qops mu",
                     _TYPER_COMPLETE_FISH_ACTION="get-args")
        r = subprocess.run([sys.executable, "-m", "qops"], env=e, capture_output=True,
                           text=True, timeout=60, cwd=str(ROOT))
        assert r.returncode == 0 and "multi" in r.stdout, (shell, r.stdout, r.stderr)
    assert complete("qops mu") == ["multi"]


def test_completes_node_names_from_the_rundir(tmp_path: Path) -> None:
    for name in ("w1.pid", "w2.pid", "w2.pid.cmd", "w3.pid.cmd", "other.log"):
        (tmp_path / name).write_text("1\n")
    assert complete(f"qops multi stop --rundir {tmp_path} ") == ["w1", "w2", "w3"]
    assert complete(f"qops multi restart w1 --rundir={tmp_path} w") == ["w2", "w3"]
    assert complete("qops multi status ", cwd=tmp_path) == ["w1", "w2", "w3"]
    assert complete("qops multi start ", cwd=tmp_path) == []  # new nodes: not completed


def test_completes_task_names_only_with_dash_a() -> None:
    assert complete("qops call -A proj proj.tasks.a") == ["proj.tasks.add"]
    assert complete("qops -A proj control rate_limit proj.tasks.m") == [
        "proj.tasks.mark", "proj.tasks.mul"]
    assert "proj.tasks.sleep" in complete("qops control time_limit -A proj proj.tasks.")
    assert complete("qops -A proj control revoke proj") == []
    assert complete("qops control rate_") == ["rate_limit"]
    # without -A the app is not imported, even when QOPS_APP names one
    assert complete("qops call proj.tasks.a", env=qops_env(QOPS_APP="proj")) == []


def _commands() -> list[tuple[str, object]]:
    import typer.main

    from qops.cli.main import cli

    out: list[tuple[str, object]] = []

    def walk(cmd: object, path: str) -> None:
        out.append((path, cmd))
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(typer.main.get_command(cli), "")
    return out


def test_every_help_has_an_example_that_parses(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from qops.cli.main import main

    commands = _commands()
    assert len(commands) > 20
    for path, cmd in commands:
        r = run_qops(*path.split(), "--help") if path in ("", "worker", "purge", "dlq") else None
        if r is not None:
            assert r.returncode == 0 and "Examples:" in r.stdout, (path, r.stdout)
        epilog = getattr(cmd, "epilog", None) or ""
        assert epilog.startswith("Examples:"), f"'qops {path} --help' has no example"
        for line in epilog.splitlines()[1:]:
            words = shlex.split(line)
            while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                words.pop(0)  # VAR=value before the command
            if not words or words[0] != "qops":
                continue
            monkeypatch.setattr(os, "environ", dict(os.environ))
            with pytest.raises(SystemExit) as exc:
                main([*words[1:], "--help"])  # parses every option, runs nothing
            assert exc.value.code == 0, (line, capsys.readouterr().err)
    capsys.readouterr()


def test_no_help_text_is_eaten_as_rich_markup() -> None:
    """Help is rendered with rich markup: an unescaped ``[metrics]`` vanished from
    "needs qops[metrics]". Every ``[`` written in a help text shows."""
    from rich.text import Text

    texts = []
    for path, cmd in _commands():
        texts += [(path, getattr(cmd, "help", None)), (path, getattr(cmd, "epilog", None))]
        texts += [(f"{path} {p.name}", getattr(p, "help", None))
                  for p in getattr(cmd, "params", [])]
    checked = 0
    for where, text in texts:
        if text and "[" in text:
            checked += 1
            assert Text.from_markup(text).plain.count("[") == text.count("["), (where, text)
    assert checked >= 3


def _help(*args: str, **env: str) -> str:
    r = run_qops(*args, "--help", env=qops_env(FORCE_COLOR="1", **env))
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_no_color_and_dash_dash_no_color_in_help_screens() -> None:
    assert COLOUR.search(_help())  # forced to a terminal: colours
    assert COLOUR.search(_help("purge"))
    assert not ESCAPE.search(_help(NO_COLOR="1"))
    assert not ESCAPE.search(_help("purge", NO_COLOR="yes"))
    assert not ESCAPE.search(_help("--no-color"))
    assert not ESCAPE.search(_help("purge", "--no-color"))  # after the command too


def _stderr_on_a_tty(*args: str, **env: str) -> str:
    master, slave = pty.openpty()
    try:
        p = subprocess.run([sys.executable, "-m", "qops", *args], env=qops_env(**env),
                           stdout=subprocess.DEVNULL, stderr=slave, timeout=60, cwd=str(ROOT))
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        assert p.returncode != 0
        return b"".join(chunks).decode()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_no_color_in_error_lines() -> None:
    bad = ("-b", "ftp://x", "call", "t")
    assert COLOUR.search(_stderr_on_a_tty(*bad))
    assert not COLOUR.search(_stderr_on_a_tty(*bad, NO_COLOR="1"))
    assert not COLOUR.search(_stderr_on_a_tty("--no-color", *bad))
    assert not COLOUR.search(_stderr_on_a_tty(*bad, "--no-color"))
    assert not COLOUR.search(_stderr_on_a_tty("worker", "--bogus", "--no-color"))
    assert "qops: error" in _stderr_on_a_tty(*bad, NO_COLOR="1")


def test_errors_stay_on_one_line_when_stderr_is_not_a_terminal() -> None:
    option = "--no-such-option-" + "x" * 120
    r = run_qops("worker", option)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert errors == [f"qops: error: No such option: {option}"], r.stderr
    assert not re.search("[╭│╰]", r.stderr)
    r = run_qops("no-such-command-" + "y" * 100)
    assert r.returncode == 2 and len([ln for ln in r.stderr.splitlines() if "error" in ln]) == 1
    module = "no_such_module_" + "z" * 120
    r = run_qops("-A", module, "worker")
    assert r.returncode == 2
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("qops: error:") and module in line
