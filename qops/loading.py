"""Finding the app for ``-A``: import the module the user named and pick its App.

The CLI calls ``load_app`` once per command; nothing else in the library needs it."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from qops.app import App
from qops.errors import AppNotFound


def load_app(spec: str) -> App:
    """Resolve ``-A``: ``module:attr``, ``module.attr``, then ``app``/``qops``/``celery``
    attributes, then any App in the module, then submodules ``module.qops`` /
    ``module.celery``. The error says everything that was tried."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    tried: list[str] = []
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        module = _import(module_name, tried)
        if module is not None:
            found = _attr_path(module, attr)
            if isinstance(found, App):
                return found
            tried.append(f"{spec} (no App at {attr!r})")
        raise AppNotFound(f"cannot load app {spec!r}: tried {'; '.join(tried)}")
    module = _import(spec, tried, quiet_missing=True)
    if module is None and "." in spec:
        parent_name, _, attr = spec.rpartition(".")
        parent = _import(parent_name, tried)
        if parent is not None:
            found = getattr(parent, attr, None)
            if isinstance(found, App):
                return found
            tried.append(f"{parent_name}.{attr} (not an App)")
    if module is not None:
        app = _find_in_module(module, tried)
        if app is not None:
            return app
        for sub in ("qops", "celery"):
            submodule = _import(f"{spec}.{sub}", tried, quiet_missing=True)
            if submodule is not None:
                app = _find_in_module(submodule, tried)
                if app is not None:
                    return app
    raise AppNotFound(f"cannot find a qops App for -A {spec!r}: tried {'; '.join(tried)}")


def _import(name: str, tried: list[str], quiet_missing: bool = False) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            tried.append(f"import {name} (no such module)")
            return None
        raise AppNotFound(f"importing {name!r} failed: {exc}") from exc
    except Exception as exc:  # the user's module raised while importing
        raise AppNotFound(f"importing {name!r} failed: {type(exc).__name__}: {exc}") from exc


def _attr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


def _find_in_module(module: Any, tried: list[str]) -> App | None:
    for attr in ("app", "qops", "celery"):
        found = getattr(module, attr, None)
        if isinstance(found, App):
            return found
    apps = [v for v in vars(module).values() if isinstance(v, App)]
    if apps:
        return apps[0]
    tried.append(f"{module.__name__} (attributes app/qops/celery and any App: none)")
    return None
