"""What a send resolves once for many messages: ``Outgoing`` (the messages of one task
sent with one set of options, ``App.outgoing``), ``Recent`` (the Outgoings of recent
plain sends) and ``Sending`` (the settings every send reads)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from qops import protocol
from qops.compression import compress
from qops.result import AsyncResult
from qops.signing import HEADER, Signer, task_context

if TYPE_CHECKING:
    from qops.app import App
    from qops.task import Task


class Outgoing:
    """Messages of one task sent with one set of options (``App.outgoing``): ``build``
    makes each, signed and compressed as the settings say, or runs the task here under
    ``task_always_eager``."""

    __slots__ = ("app", "queue", "messages", "task_id", "eager", "signer", "compression")

    def __init__(self, app: App, queue: str, messages: protocol.TaskMessages | None,
                 task_id: str | None, *, eager: Task | None = None,
                 signer: Signer | None = None, compression: str | None = None) -> None:
        self.app = app
        self.queue = queue
        self.messages = messages
        self.task_id = task_id
        self.eager = eager
        self.signer = signer
        self.compression = compression

    def build(self, args: list[Any], kwargs: dict[str, Any]
              ) -> tuple[str, protocol.Message] | AsyncResult:
        """The (queue, message) for ``args`` (a list) and ``kwargs`` (a dict)."""
        if self.messages is None:
            assert self.eager is not None
            return self.app._apply_eager(self.eager, args, kwargs, self.task_id)
        message = self.messages.build(args, kwargs)
        if self.signer is not None:  # task_signing: docs/security.md
            message.headers[HEADER] = self.signer.sign("task", message.body,
                                                       task_context(message.headers))
        if self.compression:  # after signing: the signature is over the plain body
            compress(message, self.compression)
        return self.queue, message


class Recent:
    """The Outgoings of recent plain sends (no eta, id, links, parent, ...), by the
    options and settings that made them (``App.outgoing``'s key: the settings' version,
    the process, the result backend's reply queue among them). ``delay()`` called in a
    loop, as a web app does, then builds its messages from one ``TaskMessages``, whose
    templates encode them (qops/envelopes.py, qops/transports/amqp/template.py), and
    resolves its options once: a sixth to a third less client CPU a ``delay()``."""

    MAX = 256  # past it the whole set is dropped: a program sends a handful of kinds

    def __init__(self) -> None:
        self._items: dict[tuple[Any, ...], Outgoing] = {}

    def get(self, key: tuple[Any, ...]) -> Outgoing | None:
        return self._items.get(key)

    def put(self, key: tuple[Any, ...], out: Outgoing) -> None:
        if len(self._items) >= self.MAX:
            self._items.clear()
        self._items[key] = out

    def clear(self) -> None:
        self._items.clear()


class Sending(NamedTuple):
    """The settings a send reads (``App._sending_conf``), as of settings ``version``."""

    version: int
    always_eager: bool
    default_priority: int | None
    ignore_result: bool
    routes: dict[str, Any] | None
    default_queue: str
    has_backend: bool
    compression: str | None
