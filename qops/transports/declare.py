"""How a work queue is declared on RabbitMQ: its type (classic or quorum), its
arguments and, under the ``celery`` preset, the exchange and binding that kombu
declares with it (docs/protocol.md §3.1).

Celery declares queue ``Q`` as a kombu ``Queue``: a durable direct exchange (``Q``
itself, or ``task_default_exchange`` for the default queue), the durable queue with
``x-queue-type: quorum`` when that queue type is chosen and ``x-max-priority`` only when
``task_queue_max_priority`` is set, and a binding with routing key ``Q`` (or
``task_default_routing_key``). RabbitMQ refuses (406) a declaration whose arguments
differ from the queue's, so the ``celery`` preset declares exactly that. The ``qops``
preset declares the queue alone. Under both, ``x-max-priority`` only when
``task_queue_max_priority`` is set: RabbitMQ's priority queues cost it 40-60% more CPU
per message (bench/README.md, "RabbitMQ: priority queues were half of the broker's
cost"), so, as in Celery, they are asked for.

Quorum queues take no ``x-max-priority`` (RabbitMQ refuses it) and are always durable,
never exclusive or auto-delete (qops's work queues are all three anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qops.errors import UsageError

QUEUE_TYPES = ("classic", "quorum")
EXCHANGE_TYPES = ("direct", "topic", "fanout")


def queue_type(value: Any) -> str:
    """A queue type setting's value, checked: 'classic' or 'quorum'."""
    return _one_of(value, QUEUE_TYPES)


def exchange_type(value: Any) -> str:
    """An exchange type setting's value, checked: 'direct', 'topic' or 'fanout'."""
    return _one_of(value, EXCHANGE_TYPES)


def _one_of(value: Any, allowed: tuple[str, ...]) -> str:
    text = str(value).strip().lower()
    if text not in allowed:
        choices = ", ".join(repr(a) for a in allowed[:-1]) + f" or {allowed[-1]!r}"
        raise UsageError(f"it must be {choices}, not {value!r}")
    return text


@dataclass(frozen=True)
class QueueShape:
    """What is declared for one work queue."""

    name: str
    arguments: dict[str, Any] | None  # None: none (an empty table on the wire)
    exchange: str | None  # a durable exchange declared and bound, or None
    exchange_type: str  # direct, or task_default_exchange_type for the default queue's
    routing_key: str
    quorum: bool


@dataclass(frozen=True)
class Declarations:
    """The declaration settings of one app, shared by its transport's connections."""

    default_queue: str = "qops"
    default_type: str = "classic"  # task_default_queue_type: the default queue's
    other_type: str = "classic"  # task_create_missing_queue_type: every other queue's
    max_priority: int | None = None  # task_queue_max_priority; None: no x-max-priority
    exchanges: bool = False  # declare kombu's exchange and binding (celery preset)
    default_exchange: str | None = None  # default: the default queue's name
    default_exchange_type: str = "direct"
    default_routing_key: str | None = None  # default: the default queue's name
    detect_quorum: bool = True  # worker_detect_quorum_queues

    def shape(self, queue: str) -> QueueShape:
        default = queue == self.default_queue
        quorum = (self.default_type if default else self.other_type) == "quorum"
        args: dict[str, Any] = {}
        if quorum:
            args["x-queue-type"] = "quorum"
        elif self.max_priority:
            args["x-max-priority"] = self.max_priority
        exchange, kind, key = queue, "direct", queue
        if default:
            exchange = self.default_exchange or queue
            kind = self.default_exchange_type
            key = self.default_routing_key or queue
        return QueueShape(queue, args or None, exchange if self.exchanges else None, kind,
                          key, quorum)

    def kombu_dict(self, queue: str) -> dict[str, Any]:
        """``queue`` as a Celery worker's ``active_queues`` reply shows it (kombu's
        ``Queue.as_dict(recurse=True)``): its exchange, routing key and arguments as
        declared; under the qops preset the default exchange ``""``."""
        shape = self.shape(queue)
        exchange = {"name": shape.exchange or "", "type": shape.exchange_type,
                    "arguments": None, "durable": True, "passive": False,
                    "auto_delete": False, "delivery_mode": None, "no_declare": False}
        return {"name": queue, "exchange": exchange, "routing_key": shape.routing_key,
                "queue_arguments": shape.arguments, "binding_arguments": None,
                "consumer_arguments": None, "durable": True, "exclusive": False,
                "auto_delete": False, "no_ack": False, "alias": None, "bindings": [],
                "no_declare": None, "expires": None, "message_ttl": None,
                "max_length": None, "max_length_bytes": None, "max_priority": None}

    def quorum(self, queues: list[str]) -> bool:
        """Whether any of ``queues`` is declared as a quorum queue."""
        return any(self.shape(q).quorum for q in queues)
