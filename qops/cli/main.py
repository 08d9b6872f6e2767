"""``qops`` command line: the entry point. The only package that imports typer and rich
(``root``, imported here only when typer has work to do).

A worker or beat keeps what its command line imported for as long as it runs, and
health checks and cron jobs run ``qops --version``, ``qops status`` and ``qops inspect
ping`` every few seconds: a plain ``worker``, ``beat``, ``inspect``, ``control`` or
``status`` command line (``DIRECT``) is run without typer (``direct``), and
``--version`` is answered before typer is imported. Otherwise a command line naming a
command registers only the module of that command (``COMMANDS``); ``qops --help``,
completion and unknown commands register them all.

Global options may stand before or after the command (``qops -A proj worker`` and
``qops worker -A proj`` are the same): ``main`` moves them to the front before typer
parses, so every command sees them in one place. Errors become their exit codes in
``root.run``.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any, NoReturn

from qops.cli.terminal import Terminal

# Global options: name -> takes a value
GLOBAL_OPTIONS: dict[str, bool] = {
    "-A": True, "--app": True, "-b": True, "--broker": True, "--result-backend": True,
    "--config": True, "--workdir": True, "--compat": True,
    "-q": False, "--quiet": False, "--json": False, "--no-color": False, "--debug": False,
}

#: the modules of qops.cli that register commands, in the order of ``qops --help``
MODULES = ("worker", "tasks", "control", "queues", "events_cmd", "multi", "beat",
           "config_cmd", "dlq", "demo", "generate", "monitor")

#: command -> the module registering it (a test checks this against the modules)
COMMANDS: dict[str, str] = {
    "worker": "worker", "call": "tasks", "result": "tasks", "control": "control",
    "inspect": "control", "status": "control", "purge": "queues", "queues": "queues",
    "events": "events_cmd", "multi": "multi", "beat": "beat", "schedule": "beat",
    "config": "config_cmd", "dlq": "dlq", "demo": "demo", "generate": "generate",
    "top": "monitor", "exporter": "monitor",
}


#: commands run without typer when their command line is plain (qops.cli.direct): the
#: function of that name in their module, its parameters declared with qops.cli.options
DIRECT = ("worker", "beat", "inspect", "control", "status")

#: commands that run until stopped: they keep the garbage collector and get the whole exit
LONG_RUNNING = ("worker", "beat", "events", "top", "exporter")


def hoist_global_options(argv: list[str]) -> list[str]:
    """Move global options found after the command to the front (stops at ``--``)."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i:])
            break
        name = arg.split("=", 1)[0]
        if name in GLOBAL_OPTIONS:
            if GLOBAL_OPTIONS[name] and "=" not in arg:
                front.extend(argv[i:i + 2])
                i += 2
                continue
            front.append(arg)
        else:
            rest.append(arg)
        i += 1
    return front + rest


def _leading_globals(args: list[str]) -> tuple[set[str], int]:
    """The names of the global options at the front of ``args`` (hoisted there) and the
    index of the first argument after them."""
    flags = set()
    i = 0
    while i < len(args) and args[i].split("=", 1)[0] in GLOBAL_OPTIONS:
        name = args[i].split("=", 1)[0]
        flags.add(name)
        i += 2 if GLOBAL_OPTIONS[name] and "=" not in args[i] else 1
    return flags, i


def _early_terminal(args: list[str]) -> Terminal:
    """The Terminal for the flags among the global options at the front of ``args``,
    before typer parses: usage errors need it too."""
    flags, _ = _leading_globals(args)
    return Terminal(json_mode="--json" in flags, quiet=bool(flags & {"-q", "--quiet"}),
                    no_color="--no-color" in flags, debug="--debug" in flags)


def undecodable(args: list[str]) -> str | None:
    """The first argument that is not valid UTF-8 (Python keeps its bytes as lone
    surrogates), shown with its bad bytes escaped; None when all are fine."""
    for arg in args:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raw = arg.encode("utf-8", "surrogateescape")
            return raw.decode("utf-8", "backslashreplace")
    return None


def show_version(term: Terminal) -> None:
    """``qops --version``: ``qops X.Y.Z``, or ``{"version": ...}`` with --json."""
    from qops import __version__

    if term.json_mode:
        term.json({"version": __version__})
    else:
        print(f"qops {__version__}")


def modules_for(args: list[str]) -> tuple[str, ...]:
    """The modules to register for the command line ``args`` (global options hoisted):
    the named command's, or all of them (help, completion, a mistyped command)."""
    _, i = _leading_globals(args)
    module = COMMANDS.get(args[i]) if i < len(args) else None
    return (module,) if module else MODULES


def main(argv: list[str] | None = None) -> NoReturn:
    """Run the command line ``argv`` (default: the process's) and exit with its code."""
    args = hoist_global_options(list(sys.argv[1:] if argv is None else argv))
    _, i = _leading_globals(args)  # the command's index
    # A short command of the program (not a test calling main; not LONG_RUNNING) runs
    # with the garbage collector off: its passes during the imports were ~10 ms of
    # ``qops --help``, and a short command makes little cyclic garbage (see ``end``).
    quick = argv is None and (i >= len(args) or args[i] not in LONG_RUNNING)
    if quick:
        gc.disable()
    term = _early_terminal(args)
    if args[i:] == ["--version"] and undecodable(args) is None:
        show_version(term)  # what typer would print (its --version is eager), sooner
        end(0, quick)
    if "--no-color" in args[:args.index("--") if "--" in args else None]:
        os.environ["NO_COLOR"] = "1"
    if i < len(args) and args[i] in DIRECT and not {"-h", "--help"} & set(args):
        from qops.cli.direct import run_direct

        code = run_direct(args, i, term)  # None when typer must parse the command line
        if code is not None:
            end(code, quick)
    if os.environ.get("NO_COLOR") or not args or {"-h", "--help"} & set(args):
        # a help screen is likely (NO_COLOR: usage errors too): typer's renderer, lighter
        from qops.cli.richhelp import rich_utils

        rich_utils()
    from qops.cli import root

    command = root.help_root() if args[i:] in (["-h"], ["--help"]) else \
        root.register(modules_for(args))
    try:
        code = root.run(args, term, command)
    except KeyboardInterrupt:
        code = 130
    end(code, quick)


def end(code: int, quick: bool) -> NoReturn:
    """Exit with ``code``. ``quick`` (see ``main``): every object made so far is first
    moved out of the garbage collector's sight (``gc.freeze``), so that the
    interpreter's exit skips a full collection of them: ~40 ms after ``qops inspect
    ping`` had its answer (a fifth of the command), for memory the OS frees anyway. The
    rest of the exit is as usual: exit handlers (the app's connections are closed by
    one), flushed streams, objects released as their last reference goes. Objects
    caught in reference cycles are not finalized then, which Python never promises at
    exit anyway."""
    if quick:
        gc.freeze()
    raise SystemExit(code)


def __getattr__(name: str) -> Any:
    """``cli``: the root command with every command registered (for tests and tools
    that walk the command tree)."""
    if name == "cli":
        from qops.cli import root

        return root.register()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
