"""The command line's short cuts give what the long way gives: ``--version`` before typer,
the root help screen from stand-ins, one command module registered, option values
converted without pydantic, typer's help renderer without rich.markdown/traceback."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import typer

from qops.cli import main as cli_main
from qops.cli import options
from tests.helpers import ROOT, qops_env, run_qops

# Prints the modules of interest loaded by a command line, at exit (stderr).
PROBE = ("import atexit, sys\n"
         "heavy = ('typer', 'rich', 'pydantic', 'markdown_it', 'pygments', 'qops.cli.')\n"
         "atexit.register(lambda: print('LOADED', sorted({m if m.startswith('qops') else "
         "m.split('.')[0] for m in sys.modules if m.startswith(heavy)}), file=sys.stderr))\n"
         "from qops.cli.main import main\n"
         "main(sys.argv[1:])\n")

# Runs a command line the long way: every command registered, typer parsing it all.
LONG_WAY = ("import sys\n"
            "from qops.cli import root\n"
            "from qops.cli.main import _early_terminal\n"
            "args = sys.argv[1:]\n"
            "sys.exit(root.run(args, _early_terminal(args), root.register()))\n")


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=qops_env(COLUMNS="100"), cwd=str(ROOT), timeout=60)


def _loaded(out: subprocess.CompletedProcess[str]) -> list[str]:
    line = next(x for x in out.stderr.splitlines() if x.startswith("LOADED"))
    return list(eval(line[len("LOADED "):]))  # a list literal printed by PROBE


def loaded(*args: str) -> list[str]:
    return _loaded(_python(PROBE, *args))


def test_version_before_typer() -> None:
    for args in (["--version"], ["--version", "--json"], ["-A", "proj", "--version"]):
        fast = _python(PROBE, *args)
        long = _python(LONG_WAY, *cli_main.hoist_global_options(args))
        assert fast.returncode == long.returncode == 0
        assert fast.stdout == long.stdout, args
        assert _loaded(fast) == ["qops.cli.main", "qops.cli.terminal"]  # no typer, rich


def test_root_help_from_stand_ins_is_typers_screen() -> None:
    for args in (["--help"], ["-h", "--no-color"]):
        fast = _python(PROBE, *args)
        long = _python(LONG_WAY, *args)
        assert fast.returncode == long.returncode == 0
        assert fast.stdout == long.stdout, args
        assert "markdown_it" not in _loaded(fast) and "pygments" not in _loaded(fast)
    for command in cli_main.COMMANDS:
        assert f" {command} " in fast.stdout, command


def test_commands_table_matches_the_modules() -> None:
    found: dict[str, str] = {}
    for module in cli_main.MODULES:
        app = typer.Typer()
        __import__(f"qops.cli.{module}", fromlist=["register"]).register(app)
        names = [c.name for c in app.registered_commands] + \
            [g.name for g in app.registered_groups]
        found.update(dict.fromkeys(names, module))
    assert found == cli_main.COMMANDS


def test_one_command_imports_its_module_only_and_no_pydantic() -> None:
    mods = loaded("inspect", "--list", "--")  # "--": not plain, typer parses it
    assert "pydantic" not in mods and "rich" not in mods
    assert [m for m in mods if m.startswith("qops.cli.")] == [
        "qops.cli.context", "qops.cli.control", "qops.cli.direct", "qops.cli.main",
        "qops.cli.options",
        "qops.cli.params", "qops.cli.root", "qops.cli.shell", "qops.cli.terminal"]


def test_health_checks_run_without_typer() -> None:
    for args in (["inspect", "--list"], ["status", "-t", "0.01"],
                 ["control", "rate_limit", "t", "10/m", "-d", "w1@h", "-t", "0.01"]):
        mods = loaded("-b", "memory://", *args)
        assert [m for m in mods if not m.startswith("qops.cli.")] == [], args
        assert [m for m in mods if m.startswith("qops.cli.")] == [
            "qops.cli.context", "qops.cli.control", "qops.cli.direct", "qops.cli.main",
            "qops.cli.options", "qops.cli.terminal"], args


def test_bad_values_keep_typers_messages() -> None:
    r = run_qops("inspect", "ping", "-t", "0.001")
    assert r.returncode == 2 and "greater than or equal to 0.01" in r.stderr
    r = run_qops("worker", "-c", "2x")
    assert r.returncode == 2 and "valid integer" in r.stderr


@pytest.mark.parametrize(("annotation", "low", "high", "values"), [
    (str, None, None, ["", "x", "-b", "é"]),
    (bool, None, None, [True, False]),
    (int, None, None, [0, 7, -3, "0", "7", "-3", "-0", "123456789012"]),
    (int, 1, 64, [1, 64, "1", "64"]),
    (float, None, None, [1, 1.0, 0, "1", "1.5", "-2.25", "0.01", "10"]),
    (float, 0.01, None, [0.01, "0.01", 5, "5", "1.0"]),
    (list, None, None, [(), ("a", "b"), ["x"]]),
])
def test_plain_values_are_what_typer_gives(annotation: Any, low: Any, high: Any,
                                           values: list[Any]) -> None:
    from typer._coercion import build_runtime_param, resolve_type_descriptor
    from typer.models import OptionInfo

    kind = list[str] if annotation is list else annotation
    desc = resolve_type_descriptor(kind, OptionInfo(min=low, max=high))
    typers = build_runtime_param(desc)
    for value in values:
        mine = options.plain_value(annotation, low, high, value)
        assert mine is not options._NOT_PLAIN, value
        theirs = typers._coerce_value(value, param=None, ctx=None)  # type: ignore[arg-type]
        assert (mine, type(mine)) == (theirs, type(theirs)), value


@pytest.mark.parametrize(("annotation", "low", "high", "value"), [
    (int, None, None, "007"), (int, None, None, "+5"), (int, None, None, " 5"),
    (int, 1, 64, 0), (int, 1, 64, "65"), (float, 0.01, None, "0.001"),
    (float, None, None, "1e3"), (float, None, None, True), (str, None, None, b"x"),
    (bool, None, None, "yes"), (list, None, None, ("a", 1)),
])
def test_the_rest_goes_to_typer(annotation: Any, low: Any, high: Any, value: Any) -> None:
    assert options.plain_value(annotation, low, high, value) is options._NOT_PLAIN


# Prints, at exit, whether the objects were frozen away from the last collection and
# the collector was off.
FREEZE_PROBE = ("import atexit, gc, sys\n"
                "atexit.register(lambda: print('FROZEN', gc.get_freeze_count() > 0 and "
                "not gc.isenabled(), file=sys.stderr))\n"
                "from qops.cli.main import main\n"
                "if sys.argv[1] == 'as-function':\n"
                "    main(sys.argv[2:])\n"
                "sys.argv = ['qops', *sys.argv[1:]]\n"
                "main()\n")


def _frozen(*args: str) -> tuple[int, bool]:
    r = _python(FREEZE_PROBE, *args)
    line = next(x for x in r.stderr.splitlines() if x.startswith("FROZEN"))
    return r.returncode, line == "FROZEN True"


def test_short_commands_run_without_the_collector_and_close_the_app(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/b.db"
    assert _frozen("--version") == (0, True)
    assert _frozen("-b", url, "queues") == (0, True)  # typer's path
    assert _frozen("-b", url, "inspect", "ping", "-t", "0.05") == (69, True)  # direct
    # long-running commands keep the collector and get the whole exit; so does a
    # caller of main() as a function
    assert _frozen("worker", "-P", "bogus") == (2, False)
    assert _frozen("beat", "--max-interval", "0") == (2, False)
    assert _frozen("-b", url, "events", "--bogus") == (2, False)
    assert _frozen("as-function", "--version") == (0, False)
    # the app's database was closed at exit, not left to the collector: no WAL files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.db"]
