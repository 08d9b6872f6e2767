"""The RabbitMQ management HTTP API, for what AMQP itself cannot tell: every queue of a
vhost, and the messages each one has delivered but not yet had acknowledged (AMQP's
``queue.declare`` only counts ready messages and consumers).

``qops queues`` and ``qops purge`` use it when it is reachable (``--broker-api URL`` or
the ``broker_api`` setting, as Flower's ``--broker_api``; by default the broker's host
on port 15672 with the broker's credentials, tried with a short timeout). It is
optional: without it those commands say the in-flight counts are unknown.

Standard library only (``urllib``). The API's counts come from the statistics RabbitMQ
collects every ``collect_statistics_interval`` (5 s by default), so they lag by up to
that much; a queue created since the last collection is listed without counts.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from qops.transports.amqp.presence import PRESENCE_QUEUE
from qops.transports.amqp.url import AMQPParams
from qops.transports.urls import mask_password

MANAGEMENT_PORT = 15672
MANAGEMENT_TLS_PORT = 15671
#: the values of ``broker_api`` that mean "do not ask the management API"
OFF = ("off", "none", "no", "false", "0")
COLUMNS = "name,messages_ready,messages_unacknowledged,consumers,exclusive,auto_delete"


class ManagementUnavailable(Exception):
    """The API could not be asked, or refused: the message says why (one line)."""


@dataclass(frozen=True)
class APIQueue:
    name: str
    ready: int | None  # None: not collected yet (a queue newer than the last collection)
    unacked: int | None
    consumers: int | None


def default_api_url(params: AMQPParams) -> str:
    """The API on the broker's host, with the broker's credentials."""
    scheme, port = ("https", MANAGEMENT_TLS_PORT) if params.tls else ("http", MANAGEMENT_PORT)
    host = f"[{params.host}]" if ":" in params.host else params.host
    userinfo = f"{quote(params.user, safe='')}:{quote(params.password, safe='')}"
    return f"{scheme}://{userinfo}@{host}:{port}/api/"


def hidden(name: str, *, exclusive: bool, auto_delete: bool, dead_letter_queue: str) -> bool:
    """Queues that are not work queues, left out of the listing as the other brokers'
    listings leave them out: exclusive ones (qops's reply queues, event and broadcast
    subscriptions, locks), auto-delete ones (Celery's reply, pidbox and event-receiver
    queues), server-named ``amq.*`` ones, ``*.pidbox`` mailboxes, the live-node registries
    (``qops.nodes``, ``qops.nodes.*``) and the dead-letter queue (see ``qops dlq``)."""
    return (exclusive or auto_delete or name.startswith("amq.") or name.endswith(".pidbox")
            or name in (PRESENCE_QUEUE, dead_letter_queue)
            or name.startswith(PRESENCE_QUEUE + "."))


def _count(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) else None


class ManagementAPI:
    def __init__(self, url: str, *, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            from qops.errors import UsageError

            raise UsageError(f"bad --broker-api URL {mask_password(url)!r}: use "
                             "http://user:pass@host:15672/api/")
        path = parts.path if parts.path.rstrip("/").endswith("api") else \
            parts.path.rstrip("/") + "/api"
        netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        if parts.port:
            netloc += f":{parts.port}"
        self.base = urlunsplit((parts.scheme, netloc, path.rstrip("/") + "/", "", ""))
        self.safe_url = mask_password(url)
        self.timeout = timeout
        user = unquote(parts.username) if parts.username is not None else "guest"
        password = unquote(parts.password) if parts.password is not None else "guest"
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        self._headers = {"Authorization": f"Basic {token}", "Accept": "application/json"}

    def get(self, path: str) -> Any:
        """GET ``path`` (under ``/api/``), decoded, or ManagementUnavailable."""
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.base + path, headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            what = {401: "credentials refused", 403: "not allowed for this user",
                    404: "no such vhost, or not the management API"}.get(exc.code, exc.reason)
            raise ManagementUnavailable(f"HTTP {exc.code}: {what}") from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise ManagementUnavailable(f"no answer in {self.timeout:g} s") from None
            text = getattr(reason, "strerror", None) or str(reason)
            raise ManagementUnavailable(str(text)) from None
        except TimeoutError:
            raise ManagementUnavailable(f"no answer in {self.timeout:g} s") from None
        except (OSError, ValueError) as exc:  # reset connection, not JSON
            raise ManagementUnavailable(f"{type(exc).__name__}: {exc}") from None

    def queues(self, vhost: str, dead_letter_queue: str) -> dict[str, APIQueue]:
        """The work queues of ``vhost`` by name (see ``hidden`` for those left out)."""
        rows = self.get(f"queues/{quote(vhost, safe='')}?columns={COLUMNS}")
        if not isinstance(rows, list):
            raise ManagementUnavailable("unexpected answer (not a list of queues)")
        out: dict[str, APIQueue] = {}
        for row in rows:
            if not isinstance(row, dict) or not isinstance(row.get("name"), str):
                continue
            name = row["name"]
            if hidden(name, exclusive=bool(row.get("exclusive")),
                      auto_delete=bool(row.get("auto_delete")),
                      dead_letter_queue=dead_letter_queue):
                continue
            out[name] = APIQueue(name, _count(row.get("messages_ready")),
                                 _count(row.get("messages_unacknowledged")),
                                 _count(row.get("consumers")))
        return out
