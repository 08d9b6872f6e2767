"""Finding task modules: ``app.autodiscover_tasks()``, and Django set up before them.

As in Celery, ``autodiscover_tasks`` is lazy: it only records what to look for, and a
worker (and beat) imports the modules when it imports the app's task
modules (``App.import_modules``). With no packages named, the packages are Django's
installed apps. A process that has ``DJANGO_SETTINGS_MODULE`` set runs
``django.setup()`` before it imports any task module, since those import models.

Django is imported only here and only when ``DJANGO_SETTINGS_MODULE`` is set or Django's
installed apps are asked for.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Iterable

from qops.errors import ConfigError, UsageError

log = logging.getLogger("qops.app")

Packages = Iterable[str] | Callable[[], Iterable[str]] | None

#: True once ``django.setup()`` ran in this process: a worker then closes Django's
#: unusable or expired database connections before and after each task, as Django does
#: around each request (``close_old_connections``, which honours CONN_MAX_AGE)
django_ready = False


def django_setup() -> bool:
    """``django.setup()`` if this process has DJANGO_SETTINGS_MODULE (idempotent);
    whether Django is set up."""
    if not os.environ.get("DJANGO_SETTINGS_MODULE"):
        return False
    try:
        import django
    except ImportError:
        raise ConfigError("DJANGO_SETTINGS_MODULE is set but Django is not installed "
                          "in this Python") from None
    global django_ready
    try:
        django.setup()
        django_ready = True
    except Exception as exc:  # ImproperlyConfigured, the settings module's own errors
        raise ConfigError(f"django.setup() failed (DJANGO_SETTINGS_MODULE="
                          f"{os.environ['DJANGO_SETTINGS_MODULE']}): "
                          f"{type(exc).__name__}: {exc}".splitlines()[0]) from None
    return True


def django_app_packages() -> list[str]:
    """The packages of Django's installed apps (``INSTALLED_APPS``), Django set up."""
    if not django_setup():
        raise ConfigError("autodiscover_tasks() without packages looks in Django's "
                          "installed apps, but DJANGO_SETTINGS_MODULE is not set: set it "
                          "(os.environ.setdefault in the module that makes the app) or "
                          "name the packages: app.autodiscover_tasks(['pkg1', 'pkg2'])")
    from django.apps import apps

    return [config.name for config in apps.get_app_configs()]


def discover(packages: Packages, related_name: str | None) -> list[str]:
    """Import ``<package>.<related_name>`` for each package that has one (the package
    itself if ``related_name`` is None or empty); the module names imported."""
    if packages is None:
        names = django_app_packages()
    else:
        names = list(packages() if callable(packages) else packages)
    found = []
    for package in names:
        if not isinstance(package, str):
            raise UsageError(f"autodiscover_tasks: packages must be names, not {package!r}")
        module = related_module(package, related_name)
        if module is not None:
            found.append(module)
    return found


def related_module(package: str, related_name: str | None) -> str | None:
    """Import ``package.related_name``; None when the package has no such module. An
    ImportError raised *inside* the module is the user's bug and is not hidden."""
    try:
        importlib.import_module(package)
    except ModuleNotFoundError as exc:
        # a Django app config path ('polls.apps.PollsConfig'): walk up one level
        parent = package.rpartition(".")[0]
        if not parent or exc.name != package:
            raise ConfigError(f"autodiscover_tasks: cannot import package {package!r}: "
                              f"{exc}") from None
        package = parent
    if not related_name:
        return package
    name = f"{package}.{related_name}"
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        raise ConfigError(f"cannot import task module {name!r}: {exc}") from exc
    except Exception as exc:
        raise ConfigError(f"importing task module {name!r} failed: "
                          f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
    return name


def close_old_connections() -> None:
    """Django's ``close_old_connections()``, around a task (never raises)."""
    try:
        from django.db import close_old_connections as close

        close()
    except Exception as exc:
        log.warning("closing Django's old database connections failed: %s", exc)
