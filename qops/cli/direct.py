"""A command run without typer when its command line is plain.

A worker (or beat) is started by this command line and keeps what it imported for as
long as it runs: typer and its copy of click, imported only to read ``-c 4 -Q images``,
cost every idle worker ~2 MB. Health checks and cron jobs run ``qops status`` and ``qops
inspect ping`` every few seconds, and importing typer was a fifth of their time. So the
parameters of ``worker``, ``beat``, ``inspect``, ``control``, ``status`` and the global
options are declared with ``qops.cli.options.Option`` and ``Argument`` -- the arguments
``typer.Option`` and ``typer.Argument`` take -- in the signature of the function that
runs the command, which stays the one place they are written:

- typer gets that function with each turned into typer's own
  (``qops.cli.params.typed``), so ``--help``, completion and every error are typer's;
- ``run`` reads the same signature and parses a *plain* command line itself: options
  spelt ``--name value``, ``--name=value``, ``-x value`` or ``-xvalue`` (a flag alone),
  each given once, with well-formed values (``plain_value``), and positional values
  (not starting with ``-``) for the command's arguments, in order, the last one taking
  the rest when it is a list. On anything else -- help, completion, more positional
  values than the command takes, ``-`` or ``--``, an unknown or repeated option, a
  value that starts with ``-``, a value typer's converter would have to judge -- it
  declines and typer parses the command line as before, so a mistake gets typer's
  message and exit code. Where it does parse, the values are the ones typer would give
  (tests/cli/test_direct.py parses command lines both ways and compares).

Both ways, the command's errors become one line and an exit code in
``qops.cli.options.outcome``.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qops.cli.options import _NOT_PLAIN, Argument, Context, Option, outcome, plain_value
from qops.errors import EX_FAILURE

if TYPE_CHECKING:
    from qops.cli.terminal import Terminal


# -- parsing --------------------------------------------------------------------------

#: Option arguments that change nothing in parsing (bounds are checked by plain_value)
_PLAIN_KWARGS = {"help", "min", "max"}
#: a command line giving an option with a callback (``--version``) is left to typer;
#: absent, its callback is called with the default as click does (``callbacks``)
_WHEN_GIVEN = {"callback", "is_eager"}
#: Argument arguments that change nothing in parsing (completion is typer's)
_ARGUMENT_KWARGS = {"help", "completion"}


class _Param:
    """One parameter of a command function, as this module parses it: an option, or a
    positional argument (of kind list: it takes every positional value left)."""

    def __init__(self, name: str, kind: Any, default: Any, option: Option) -> None:
        self.name = name
        self.kind = kind  # str, int, float, bool (a flag), or list (list[str])
        self.default = default
        self.low = option.kwargs.get("min")
        self.high = option.kwargs.get("max")
        self.callback = option.kwargs.get("callback")
        self.positional = isinstance(option, Argument)


@functools.cache
def _params(func: Callable[..., Any]) -> tuple[dict[str, _Param], list[_Param]] | None:
    """Option name -> parameter of ``func`` (a ``ctx`` first, then parameters declared
    with ``Option``), and its positional arguments in order (``Argument``); None when
    one of them is of a kind this module leaves to typer."""
    import inspect
    import typing

    names: dict[str, _Param] = {}
    positionals: list[_Param] = []
    for i, p in enumerate(inspect.signature(func, eval_str=True).parameters.values()):
        hint = p.annotation
        if i == 0 and hint is Context:
            continue
        meta = getattr(hint, "__metadata__", ())
        option = next((m for m in meta if isinstance(m, Option)), None)
        plain = _ARGUMENT_KWARGS if isinstance(option, Argument) else _PLAIN_KWARGS | _WHEN_GIVEN
        if option is None or set(option.kwargs) - plain or p.default is p.empty:
            return None  # typer's own parameters, or a required one
        base = typing.get_args(hint)[0]
        kinds = set(typing.get_args(base)) - {type(None)} or {base}
        kind = kinds.pop() if len(kinds) == 1 else None
        if kind == list[str]:
            kind = list
        if kind is bool and (p.default is not False or base is not bool):
            return None  # a flag is a bool that is False unless given
        param = _Param(p.name, kind, p.default, option)
        if param.positional:
            if kind not in (str, list) or positionals and positionals[-1].kind is list:
                return None
            positionals.append(param)
            continue
        if kind not in (str, int, float, bool):
            return None
        for decl in option.decls:
            names[decl] = param
    return names, positionals


def parse(func: Callable[..., Any], args: list[str]) -> dict[str, Any] | None:
    """The keyword arguments typer would call ``func`` with for the command line
    ``args``; None when it is not plain (see the module doc)."""
    found = _params(func)
    if found is None:
        return None
    names, positionals = found
    given: dict[str, Any] = {}
    i = pos = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and len(arg) > 2:
            name, eq, attached = arg.partition("=")
        elif arg.startswith("-") and len(arg) > 1:
            name, attached = arg[:2], arg[2:]
            eq = "=" if attached else ""
        elif arg == "-":
            return None
        else:  # a positional value: the next argument's, or one more of a list's
            if pos == len(positionals):
                return None  # more than the command takes
            positional = positionals[pos]
            if positional.kind is list:
                given.setdefault(positional.name, []).append(arg)
            else:
                given[positional.name] = arg
                pos += 1
            i += 1
            continue
        param = names.get(name)
        if param is None or param.name in given or param.callback is not None:
            return None
        if param.kind is bool:
            if eq:
                return None  # "--flag=x", or short flags run together
            value: Any = True
        else:
            if eq:
                raw = attached
            elif i + 1 < len(args) and not args[i + 1].startswith("-"):
                i += 1
                raw = args[i]
            else:
                return None
            value = plain_value(param.kind, param.low, param.high, raw)
            if value is _NOT_PLAIN:
                return None
        given[param.name] = value
        i += 1
    values = {p.name: p.default for p in [*names.values(), *positionals]}
    values.update(given)
    return values


def callbacks(func: Callable[..., Any], ctx: Context, values: dict[str, Any]
              ) -> dict[str, Any]:
    """``values`` (from ``parse``) after the callbacks of ``func``'s options: click calls
    each with the option's value -- the default here, since ``parse`` declines a command
    line that gives one -- and keeps what it returns as the value."""
    out = dict(values)
    found = _params(func)
    for param in (found[0] if found else {}).values():
        if param.callback is not None:
            out[param.name] = param.callback(ctx, out[param.name])
    return out


# -- running --------------------------------------------------------------------------


def run_direct(args: list[str], i: int, term: Terminal) -> int | None:
    """Run the command at ``args[i]`` (one of main's DIRECT) without typer: its exit
    code, or None when its command line is not plain (typer's turn)."""
    import importlib

    from qops.cli.main import COMMANDS

    func = getattr(importlib.import_module(f"qops.cli.{COMMANDS[args[i]]}"), args[i])
    try:
        return run(args, i, func, term)
    except KeyboardInterrupt:
        return 130


def run(args: list[str], command: int, func: Callable[..., Any], term: Terminal
        ) -> int | None:
    """Run ``func``, the command at ``args[command]`` (the global options before it,
    hoisted), without typer: its exit code, or None when the command line is not plain
    (typer's turn)."""
    from qops.cli.context import root
    from qops.cli.main import undecodable

    if os.environ.get("_QOPS_COMPLETE") or undecodable(args) is not None:
        return None  # shell completion; an argument typer reports
    global_values = parse(root, args[:command])
    values = parse(func, args[command + 1:])
    if global_values is None or values is None:
        return None
    ctx = Context(term, args[command])

    def call() -> Any:
        # what typer's main does around the callbacks of a command line
        try:
            root(ctx, **callbacks(root, ctx, global_values))
            return func(ctx, **callbacks(func, ctx, values))
        except EOFError:
            print(file=sys.stderr, flush=True)  # and typer's Abort
            term.fail("aborted", EX_FAILURE)
            return EX_FAILURE
        except KeyboardInterrupt:
            return 130
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            sys.stdout = _Pacified(sys.stdout)
            sys.stderr = _Pacified(sys.stderr)
            raise SystemExit(1) from None

    return outcome(term, call)


class _Pacified:
    """A stream whose flush ignores a closed pipe (click's PacifyFlushWrapper): what
    typer leaves in place of stdout and stderr after writing to one failed so."""

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped

    def flush(self) -> None:
        try:
            self.wrapped.flush()
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)
