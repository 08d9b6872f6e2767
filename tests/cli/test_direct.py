"""A plain ``worker``, ``beat``, ``inspect``, ``control`` or ``status`` command line runs
without typer (qops.cli.direct) and gives what typer gives: the same option values, and
the same output and exit code; anything else is left to typer."""

from __future__ import annotations

import inspect
import re
import typing
from typing import Any

import pytest
import typer

from qops.cli import control as control_cmd
from qops.cli import direct, options, params
from qops.cli import main as cli_main
from qops.cli.beat import beat
from qops.cli.context import root
from qops.cli.worker import worker
from tests.cli.test_fast_paths import LONG_WAY, PROBE, _loaded, _python

#: worker command lines parsed here (each also parsed by typer and compared)
PLAIN = [
    [],
    ["-P", "solo", "-c", "1", "-Q", "q1,q2", "-n", "w1@%h", "-l", "WARNING"],
    ["--pool=threads", "--concurrency=4", "--queues=", "--hostname", "h"],
    ["--hostname=-h", "-c1024", "-Psolo", "-Qimages", "-E", "-B", "-D", "--check"],
    ["-n", "", "--loglevel", "INFO", "--prefetch-multiplier", "3",
     "--max-tasks-per-child=10", "-s", "sched.db", "-S", "state.db", "--uid", "1000",
     "--gid", "qops", "--umask", "022", "-f", "w.log", "--pidfile", "w.pid",
     "--task-events", "--beat", "--detach"],
    ["-n=x"], ["--queues", "a=b"], ["-c", "64", "-P", "prefork"],
]
#: left to typer: help, wrong or unusual forms (some of which typer accepts)
DECLINED = [
    ["-h"], ["--help"], ["-c", "0"], ["-c", "1025"], ["-c", "2x"], ["-c", "007"],
    ["-c", "+5"], ["-c=2"], ["-EB"], ["-Ec"], ["--detach=1"], ["-n", "-x"], ["-n"],
    ["-c", "2", "-c", "3"], ["-c", "2", "--concurrency", "2"], ["x"], ["--"], ["-"],
    ["--bogus"], ["-A", "proj"], ["--version"], ["-Q", "a", "extra"], ["--pool"],
]
BEAT_PLAIN = [
    [], ["-s", "sched.db", "-l", "INFO", "--max-interval", "2", "--show"],
    ["--max-interval=0.01", "-D", "--pidfile", "b.pid", "-f", "b.log", "--umask=022"],
    ["--max-interval", "1.5", "--uid", "qops", "--gid", "qops", "--loglevel=DEBUG"],
]
BEAT_DECLINED = [["--max-interval", "0.001"], ["--max-interval", "1e3"],
                 ["--max-interval", "2x"], ["-n", "x"], ["--show=1"], ["-s"], ["-h"]]
#: remote control: positional arguments (the command, then its arguments) among options
INSPECT_PLAIN = [
    [], ["ping"], ["--list"], ["ping", "-t", "0.5", "-d", "w1@h,w2@h"],
    ["-t", "2", "active"], ["conf", "with_defaults"], ["ping", "extra", "more"],
    ["stats", "--pattern", "w*", "--matcher", "pcre", "--timeout=3"], ["--list", "x"], [""],
]
INSPECT_DECLINED = [["-h"], ["ping", "-t", "0.001"], ["ping", "--"], ["-"], ["ping", "-x"],
                    ["ping", "-t"], ["ping", "-d", "-x"], ["ping", "--list=1"],
                    ["ping", "-t", "1", "-t", "2"]]
CONTROL_PLAIN = [
    ["rate_limit", "proj.tasks.add", "10/m"], ["revoke", "a", "b", "--terminate", "-s", "KILL"],
    ["-d", "w1@h", "shutdown"], ["pool_restart", "--reload"], ["time_limit", "t", "10", "20"],
    ["add_consumer", "q", "-t", "0.3", "--destination=w@h"],
]
CONTROL_DECLINED = [["rate_limit", "t", "--", "-5"], ["rate_limit", "t", "-5"],
                    ["--terminate=yes", "revoke", "a"], ["revoke", "a", "-s"]]
STATUS_PLAIN = [[], ["-t", "2"], ["--destination", "w1@h", "--timeout=0.5"]]
STATUS_DECLINED = [["x"], ["-t", "0"], ["--list"], ["--json"]]
#: global options (before the command, hoisted)
GLOBAL_PLAIN = [
    [], ["-A", "proj"], ["--app=proj", "-b", "redis://h/1", "--json", "-q", "--no-color",
                         "--debug", "--config", "c.yaml", "--workdir", "/tmp", "--compat",
                         "celery", "--result-backend", "rpc://"],
    ["-Aproj", "--quiet"],
]
GLOBAL_DECLINED = [["--version"], ["-A"], ["-A", "-q"], ["-q", "-q"], ["--json=1"],
                   ["--install-completion"], ["-h"]]


def _typers(func: Any, args: list[str]) -> dict[str, Any] | None:
    """The values typer (with its own converters) parses ``args`` into; None when it
    rejects them or stops (help, --version)."""
    app = typer.Typer()
    app.command()(params.typed(func))
    command = typer.main.get_command(app)
    try:
        ctx = command.make_context("qops", list(args), obj=None)
    except BaseException:  # a usage error, or --help / --version exiting
        return None
    # (a list argument given no value: () here, None where typer calls the command)
    return {k: None if v == () else v for k, v in ctx.params.items()}


@pytest.mark.parametrize(("func", "lines", "declined"), [
    (worker, PLAIN, DECLINED), (beat, BEAT_PLAIN, BEAT_DECLINED),
    (control_cmd.inspect, INSPECT_PLAIN, INSPECT_DECLINED),
    (control_cmd.control, CONTROL_PLAIN, CONTROL_DECLINED),
    (control_cmd.status, STATUS_PLAIN, STATUS_DECLINED), (root, GLOBAL_PLAIN, GLOBAL_DECLINED)])
def test_plain_lines_parse_as_typer_parses_them(func: Any, lines: list[list[str]],
                                                declined: list[list[str]]) -> None:
    for args in lines:
        parsed = direct.parse(func, args)
        assert parsed is not None, args
        mine = direct.callbacks(func, options.Context(None), parsed)
        theirs = _typers(func, args)
        assert theirs is not None, args
        assert {k: (v, type(v)) for k, v in mine.items()} == \
            {k: (v, type(v)) for k, v in theirs.items()}, args
    for args in declined:
        assert direct.parse(func, args) is None, args


def test_global_options_table_is_roots() -> None:
    decls = {}
    hints = typing.get_type_hints(root, include_extras=True)
    for name in list(inspect.signature(root).parameters)[1:]:
        option = next(m for m in hints[name].__metadata__ if isinstance(m, options.Option))
        for decl in option.decls:
            decls[decl] = hints[name].__origin__ is not bool  # takes a value
    del decls["--version"]  # answered by main itself, or left to typer
    assert decls == cli_main.GLOBAL_OPTIONS


COMPARED = [
    ["worker"],                                       # no app: exit 2
    ["-A", "no_such_mod_qq", "worker", "-P", "solo"],  # exit 2
    ["--json", "-A", "no_such_mod_qq", "worker"],     # the error document too
    ["-A", "proj", "worker", "-P", "bogus"],          # the pool's own check
    ["-A", "proj", "--workdir", "/no/such/dir", "worker", "-c", "2"],
    ["-A", "proj", "-b", "ftp://x", "worker", "--check"],
    ["-A", "proj", "-b", "sqlite:///{tmp}/b.db", "worker", "--check", "-c", "3"],
    ["worker", "-A", "proj", "-b", "sqlite:///{tmp}/b.db", "--check", "--json"],
    ["beat", "-l", "INFO"],                           # no app: exit 2
    ["-A", "proj", "-b", "sqlite:///{tmp}/b.db", "beat", "--show", "-s", "{tmp}/s"],
    ["--json", "-A", "proj", "-b", "sqlite:///{tmp}/b.db", "beat", "--show"],
    ["-b", "sqlite:///{tmp}/b.db", "inspect", "ping", "-t", "0.05"],  # nobody: 69
    ["--json", "-b", "sqlite:///{tmp}/b.db", "inspect", "-t", "0.05", "ping"],
    ["-b", "sqlite:///{tmp}/b.db", "inspect"],                 # the list, exit 2
    ["-b", "sqlite:///{tmp}/b.db", "inspect", "--list"],
    ["--json", "-b", "sqlite:///{tmp}/b.db", "control", "--list"],
    ["-b", "sqlite:///{tmp}/b.db", "inspect", "bogus"],       # exit 2
    ["-b", "sqlite:///{tmp}/b.db", "control", "ping"],        # an inspect command
    ["-b", "sqlite:///{tmp}/b.db", "control", "rate_limit", "t"],  # its arguments
    ["-b", "sqlite:///{tmp}/b.db", "control", "rate_limit", "t", "1/x", "-t", "0.05"],
    ["-b", "sqlite:///{tmp}/b.db", "inspect", "ping", "--matcher", "re", "--pattern", "x"],
    ["--json", "-b", "sqlite:///{tmp}/b.db", "status", "-t", "0.05", "-d", "w1@h"],
    ["-b", "ftp://x", "status"],
]


def _timeless(out: str) -> str:
    """``out`` without the time a broadcast took (--json's "elapsed")."""
    return re.sub(r'"elapsed": [0-9.e-]+', '"elapsed": _', out)


@pytest.mark.parametrize("args", COMPARED)
def test_direct_runs_end_as_typers_do(args: list[str], tmp_path: Any) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    fast = _python(PROBE, *args)
    long = _python(LONG_WAY, *cli_main.hoist_global_options(args))
    assert (fast.returncode, _timeless(fast.stdout)) == \
        (long.returncode, _timeless(long.stdout)), args
    assert [ln for ln in fast.stderr.splitlines() if not ln.startswith("LOADED")] == \
        long.stderr.splitlines(), args
    assert "typer" not in _loaded(fast), args


def test_what_is_not_plain_goes_to_typer() -> None:
    for args in (["worker", "-c", "0"], ["worker", "-h"], ["worker", "--bogus"],
                 ["beat", "--max-interval", "0"]):
        r = _python(PROBE, *args)
        assert r.returncode in (0, 2) and "typer" in _loaded(r), args
