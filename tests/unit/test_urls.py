"""Broker and result backend URLs: each malformed form is a one-line usage error that
shows the expected form, found before anything is opened."""

from __future__ import annotations

from pathlib import Path

import pytest

from qops import App
from qops.backends.base import backend_class
from qops.errors import UsageError
from qops.protocol import saferepr
from qops.transports.base import from_url, transport_class
from qops.transports.redis.url import parse_url


@pytest.mark.parametrize(("url", "says", "form"), [
    ("redis://localhost:6379/db0", "'db0' is not a number (e.g. /0)", "redis://"),
    ("redis://localhost/0/", "no trailing '/'", "redis://"),
    ("redis://localhost/1/2", "not a number", "redis://"),
    ("redis:/localhost", "'redis:' must be followed by '//'", "redis://"),
    ("redis://localhost:99999/0", "bad port", "redis://"),
    ("redis://h/0?db=x", "two dbs", "redis://"),
    ("unix://tmp/redis.sock", "three slashes", "unix:///"),
    ("amqp://guest:secret@localhost:56x72/", "bad port", "amqp://"),
    ("sqlite://relative.db", "must be absolute", "sqlite:///"),
    ("sqlite:///", "names no file", "sqlite:///"),
    ("sqlite:/x.db", "must be followed by '//'", "sqlite:///"),
    ("rabbitmq://localhost", "did you mean amqp://", "amqp://"),
    ("", "is empty", "redis://"),
    ("localhost:6379", "unknown broker URL scheme", "redis://"),
])
def test_malformed_broker_urls_are_one_line_usage_errors(url: str, says: str, form: str) -> None:
    with pytest.raises(UsageError) as info:
        transport_class(url)
    text = str(info.value)
    assert says in text and form in text, text
    assert "\n" not in text and "secret" not in text


@pytest.mark.parametrize("url", [
    "redis://localhost:6379/3", "redis://", "redis://:p@h:6379", "rediss://h/0",
    "redis://h/0?global_keyprefix=a:", "unix:///run/redis.sock?db=2",
    "amqp://guest:guest@localhost:5672", "amqp://h//", "amqp://h/%2F", "pyamqp://h/v",
    "sqlite:///var/x.db", "sqlite:////var/x.db", "memory://", "memory://name",
])
def test_well_formed_broker_urls_pass(url: str) -> None:
    transport_class(url)


def test_redis_db_comes_from_the_path_or_the_query() -> None:
    assert parse_url("redis://h:6379/7").db == 7
    assert parse_url("unix:///s.sock?db=4").db == 4
    assert parse_url("redis://h").db == 0


def test_result_backend_urls_get_the_same_checks() -> None:
    for url, says in [("redis://h/db1", "result backend URL"), ("sqlite://r.db", "absolute"),
                      ("db+sqlite:///x.db", "did you mean sqlite://")]:
        with pytest.raises(UsageError, match=says):
            backend_class(url)
    backend_class("rpc://")


def test_every_entry_point_checks_the_broker_url(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="not a number"):
        App("t", broker="redis://localhost/db0").transport  # noqa: B018
    monkeypatch.setenv("QOPS_BROKER_URL", "redis://localhost/db0")
    with pytest.raises(UsageError, match="not a number"):
        App("t").transport  # noqa: B018
    monkeypatch.setenv("QOPS_BROKER_URL", "")
    with pytest.raises(UsageError, match="empty"):
        App("t").transport  # noqa: B018


def test_sqlite_does_not_create_a_missing_directory(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "dir"
    with pytest.raises(UsageError) as info:
        from_url(f"sqlite://{target}/x.db")
    assert f"directory {tmp_path / 'missing'} does not exist" in str(info.value)
    assert not (tmp_path / "missing").exists()


def test_the_default_state_dir_is_still_created(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("QOPS_BROKER_URL", raising=False)
    app = App("t")
    app.transport.close()
    assert (tmp_path / "state" / "qops" / "broker.db").exists()


def test_saferepr_cuts_long_values() -> None:
    text = saferepr("x" * 10_000_000, 1024)
    assert len(text) == 1024 and text.endswith("...")
    assert saferepr([1, 2], 1024) == "[1, 2]"
    assert len(saferepr("x" * 5000, 0)) == 5002
