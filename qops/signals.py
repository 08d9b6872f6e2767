"""The app's signals: ``@app.on_after_configure.connect`` receivers, as in Celery.

Receivers usually call ``app.add_periodic_task``; beat fires them before it reads its
entries (``fire_app_hooks``)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qops.app import App


class Signal:
    """A list of receivers: ``@app.on_after_configure.connect`` as in Celery.

    Receivers are called as ``fn(sender=app, **kwargs)``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.receivers: list[Callable[..., Any]] = []

    def connect(self, fn: Callable[..., Any] | None = None, **_options: Any) -> Any:
        """Use as ``@signal.connect`` or ``@signal.connect(weak=False)``."""
        if fn is None:
            return lambda f: self.connect(f)
        if fn not in self.receivers:
            self.receivers.append(fn)
        return fn

    def disconnect(self, fn: Callable[..., Any]) -> None:
        if fn in self.receivers:
            self.receivers.remove(fn)

    def send(self, sender: Any, **kwargs: Any) -> list[tuple[Callable[..., Any], Any]]:
        return [(fn, fn(sender=sender, **kwargs)) for fn in list(self.receivers)]

    def __repr__(self) -> str:
        return f"<Signal {self.name}: {len(self.receivers)} receiver(s)>"


HOOKS = ("on_after_configure", "on_after_finalize")
_called: weakref.WeakKeyDictionary[Any, list[Callable[..., Any]]] = weakref.WeakKeyDictionary()


def fire_app_hooks(app: App) -> None:
    """Call the app's ``on_after_configure`` then ``on_after_finalize`` receivers (they
    usually call ``add_periodic_task``); each receiver once per app, so a receiver
    connected later is still called the next time."""
    called = _called.setdefault(app, [])
    for name in HOOKS:
        hook = getattr(app, name, None)
        for fn in list(getattr(hook, "receivers", None) or []):
            if not any(fn is c for c in called):
                called.append(fn)
                fn(sender=app)
