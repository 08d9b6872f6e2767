"""All CLI output goes through here: tables, JSON, errors, exit codes.

``--json`` prints exactly one JSON document on stdout, on success and on error (then
``{"error": "...", "exit_code": N}``); logs, warnings and error lines go to stderr.
rich is imported only when a table is drawn.

One Terminal serves a whole run: ``main`` makes it before the command line is parsed
(so that a usage error, too, gets its JSON document) and the root callback sets it up
from the global options. ``documents`` counts what went to stdout, so that ``fail``
never adds a second document after a command printed its own.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any, Literal, NoReturn

from qops.errors import EX_FAILURE, QopsError


class Terminal:
    def __init__(self, *, json_mode: bool = False, quiet: bool = False,
                 no_color: bool = False, debug: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self.no_color = no_color or bool(os.environ.get("NO_COLOR"))
        self.debug = debug
        self.documents = 0  # JSON documents printed on stdout
        self._console: Any = None
        self._err_console: Any = None

    def _rich(self, err: bool = False) -> Any:
        from rich.console import Console

        if err:
            if self._err_console is None:
                self._err_console = Console(stderr=True, highlight=False,
                                            color_system=self._colors())
            return self._err_console
        if self._console is None:
            self._console = Console(highlight=False, soft_wrap=True,
                                    color_system=self._colors())
        return self._console

    def _colors(self) -> Literal["auto"] | None:
        """No colour, bold or dim at all with NO_COLOR / --no-color (rich's own
        no_color keeps bold and dim)."""
        return None if self.no_color else "auto"

    def print(self, text: str = "", style: str | None = None) -> None:
        if self.quiet or self.json_mode:
            return
        if style and sys.stdout.isatty() and not self.no_color:
            self._rich().print(text, style=style, markup=False)
        else:
            print(text, flush=True)

    def note(self, text: str) -> None:
        """A remark for the human (stderr, even with --json)."""
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def json(self, document: Any) -> None:
        self.documents += 1
        print(json.dumps(document, indent=2, default=str), flush=True)

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[Any]],
              title: str | None = None) -> None:
        if self.quiet:
            return
        if not sys.stdout.isatty():
            # Plain, aligned text for pipes and logs: no box characters.
            cells: list[list[str]] = [[str(c) for c in columns]]
            cells += [[_cell(c) for c in r] for r in rows]
            widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
            if title:
                print(title)
            for row in cells:
                print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
            sys.stdout.flush()
            return
        from rich.table import Table

        table = Table(title=title, show_edge=False, header_style="bold")
        for col in columns:
            table.add_column(col)
        for values in rows:
            table.add_row(*[_cell(c) for c in values])
        self._rich().print(table)

    def error(self, message: str) -> None:
        text = f"qops: error: {message}"
        if sys.stderr.isatty() and not self.no_color:
            self._rich(err=True).print(text, style="bold red", markup=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        print(f"qops: warning: {message}", file=sys.stderr, flush=True)

    def fail(self, message: str, code: int) -> None:
        """Report an error: its line on stderr and, with ``--json``, the error document
        on stdout unless the command already printed its own."""
        self.error(message)
        self.error_document(message, code)

    def error_document(self, message: str, code: int) -> None:
        """With ``--json``, ``{"error": ..., "exit_code": ...}`` on stdout when nothing
        was printed there yet (the error line itself is the caller's)."""
        if self.json_mode and not self.documents:
            self.json({"error": message, "exit_code": code})

    def abort(self, exc: QopsError | str, code: int | None = None) -> NoReturn:
        if isinstance(exc, QopsError):
            code = exc.exit_code if code is None else code
        elif code is None:
            code = EX_FAILURE
        self.fail(str(exc), code)
        raise SystemExit(code)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)
