"""Broker URLs as an operator writes them: the form each scheme takes, the one-line
errors for a malformed one (``url_scheme``, ``split_network_url``, ``url_error``), and
passwords masked wherever a URL or a setting is shown (``mask_password``,
``mask_secrets``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import SplitResult, urlsplit

from qops.errors import UsageError


def mask_password(url: str) -> str:
    """``redis://:secret@host/0`` -> ``redis://:**@host/0``; in a ``;``-separated list
    (``sentinel://...;sentinel://...``, ``amqp://h1;amqp://h2``) every URL's."""
    from urllib.parse import urlunsplit

    if ";" in url:
        return ";".join(mask_password(part) for part in url.split(";"))
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc
    creds, _, hostpart = netloc.rpartition("@")
    user = creds.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:**@{hostpart}"))


#: setting keys (in transport options and the like) whose values are secrets
SECRET_KEYS = ("password", "passwd", "secret", "token", "api_key")


def mask_secrets(value: Any) -> Any:
    """``value`` with every URL's password and every password-like key's value masked
    (nested dicts and lists too): for ``config show`` and any output of settings."""
    if isinstance(value, str):
        return mask_password(value) if "://" in value else value
    if isinstance(value, dict):
        return {k: "**" if isinstance(k, str) and v and any(
                    s in k.lower() for s in SECRET_KEYS) else mask_secrets(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_secrets(v) for v in value]
    return value


#: the form of each scheme's URL, quoted by every URL error (docs/commands.md, "URLs")
URL_FORMS = {
    "sqlite": "sqlite:///absolute/path/to/broker.db",
    "redis": "redis://[:password@]host[:6379][/db] (db: a number, 0-15 on a default server)",
    "rediss": "rediss://[:password@]host[:6379][/db] (TLS)",
    "unix": "unix:///path/to/redis.sock[?db=N]",
    "sentinel": "sentinel://[:password@]host[:26379][/db][;sentinel://host2[:26379]...]"
                "[?master_name=NAME] (the Sentinels; the password is the master's)",
    "amqp": "amqp://user:password@host[:5672][/vhost] (no vhost: '/')",
    "amqps": "amqps://user:password@host[:5671][/vhost] (TLS)",
    "pyamqp": "pyamqp://user:password@host[:5672][/vhost]",
    "memory": "memory://",
    "rpc": "rpc://",
}

#: schemes people bring from elsewhere, and what qops calls them
SCHEME_HINTS = {"rabbitmq": "amqp", "rabbit": "amqp", "sqla+sqlite": "sqlite",
                "db+sqlite": "sqlite", "sqlite3": "sqlite", "redis+socket": "unix",
                "librabbitmq": "amqp", "kafka": "", "sqs": ""}


def url_error(url: str, what: str, problem: str, scheme: str) -> UsageError:
    """The one-line error for a malformed ``url``: what is wrong, and the form it takes."""
    form = URL_FORMS.get(scheme, "")
    return UsageError(f"bad {what} {mask_password(url)!r}: {problem}"
                      + (f"; expected {form}" if form else ""))


def split_network_url(url: str, schemes: Sequence[str], what: str,
                      family: str) -> tuple[SplitResult, str, int | None]:
    """``url`` split (parts, lower-case scheme, port) once its scheme is one of
    ``schemes`` followed by ``//`` and its port is a number in 1-65535: the checks every
    network broker URL shares; a one-line UsageError (``family``'s form) otherwise."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in schemes or not url.split(":", 1)[1].startswith("//"):
        raise url_error(url, what, f"not {'an' if family[0] in 'aeiou' else 'a'} "
                        f"{family.upper() if family == 'amqp' else family.title()} URL", family)
    try:
        port = parts.port
    except ValueError as exc:  # not a number, or out of 0-65535
        raise url_error(url, what, f"bad port ({exc})", scheme) from None
    if port == 0:
        raise url_error(url, what, "port 0", scheme)
    return parts, scheme, port


def url_scheme(url: str, known: Sequence[str], what: str) -> str:
    """The scheme of ``url`` (lower case) when it is one of ``known`` and followed by
    ``//``; otherwise a one-line UsageError listing the forms of ``known``."""
    forms = ", ".join(URL_FORMS[s] for s in known if s in URL_FORMS
                      and s in ("sqlite", "redis", "amqp", "rpc", "memory"))
    if not url or not url.strip():
        raise UsageError(f"the {what} is empty: use one of {forms}")
    scheme, colon, rest = url.partition(":")
    scheme = scheme.lower()
    if not colon or scheme not in known:
        hint = SCHEME_HINTS.get(scheme)
        did_you = (f" (did you mean {hint}://?)" if hint and hint in known
                   else " (not supported by qops)" if hint is not None else "")
        raise UsageError(f"unknown {what} scheme {scheme if colon else url!r}{did_you}: "
                         f"use one of {forms}")
    if not rest.startswith("//"):
        raise url_error(url, what, f"'{scheme}:' must be followed by '//'", scheme)
    return scheme
