"""Parameters declared without typer: ``Option`` and ``Argument`` record what
``typer.Option`` and ``typer.Argument`` are given, in the ``Annotated`` signature of the
function that runs a command (``worker``, ``beat``, ``inspect``, ``control``, ``status``
and the global options of ``qops.cli.context.root``), which stays the one place they are
written. typer gets that function with each turned into typer's own
(``qops.cli.params.typed``); ``qops.cli.direct`` reads the same signature to run a plain
command line without typer.

Also what both paths share: ``plain_value`` (an option value converted as typer's
converter would, where the answer is plain) and ``outcome`` (a command run, its errors
turned into one line and an exit code).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qops.errors import EX_FAILURE, QopsError

if TYPE_CHECKING:
    from qops.cli.terminal import Terminal


class Option:
    """``typer.Option``'s arguments (in ``Annotated``), kept until typer needs them."""

    def __init__(self, *decls: str, **kwargs: Any) -> None:
        self.decls = decls
        self.kwargs = kwargs


class Argument(Option):
    """``typer.Argument``'s arguments (in ``Annotated``): a positional parameter. Its
    shell completion is named, not given: ``completion="complete_task"`` is
    ``autocompletion=qops.cli.shell.complete_task`` (that module imports typer)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)


class Context:
    """What a command function gets as ``ctx``: typer's context on typer's path; without
    typer (qops.cli.direct), this, with the two attributes the commands read."""

    def __init__(self, obj: Any, invoked_subcommand: str | None = None) -> None:
        self.obj = obj
        self.invoked_subcommand = invoked_subcommand


# -- values ---------------------------------------------------------------------------

_INT = re.compile(r"-?(0|[1-9][0-9]{0,17})")
_FLOAT = re.compile(r"-?[0-9]{1,15}(\.[0-9]{1,15})?")
_NOT_PLAIN = object()


def plain_value(annotation: Any, low: float | None, high: float | None, value: Any) -> Any:
    """``value`` converted to ``annotation`` (str, bool, int, float, or list for
    list[str]) as typer's converter would, within the bounds ``low``/``high``, when the
    answer is plain; else ``_NOT_PLAIN`` (typer's converter judges and words the error)."""
    if annotation is str:
        return value if isinstance(value, str) else _NOT_PLAIN
    if annotation is bool:
        return value if type(value) is bool else _NOT_PLAIN
    if annotation is list:  # list[str]
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        return list(value) if ok else _NOT_PLAIN
    number: int | float
    if annotation is int:
        if type(value) is int:
            number = value
        elif isinstance(value, str) and _INT.fullmatch(value):
            number = int(value)
        else:
            return _NOT_PLAIN
    elif annotation is float:
        if type(value) in (int, float) or (isinstance(value, str) and _FLOAT.fullmatch(value)):
            number = float(value)
        else:
            return _NOT_PLAIN
    else:
        return _NOT_PLAIN
    if (low is not None and number < low) or (high is not None and number > high):
        return _NOT_PLAIN  # typer's converter words the error
    return number


def outcome(term: Terminal, call: Callable[[], Any],
            other: Callable[[Exception], int | None] | None = None) -> int:
    """Run ``call`` (a command): its exit code -- the int it returns, else 0 -- with every
    error as one line on stderr (the traceback only with ``--debug``) and, with
    ``--json``, as ``{"error": ..., "exit_code": ...}`` on stdout: a QopsError its own
    code, a SystemExit its code, anything else 1 unless ``other`` (typer's errors) gives
    the code, having reported it."""
    code: int
    try:
        rv = call()
        code = rv if isinstance(rv, int) else 0
    except QopsError as exc:
        _traceback(term)
        code = exc.exit_code
        term.fail(str(exc), code)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:
        handled = other(exc) if other is not None else None
        if handled is not None:
            return handled
        from qops.transports.base import one_line

        _traceback(term)
        code = EX_FAILURE
        term.fail(f"unexpected {type(exc).__name__}: {one_line(exc)} (this is a bug: "
                  "run again with --debug for the traceback)", code)
    if code and term.json_mode and not term.documents:
        term.json({"error": f"failed with exit code {code} (details on stderr)",
                   "exit_code": code})
    return code


def _traceback(term: Terminal) -> None:
    if term.debug:
        import traceback

        traceback.print_exc()
