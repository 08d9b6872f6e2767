from __future__ import annotations

from pathlib import Path

import pytest

from qops import App
from qops.errors import ConfigError
from qops.settings import Settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("QOPS_BROKER_URL", "QOPS_RESULT_BACKEND", "QOPS_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)


def test_defaults_and_old_names() -> None:
    s = Settings()
    assert s.task_acks_late is True
    assert s.result_expires == 86400
    s.update({"BROKER_URL": "redis://x/1", "CELERY_TASK_RESULT_EXPIRES": 10,
              "CELERYBEAT_SCHEDULE": {"a": {}}, "CELERY_IMPORTS": ("m1", "m2")})
    assert s.broker_url == "redis://x/1"
    assert s.result_expires == 10.0
    assert s.beat_schedule == {"a": {}}
    assert s.imports == ["m1", "m2"]


def test_precedence_and_provenance(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "qops.yaml").write_text("broker_url: redis://yaml/0\ntimezone: Europe/Paris\n"
                                        "result_expires: 5\n")
    monkeypatch.setenv("QOPS_TIMEZONE", "Asia/Tokyo")
    app = App("p", broker="redis://code/0", result_expires=1, task_default_queue="code-q")
    assert app.conf.broker_url == "redis://yaml/0"
    assert app.conf.source("broker_url").startswith("file ")
    assert app.conf.timezone == "Asia/Tokyo"
    assert app.conf.source("timezone") == "env QOPS_TIMEZONE"
    assert app.conf.task_default_queue == "code-q"
    assert app.conf.source("task_default_queue") == "App(...)"
    app.conf.set("timezone", "UTC", layer="cli", source="command line")
    assert app.conf.timezone == "UTC"


def test_yaml_typo_is_an_error_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "qops.yaml").write_text("brokr_url: redis://x\n")
    app = App("p")
    with pytest.raises(ConfigError, match="brokr_url.*did you mean 'broker_url'"):
        app.conf.broker_url  # noqa: B018


def test_bad_type_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QOPS_WORKER_CONCURRENCY", "many")
    with pytest.raises(ConfigError, match="worker_concurrency.*env"):
        Settings().worker_concurrency  # noqa: B018


def test_config_from_object_django_namespace() -> None:
    class Conf:
        QOPS_BROKER_URL = "redis://ns/0"
        QOPS_TASK_ACKS_LATE = False
        OTHER = 1

    app = App("p")
    app.config_from_object(Conf, namespace="QOPS")
    assert app.conf.broker_url == "redis://ns/0"
    assert app.conf.task_acks_late is False


def test_config_from_module_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "myconf.py").write_text("CELERY_RESULT_BACKEND = 'redis://r/1'\n"
                                        "broker_url = 'redis://b/0'\nimport os\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    app = App("p")
    app.config_from_object("myconf")
    assert app.conf.result_backend == "redis://r/1"
    assert app.conf.broker_url == "redis://b/0"


def test_unknown_setting_in_code_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown setting"):
        App("p", brokr="x")


def test_default_broker_is_per_user_sqlite(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    app = App("p")
    assert app.broker_url == f"sqlite://{tmp_path}/state/qops/broker.db"
    assert app.result_backend_url == app.broker_url
    app2 = App("p", broker="redis://x/0")
    assert app2.result_backend_url is None


# -- bounds: a value of the right type but out of range is a config error naming the key


@pytest.mark.parametrize("key, value, says", [
    ("worker_heartbeat_interval", -1, "greater than 0"),
    ("worker_heartbeat_interval", 0, "greater than 0"),
    ("worker_heartbeat_ttl", 0, "greater than 0"),
    ("broker_connection_timeout", -5, "greater than 0"),
    ("task_time_limit", -1, "greater than 0"),
    ("task_soft_time_limit", 0, "greater than 0"),
    ("worker_prefetch_multiplier", 0, "at least 1"),
    ("worker_concurrency", 0, "at least 1"),
    ("worker_concurrency", 5000, "at most 1024"),
    ("worker_max_tasks_per_child", -3, "at least 1"),
    ("task_max_message_size", 0, "at least 1"),
    ("result_expires", -1, "at least 0"),
    ("task_default_priority", 10, "at most 9"),
    ("task_default_rate_limit", "10/x", "invalid rate limit"),
    ("worker_heartbeat_interval", ".nan", "finite"),
    ("task_serializer", "pickle", "JSON only"),
    ("result_serializer", "msgpack", "JSON only"),
    ("timezone", "Mars/Base", "not a known time zone"),
])
def test_yaml_value_out_of_bounds_names_the_key(tmp_path: Path, key: str, value: object,
                                                says: str) -> None:
    (tmp_path / "qops.yaml").write_text(f"{key}: {value}\n")
    app = App("p")
    with pytest.raises(ConfigError, match=f"{key}.*file .*qops.yaml.*{says}"):
        app.conf.get(key)


def test_env_and_code_values_are_bounded_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QOPS_WORKER_HEARTBEAT_INTERVAL", "-0.5")
    with pytest.raises(ConfigError, match="worker_heartbeat_interval.*env"):
        Settings().worker_heartbeat_interval  # noqa: B018
    monkeypatch.delenv("QOPS_WORKER_HEARTBEAT_INTERVAL")
    with pytest.raises(ConfigError, match="worker_heartbeat_ttl.*App"):
        App("p", worker_heartbeat_ttl=0)
    s = Settings()
    with pytest.raises(ConfigError, match="task_time_limit"):
        s.task_time_limit = -1
    assert s.task_time_limit is None  # nothing changed


def test_good_bounded_values_and_defaults_pass(tmp_path: Path) -> None:
    (tmp_path / "qops.yaml").write_text("worker_heartbeat_interval: 0.25\nresult_expires: 0\n"
                                        "task_default_priority: 0\ntask_time_limit: 30\n")
    s = Settings()
    assert (s.worker_heartbeat_interval, s.result_expires) == (0.25, 0.0)
    assert (s.task_default_priority, s.task_time_limit) == (0, 30.0)
    assert s.worker_prefetch_multiplier == 4 and s.task_soft_time_limit is None


def test_heartbeat_interval_must_be_less_than_the_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QOPS_WORKER_HEARTBEAT_INTERVAL", "20")
    app = App("p", broker="memory://")
    with pytest.raises(ConfigError, match="worker_heartbeat_interval.*env.*less than "
                                          "'worker_heartbeat_ttl' \\(10, default\\)"):
        app.transport_options()
