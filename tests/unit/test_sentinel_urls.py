"""``sentinel://`` URLs (broker and result backend): the checks made before anything
connects, the options read from the query and from the transport options, and the
masking of every password of a ``;``-separated list."""

from __future__ import annotations

import pytest

from qops.backends.base import backend_class
from qops.errors import ConfigError, UsageError
from qops.transports.base import TransportOptions, transport_class
from qops.transports.redis.replicas import Replicas
from qops.transports.redis.url import parse_url
from qops.transports.urls import mask_password, mask_secrets

TWO = "sentinel://h1:26379;sentinel://h2:26380"


@pytest.mark.parametrize(("url", "says"), [
    ("sentinel://h1:26379;", "an empty entry"),
    ("sentinel://h1;redis://h2", "not a Sentinel URL"),
    ("sentinel://h1:2637x", "bad port"),
    ("sentinel:/h1", "'sentinel:' must be followed by '//'"),
    ("sentinel://h1/db0", "'db0' is not a number (e.g. /0)"),
    ("sentinel://h1/1;sentinel://h2/2", "different dbs"),
    ("sentinel://:a@h1;sentinel://:b@h2", "different users or passwords"),
    ("sentinel://h1?master_name=", "master_name is empty"),
    ("sentinel://h1/0?db=1", "give the db as the path"),
    ("sentinel://h1?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
    ("sentinel://h1?ssl=maybe", "is not true or false"),
    ("sentinel://:5", "no Sentinel host"),
])
def test_malformed_sentinel_urls_are_one_line_usage_errors(url: str, says: str) -> None:
    for check in (transport_class, backend_class):
        with pytest.raises(UsageError) as info:
            check(url)
        text = str(info.value)
        assert says in text, text
        assert "\n" not in text and "sentinel://[:password@]host[:26379]" in text


def test_a_sentinel_url_names_the_sentinels_db_master_and_options() -> None:
    spec = parse_url("sentinel://:pw@h1;sentinel://h2:26380/3?master_name=m"
                     "&socket_timeout=2.5&global_keyprefix=app:").sentinel
    assert spec is not None
    assert spec.sentinels == (("h1", 26379), ("h2", 26380))
    assert (spec.db, spec.master_name) == (3, "m")
    assert spec.master_kwargs == {"password": "pw", "socket_timeout": 2.5}
    assert parse_url(f"{TWO}?global_keyprefix=app:").prefix == "app:"


def test_tls_to_the_master_from_the_query() -> None:
    spec = parse_url("sentinel://h1?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem").sentinel
    assert spec is not None
    assert spec.master_kwargs == {"ssl": True, "ssl_cert_reqs": "required",
                                  "ssl_ca_certs": "/ca.pem"}
    plain = parse_url("sentinel://h1?ssl=false").sentinel
    assert plain is not None and "ssl" not in plain.master_kwargs


def test_master_name_comes_from_the_url_or_the_transport_options() -> None:
    from qops.transports.redis import RedisTransport

    with pytest.raises(UsageError) as info:
        RedisTransport(TWO)
    assert "no master_name" in str(info.value)
    assert "broker_transport_options" in str(info.value)
    # nothing connects until a command is sent
    t = RedisTransport(TWO, TransportOptions(extra={
        "master_name": "m", "sentinel_kwargs": {"password": "spw"}}))
    pool = t._pool
    assert pool.service_name == "m"
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26379, 26380]
    # Sentinel auth from sentinel_kwargs; the URL's password is only the master's
    assert sentinels[0].connection_pool.connection_kwargs["password"] == "spw"
    t.close()
    t = RedisTransport("sentinel://:mpw@h1?master_name=m")
    assert t._pool.connection_kwargs["password"] == "mpw"
    sentinel = t._pool.sentinel_manager.sentinels[0]
    assert sentinel.connection_pool.connection_kwargs.get("password") is None
    t.close()


def test_the_result_backend_reads_its_own_transport_options() -> None:
    from qops.backends.redis import RedisBackend

    with pytest.raises(UsageError) as info:
        RedisBackend(TWO)
    assert "result_backend_transport_options" in str(info.value)
    b = RedisBackend(TWO, options={"master_name": "m", "wait_replicas": 1})
    assert b.client.connection_pool.service_name == "m"
    assert b._replicas == Replicas(1, 1000)
    b.close()


@pytest.mark.parametrize("options", [{"wait_replicas": -1}, {"wait_replicas": "1"},
                                     {"wait_replicas": 1, "wait_timeout_ms": 0},
                                     {"wait_timeout_ms": True}])
def test_bad_wait_options_are_config_errors(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        Replicas.from_options(options, "broker_transport_options")
    assert "broker_transport_options" in str(info.value)


def test_every_password_of_a_url_list_is_masked() -> None:
    url = "sentinel://:s1@h1;sentinel://u:s2@h2/0"
    assert mask_password(url) == "sentinel://:**@h1;sentinel://u:**@h2/0"
    masked = mask_secrets({"broker_url": "amqp://u:s1@h1//;amqp://u:s2@h2//",
                           "urls": ["amqp://u:s3@h3"],
                           "broker_transport_options": {"sentinel_kwargs": {"password": "s4"}}})
    assert not any(s in str(masked) for s in ("s1", "s2", "s3", "s4")), masked
