"""typer's help renderer (``typer.rich_utils``), imported without what qops never uses.

``typer.rich_utils`` imports ``rich.markdown`` (and with it markdown-it) for the
"markdown" markup mode and ``rich.traceback`` (and with it pygments) for pretty
exceptions. qops uses neither (markup mode "rich", ``pretty_exceptions_enable=False``),
yet the two are about half of what ``qops --help`` spends importing. ``rich_utils()``
imports typer's module with two stand-ins in their place for the time of that import
only: its names ``Markdown`` and ``Traceback`` become small classes that import the
real ones when used, and the real modules load normally for anyone who imports them
later. The help screens are typer's own (tests/cli/test_fast_paths.py).

It also applies NO_COLOR / --no-color to the help screens and usage errors: no escapes
at all (rich's own NO_COLOR keeps bold and dim).
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from typing import Any


class _Markdown:
    """Stands in for rich.markdown.Markdown in typer.rich_utils."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return importlib.import_module("rich.markdown").Markdown(*args, **kwargs)


class _Traceback:
    """Stands in for rich.traceback.Traceback in typer.rich_utils."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return importlib.import_module("rich.traceback").Traceback(*args, **kwargs)

    @classmethod
    def from_exception(cls, *args: Any, **kwargs: Any) -> Any:
        return importlib.import_module("rich.traceback").Traceback.from_exception(
            *args, **kwargs)


_STAND_INS = {"rich.markdown": ("Markdown", _Markdown),
              "rich.traceback": ("Traceback", _Traceback)}


def rich_utils() -> types.ModuleType:
    """``typer.rich_utils``, imported (once) without rich.markdown and rich.traceback."""
    module = sys.modules.get("typer.rich_utils")
    if module is None:
        placed: dict[str, types.ModuleType] = {}
        for name, (attr, cls) in _STAND_INS.items():
            if name not in sys.modules:
                placed[name] = types.ModuleType(name, "stand-in: see qops.cli.richhelp")
                setattr(placed[name], attr, cls)
        sys.modules.update(placed)
        try:
            module = importlib.import_module("typer.rich_utils")
        finally:
            for name, stand_in in placed.items():
                if sys.modules.get(name) is stand_in:
                    del sys.modules[name]
    if os.environ.get("NO_COLOR"):
        module.COLOR_SYSTEM = None  # type: ignore[attr-defined]
    return module
