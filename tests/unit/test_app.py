from __future__ import annotations

from pathlib import Path

import pytest

from qops import App
from qops.errors import AppNotFound, NoResultBackend
from qops.loading import load_app


def _pkg(tmp_path: Path, name: str, files: dict[str, str]) -> None:
    root = tmp_path / name
    root.mkdir()
    for fname, text in files.items():
        (root / fname).write_text(text)


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_load_app_resolution_order(sandbox: Path) -> None:
    _pkg(sandbox, "pa", {"__init__.py": "from qops import App\nmy = App('pa')\n"})
    assert load_app("pa").main == "pa"  # any App in the module
    assert load_app("pa:my").main == "pa"
    assert load_app("pa.my").main == "pa"
    _pkg(sandbox, "pb", {"__init__.py": "", "celery.py": "from qops import App\napp = App('pb')\n"})
    assert load_app("pb").main == "pb"  # submodule pb.celery
    _pkg(sandbox, "pc", {"__init__.py": "", "qops.py": "from qops import App\nqops = App('pc')\n"})
    assert load_app("pc").main == "pc"


def test_load_app_errors_say_what_was_tried(sandbox: Path) -> None:
    with pytest.raises(AppNotFound, match="no such module"):
        load_app("does_not_exist_xyz")
    _pkg(sandbox, "pd", {"__init__.py": "x = 1\n"})
    with pytest.raises(AppNotFound, match="tried"):
        load_app("pd")
    _pkg(sandbox, "pe", {"__init__.py": "raise RuntimeError('boom at import')\n"})
    with pytest.raises(AppNotFound, match="boom at import"):
        load_app("pe")


def test_routing() -> None:
    app = App("r", broker="memory://r", task_routes={"r.tasks.*": {"queue": "fast"},
                                                       "r.special": "slow"})
    assert app.route("r.tasks.add") == "fast"
    assert app.route("r.special") == "slow"
    assert app.route("r.other") == "qops"
    assert app.route("r.tasks.add", queue="explicit") == "explicit"
    celery = App("c", broker="memory://c", compat="celery")
    assert celery.route("x") == "celery"


def test_task_options_and_calls() -> None:
    app = App("t", broker="memory://t")

    @app.task(name="t.add", rate_limit="10/m", queue="q")
    def add(x, y):
        return x + y

    @app.task(bind=True)
    def me(self):
        return self.name

    assert add(2, 3) == 5
    assert add.name == "t.add" and add.queue == "q" and add.rate_limit == "10/m"
    assert me() == "test_app.me" or me().endswith(".me")
    with pytest.raises(TypeError, match="t.add"):
        add.delay(1, 2, 3)
    with pytest.raises(Exception, match="unknown task option"):
        app.task(colour="red")(lambda: None)


def test_get_without_backend_says_how(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QOPS_RESULT_BACKEND", raising=False)
    app = App("nb", broker="memory://nb")

    @app.task
    def f():
        return 1

    res = f.delay()
    with pytest.raises(NoResultBackend, match="result_backend"):
        res.get(timeout=1)


def test_eager_mode() -> None:
    app = App("e", broker="memory://e", task_always_eager=True)

    @app.task
    def div(a, b):
        return a / b

    assert div.delay(6, 3).get() == 2
    with pytest.raises(ZeroDivisionError):
        div.delay(1, 0).get()


def test_send_task_message_layout() -> None:
    app = App("m", broker="memory://m-layout")
    res = app.send_task("m.x", [1], {"k": 2}, countdown=10, priority=5, queue="qq")
    c = app.transport.consumer(["qq"], 1)
    d = c.get(1)
    assert d is not None and d.message is not None
    assert d.message.headers["id"] == res.id
    assert d.message.headers["eta"] is not None
    assert d.message.properties["priority"] == 5
    c.close()


def test_a_send_sees_settings_changed_after_the_last_send() -> None:
    app = App("m", broker="memory://m-settings")
    version = app.conf.version
    first, _ = app.task_message("m.x")  # type: ignore[misc]
    assert first == "qops"
    app.conf.task_default_queue = "other"
    app.conf.task_default_priority = 7
    assert app.conf.version > version
    queue, message = app.task_message("m.x")  # type: ignore[misc]
    assert (queue, message.properties["priority"]) == ("other", 7)
    app.conf.task_routes = {"m.*": "routed"}
    assert app.task_message("m.x")[0] == "routed"  # type: ignore[index]
    app.conf.task_routes["m.*"] = "changed"  # changed in place: seen by the next send
    assert app.task_message("m.x")[0] == "changed"  # type: ignore[index]


def test_bulk_sends_pause_the_collector_and_leave_it_as_found() -> None:
    import gc

    from qops.task import bulk_send

    app = App("bulk-gc", broker="memory://bulk-gc", task_ignore_result=True)

    @app.task(name="b.noop")
    def noop() -> None:
        return None

    seen: list[bool] = []

    def build() -> list[object]:
        seen.append(gc.isenabled())
        return [noop.message(())]

    assert gc.isenabled()
    assert len(bulk_send(app, build)) == 1 and seen == [False]
    assert gc.isenabled()

    def bad() -> list[object]:
        raise KeyError("x")

    with pytest.raises(KeyError):
        bulk_send(app, bad)
    assert gc.isenabled()
    gc.disable()
    try:
        bulk_send(app, build)
        assert not gc.isenabled()  # off stays off
    finally:
        gc.enable()


def test_a_bulk_send_builds_what_one_send_builds() -> None:
    from qops.protocol import parse_task_message
    from qops.result import AsyncResult

    app = App("bulk-build", broker="memory://bulk-build", task_ignore_result=True)

    @app.task(name="b.add", time_limit=7, priority=2)
    def add(x: int, y: int = 0) -> int:
        return x + y

    options = {"queue": "q", "countdown": 30, "expires": 60, "shadow": "s"}
    one = add.message((1, 2), None, task_id="a", **options)
    assert not isinstance(one, AsyncResult)
    results = add.apply_many([((1, 2), {}, {"task_id": "a"}), ((3,), {"y": 4})], **options)
    consumer = app.transport.consumer(["q"], 2)
    got = [consumer.get(1) for _ in results]
    consumer.close()
    sent = [d.message for d in got if d is not None]
    assert [m.headers["id"] for m in sent] == [r.id for r in results]
    assert sent[0].body == one[1].body
    assert {k: v for k, v in sent[0].properties.items() if k != "delivery_tag"} == \
        one[1].properties
    made_at_the_call = {"eta", "expires"}
    assert {k: v for k, v in sent[0].headers.items() if k not in made_at_the_call} == \
        {k: v for k, v in one[1].headers.items() if k not in made_at_the_call}
    a, b = (parse_task_message(m) for m in (one[1], sent[0]))
    assert a.eta and b.eta and abs((a.eta - b.eta).total_seconds()) < 5
    second = parse_task_message(sent[1])
    assert (second.args, second.kwargs, second.time_limit, second.priority) == \
        ([3], {"y": 4}, 7, 2)


def test_an_async_result_made_without_an_app_reads_the_current_apps_backend() -> None:
    """``AsyncResult(id)``, as a Django status view writes it after Celery: the current
    app's result backend, as in Celery (it raised NoResultBackend)."""
    from qops.result import AsyncResult

    app = App("current-results", broker="memory://current-results",
              backend="memory://current-results")
    app.backend.store("done-1", "SUCCESS", 5)
    result = AsyncResult("done-1")
    assert result.get(timeout=1) == 5
    assert result.state == "SUCCESS" and result.app is app
