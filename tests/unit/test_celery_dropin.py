"""The pieces of a Celery project that qops takes as they are: ``@shared_task``,
``autodiscover_tasks``, ``config_from_object(..., namespace=...)``,
``delay_on_commit`` (the Django project itself: tests/interop/test_django.py)."""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from qops import App, shared_task
from qops import shared as shared_module
from qops.errors import ConfigError, UsageError


@pytest.fixture(autouse=True)
def _forget_shared_tasks() -> Iterator[None]:
    """The shared tasks declared here are not put on the apps of later tests."""
    declared = list(shared_module._declared)
    yield
    shared_module._declared[:] = declared


def test_shared_task_is_on_every_app_and_means_the_current_one() -> None:
    before = App("before-shared", broker="memory://shared")

    @shared_task
    def mul(x: int, y: int) -> int:
        return x * y

    @shared_task(name="custom.div", bind=True)
    def div(self: object, x: int, y: int) -> float:
        return x / y

    after = App("after-shared", broker="memory://shared")
    name = f"{__name__}.mul"
    for app in (before, after):
        assert name in app.tasks and "custom.div" in app.tasks
    assert mul(6, 7) == 42 and div(9, 3) == 3
    # the name means the current app's task (the newest App)
    assert mul.app is after and mul.name == name
    assert mul.s(2, 3)["task"] == name
    assert "mul" in repr(mul)
    with pytest.raises(UsageError, match="keyword options only"):
        shared_task("positional", name="x")


def test_config_from_object_spellings_and_namespace(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    mod = types.ModuleType("qops_test_cfg")
    mod.settings = types.SimpleNamespace(  # type: ignore[attr-defined]
        CELERY_BROKER_URL="redis://h:1/2", CELERY_TASK_ALWAYS_EAGER=True,
        CELERY_RESULT_BACKEND="redis://h:1/3", CELERY_NOT_A_SETTING=1,
        QOPS_TIMEZONE="Europe/Paris", DEBUG=True)
    monkeypatch.setitem(sys.modules, "qops_test_cfg", mod)
    for spelling in ("qops_test_cfg:settings", "qops_test_cfg.settings"):
        app = App("cfg")
        app.config_from_object(spelling, namespace="CELERY")
        with caplog.at_level(logging.WARNING, logger="qops.settings"):
            assert app.conf.broker_url == "redis://h:1/2"  # read on first use
        assert app.conf.task_always_eager is True
        assert app.conf.result_backend == "redis://h:1/3"
        assert app.conf.timezone == "UTC"  # a QOPS_ name is not in the CELERY namespace
        assert "CELERY_NOT_A_SETTING" in caplog.text
        caplog.clear()
    app = App("cfg2")
    app.config_from_object("qops_test_cfg:settings", namespace="QOPS")
    assert app.conf.timezone == "Europe/Paris"
    # set after config_from_object in the code: wins, as written
    app = App("cfg3")
    app.config_from_object("qops_test_cfg:settings", namespace="CELERY")
    app.conf.task_always_eager = False
    assert app.conf.task_always_eager is False
    bad = App("cfg4")
    bad.config_from_object("qops_test_cfg:nothing", namespace="CELERY")
    with pytest.raises(ConfigError, match="has no 'nothing'"):
        _ = bad.conf.broker_url
    bad = App("cfg5")
    bad.config_from_object("no_such_module_here.settings")
    for _ in range(2):  # not forgotten after the first failure
        with pytest.raises(ConfigError, match="cannot import config module"):
            _ = bad.conf.broker_url


def test_autodiscover_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for pkg, body in (("dpa", "from qops import shared_task\n\n@shared_task\n"
                              "def hello():\n    return 'hi'\n"),
                      ("dpb", None)):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
        if body:
            (tmp_path / pkg / "jobs.py").write_text(body)
    (tmp_path / "dpc").mkdir()
    (tmp_path / "dpc" / "__init__.py").write_text("")
    (tmp_path / "dpc" / "jobs.py").write_text("import no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    app = App("disc", broker="memory://disc")
    app.autodiscover_tasks(["dpa", "dpb"], related_name="jobs")
    assert "dpa.jobs.hello" not in app.tasks  # lazy: the worker imports them
    assert app.import_modules() == ["dpa.jobs"]  # dpb has none: skipped
    assert "dpa.jobs.hello" in app.tasks
    forced = App("disc2", broker="memory://disc")
    forced.autodiscover_tasks(lambda: ["dpa"], related_name="jobs", force=True)
    assert "dpa.jobs.hello" in forced.tasks
    # an ImportError inside a task module is the user's bug: not taken for "none here"
    broken = App("disc3", broker="memory://disc")
    broken.autodiscover_tasks(["dpc"], related_name="jobs")
    with pytest.raises(ConfigError, match="no_such_dependency"):
        broken.import_modules()
    # no packages and no Django settings: said plainly
    django_less = App("disc4", broker="memory://disc")
    django_less.autodiscover_tasks()
    with pytest.raises(ConfigError, match="DJANGO_SETTINGS_MODULE is not set"):
        django_less.import_modules()


def test_delay_on_commit_needs_django(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    app = App("commit", broker="memory://commit")

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(TypeError, match="add"):  # checked now, not at the commit
        add.delay_on_commit(1)
    # Django installed, not configured
    with pytest.raises(UsageError, match="Django is not configured"):
        add.delay_on_commit(1, 2)
    monkeypatch.setitem(sys.modules, "django.db", None)  # Django not installed
    with pytest.raises(UsageError, match="need Django"):
        add.apply_async_on_commit((1, 2), countdown=1)
