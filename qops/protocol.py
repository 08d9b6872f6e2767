"""Celery task message protocol v2 (JSON only): build, parse, and the JSON type tags.

See docs/protocol.md §1. Non-JSON values travel as ``{"__type__": ..., "__value__": ...}``.
"""

from __future__ import annotations

import base64
import builtins
import datetime as dt
import functools
import json
import json.scanner
import os
import socket
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qops.errors import ProtocolError, UsageError
from qops.ids import new_id
from qops.noted import Noted
from qops.values import seconds

# -- the message every transport carries ---------------------------------------------

JSON = "application/json"


@dataclass(slots=True)
class Message:
    """A message as qops sees it on every transport (Celery's shape: headers, properties, body).

    ``properties["priority"]`` is in qops's scale on every transport: 0..9, **9 runs
    first**, None/absent = unset. Each transport maps it to its wire form (Redis: the
    kombu step lists, where step 0 is served first, so wire step = 9 - p floored to
    0/3/6/9 and unset goes to the base list; AMQP: as is, with ``x-max-priority``).
    """

    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)
    content_type: str = JSON
    content_encoding: str = "utf-8"
    #: (TaskMessages, task id) of a message ``TaskMessages.build`` made: its envelope
    #: or AMQP properties can come from that TaskMessages's templates (``as_built``)
    made: Any = field(default=None, repr=False, compare=False)

    @property
    def priority(self) -> int:
        return int(self.properties.get("priority") or 0)



def encode_envelope(queue: str, message: Message, exchange: str = "",
                    priority: int | None = None) -> bytes:
    """The kombu JSON envelope used on Redis (and in SQLite rows): body base64-encoded.
    ``priority``: the envelope's, in place of the message's (Redis: the wire step)."""
    made = as_built(message)
    if made is not None:
        raw = made[0].template((_envelope_template(), queue, exchange, priority)).fill(
            message, made[1])
        if raw is not None:
            return raw
    props = dict(message.properties)
    props.setdefault("delivery_mode", 2)
    if priority is not None:
        props["priority"] = priority
    else:
        props.setdefault("priority", 0)
    props["body_encoding"] = "base64"
    props["delivery_info"] = {"exchange": exchange, "routing_key": queue}
    if "delivery_tag" not in props:
        props["delivery_tag"] = new_id()
    env = {
        "body": base64.b64encode(message.body).decode("ascii"),
        "content-encoding": message.content_encoding,
        "content-type": message.content_type,
        "headers": message.headers,
        "properties": props,
    }
    return _envelope_json(env).encode()


def decode_envelope(raw: bytes | str) -> Message:
    """Parse a kombu JSON envelope. Raises ValueError with a reason when it is not one."""
    try:
        env = json_loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"invalid JSON envelope: {exc}") from None
    if not isinstance(env, dict) or "body" not in env:
        raise ValueError("envelope is not an object with a 'body'")
    props = env.get("properties") or {}
    if not isinstance(props, dict):
        raise ValueError("envelope 'properties' is not an object")
    body = env["body"]
    if props.get("body_encoding") == "base64":
        try:
            data = base64.b64decode(body, validate=True)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"invalid base64 body: {exc}") from None
    elif isinstance(body, str):
        data = body.encode("utf-8")
    else:
        raise ValueError("envelope body is not a string")
    headers = env.get("headers") or {}
    if not isinstance(headers, dict):
        raise ValueError("envelope 'headers' is not an object")
    props.pop("body_encoding", None)  # (a dict of this decode's own)
    props.pop("delivery_info", None)
    return Message(body=data, headers=headers, properties=props,
                   content_type=env.get("content-type") or JSON,
                   content_encoding=env.get("content-encoding") or "utf-8")



# -- JSON with type tags -------------------------------------------------------------


def _default(obj: Any) -> Any:
    if isinstance(obj, dt.datetime):
        return {"__type__": "datetime", "__value__": obj.isoformat()}
    if isinstance(obj, dt.date):
        return {"__type__": "date", "__value__": obj.isoformat()}
    if isinstance(obj, dt.time):
        return {"__type__": "time", "__value__": obj.isoformat()}
    if isinstance(obj, uuid.UUID):
        return {"__type__": "uuid", "__value__": str(obj)}
    decimal = sys.modules.get("decimal")  # imported by whoever made a Decimal
    if decimal is not None and isinstance(obj, decimal.Decimal):
        return {"__type__": "decimal", "__value__": str(obj)}
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"__type__": "bytes", "__value__": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "__json__"):
        return obj.__json__()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _decimal(value: str) -> Any:
    from decimal import Decimal  # on first use: its C module costs every worker ~0.3 MB

    return Decimal(value)


_DECODERS: dict[str, Any] = {
    "datetime": dt.datetime.fromisoformat,
    "date": dt.date.fromisoformat,
    "time": dt.time.fromisoformat,
    "uuid": uuid.UUID,
    "decimal": _decimal,
    "bytes": lambda v: base64.b64decode(v),
}


def _hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 2 and "__type__" in obj and "__value__" in obj:
        decode = _DECODERS.get(obj["__type__"])
        if decode is not None:
            return decode(obj["__value__"])
    return obj


def _writer(default: Any, circular: bool) -> Callable[[Any], str]:
    """``json.JSONEncoder(default=default, separators=(",", ":"),
    check_circular=circular).encode``, the same text, made without the set-up that
    method repeats at every call (its closures cost more than the C encoder itself on a
    task message): the C encoder is called directly, made once when it has no
    circular-reference bookkeeping to keep (else once a call)."""
    encoder = json.JSONEncoder(default=default, separators=(",", ":"),
                               check_circular=circular)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator (e.g. PyPy): the stdlib's own path
        return encoder.encode
    args = (encoder.default, json.encoder.encode_basestring_ascii, None, ":", ",",
            False, False, True)
    if not circular:
        fast = make(None, *args)
        return lambda obj: "".join(fast(obj, 0))
    return lambda obj: "".join(make({}, *args)(obj, 0))


#: the kombu envelope: it holds only what qops built (headers, properties; the body
#: is base64 text), never a cycle, so no circular-reference bookkeeping
_envelope_json = _writer(None, circular=False)
#: message bodies and results: user data, where a cycle must raise ValueError
_tagged_json = _writer(_default, circular=True)


def dumps(obj: Any) -> str:
    return _tagged_json(obj)


# the decoder's scanner (the C one, when there is one)
_scan: Any = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]


def json_loads(data: str | bytes) -> Any:
    """``json.loads(data)``, faster for what workers read on every message (a UTF-8
    document with no whitespace around it, as qops and kombu write them): one call of
    the decoder's scanner instead of four Python frames (loads, detect_encoding,
    decode, raw_decode). Anything else, errors included, goes to ``json.loads``, so
    results and error messages are json.loads's own."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value, end = _scan(text, 0)
    except (StopIteration, UnicodeDecodeError, ValueError):
        return json.loads(data)
    if end != len(text):
        return json.loads(data)
    return value


def loads(data: str | bytes) -> Any:
    # The hook runs in Python for every object: skip it when no tag can be there.
    tagged = b"__type__" in data if isinstance(data, bytes) else "__type__" in data
    return json.loads(data, object_hook=_hook) if tagged else json_loads(data)


# -- exceptions on the wire ----------------------------------------------------------


def exception_to_dict(exc: BaseException) -> dict[str, Any]:
    return {
        "exc_type": type(exc).__name__,
        "exc_message": [_jsonable(a) for a in exc.args],
        "exc_module": type(exc).__module__,
    }


def _jsonable(value: Any) -> Any:
    try:
        dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def dict_to_exception(meta: Any) -> BaseException:
    """Rebuild an exception from its wire form without importing anything new.

    The class is looked up in modules already loaded (builtins, qops.errors, the user's
    task modules); when it can't be found, an Exception subclass of the same name is made
    so ``except`` by name in logs and ``type(e).__name__`` still say the truth."""
    if not isinstance(meta, dict) or "exc_type" not in meta:
        return Exception(meta)
    name = str(meta.get("exc_type"))
    module = str(meta.get("exc_module") or "builtins")
    args = meta.get("exc_message") or []
    if not isinstance(args, (list, tuple)):
        args = [args]
    cls: Any = None
    if module == "builtins":
        cls = getattr(builtins, name, None)
    elif module == "celery.exceptions":  # Celery's errors that qops has by the same name
        from qops import errors

        cls = getattr(errors, name, None)
    if cls is None and module in sys.modules:
        cls = getattr(sys.modules[module], name, None)
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        cls = type(name, (Exception,), {"__module__": module})
    try:
        return cls(*args)  # type: ignore[no-any-return,unused-ignore]
    except Exception:
        exc: BaseException = Exception.__new__(cls)
        exc.args = tuple(args)
        return exc


# -- task messages ---------------------------------------------------------------------

_origin: tuple[int, str] = (0, "")


def origin() -> str:
    """``gen<pid>@<host>``: who sent a task (the ``origin`` header); made once per
    process."""
    global _origin
    pid = os.getpid()
    if _origin[0] != pid:
        _origin = (pid, f"gen{pid}@{socket.gethostname()}")
    return _origin[1]


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.isoformat()


def parse_time(value: Any) -> dt.datetime | None:
    """An ISO 8601 time from a header (naive = UTC), or None."""
    if value in (None, ""):
        return None
    if isinstance(value, dt.datetime):
        parsed = value
    else:
        try:
            parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            raise ProtocolError(f"invalid time {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed


#: ``argsrepr`` and ``kwargsrepr`` are cut to this many characters (Celery's default)
REPR_LIMIT = 1024


class TaskMessages:
    """Task messages of task ``name`` sent with one set of options: the headers,
    properties and embedded callbacks they share are made once, and ``build`` fills in
    what each message has of its own (task id, arguments). ``build_task_message`` is
    one of them; a bulk send makes them all from one."""

    def __init__(
        self,
        name: str,
        *,
        task_id: str | None = None,
        eta: dt.datetime | None = None,
        expires: dt.datetime | None = None,
        retries: int = 0,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        root_id: str | None = None,
        parent_id: str | None = None,
        group: str | None = None,
        group_index: int | None = None,
        callbacks: list[dict[str, Any]] | None = None,
        errbacks: list[dict[str, Any]] | None = None,
        chain: list[dict[str, Any]] | None = None,
        chord: dict[str, Any] | None = None,
        reply_to: str | None = None,
        priority: int | None = None,
        shadow: str | None = None,
        ignore_result: bool = False,
    ) -> None:
        self.task_id = task_id
        self.root_id = root_id
        self.time_limits = (time_limit, soft_time_limit)
        # the wire order of the headers (id, root_id, timelimit, argsrepr, kwargsrepr
        # and stamps are each message's own)
        self.headers: dict[str, Any] = {
            "lang": "py",
            "task": name,
            "id": None,
            "shadow": shadow,
            "eta": _iso(eta),
            "expires": _iso(expires),
            "group": group,
            "group_index": group_index,
            "retries": retries,
            # hard first, as Celery's code does (its prose doc says the reverse)
            "timelimit": None,
            "root_id": None,
            "parent_id": parent_id,
            "argsrepr": None,
            "kwargsrepr": None,
            "origin": origin(),
            "ignore_result": ignore_result,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": None,
        }
        self.embed = {"callbacks": callbacks, "errbacks": errbacks, "chain": chain,
                      "chord": chord}
        #: the body's end: ``,<embed>]`` as JSON, encoded at the first build (the same
        #: for every message; it was a third of a body's encoding)
        self.body_end: bytes | None = None
        self.reply_to = reply_to or ""
        self.priority = None if priority is None else max(0, min(9, int(priority)))
        #: templates of the encoded messages, by what they are for (``template``)
        self.templates: dict[tuple[Any, ...], Any] = {}
        self.built = 0  # messages built: a template pays from the second one on

    def template(self, key: tuple[Any, ...]) -> Any:
        """The template ``key[0](self, *key[1:])``, made on first use."""
        template = self.templates.get(key)
        if template is None:
            template = self.templates[key] = key[0](self, *key[1:])
        return template

    def build(self, args: list[Any], kwargs: dict[str, Any],
              task_id: str | None = None) -> Message:
        """The message for ``args`` (a list) and ``kwargs`` (a dict), each used as is."""
        tid = task_id or self.task_id or new_id()
        self.built += 1
        args_text = repr(args)
        kwargs_text = repr(kwargs) if kwargs else "{}"
        # (made in one go: Noted notes only what is changed through it later)
        headers = Noted(self.headers, id=tid, timelimit=list(self.time_limits),
                        root_id=self.root_id or tid,
                        argsrepr=args_text if len(args_text) <= REPR_LIMIT
                        else shorten(args_text, REPR_LIMIT),
                        kwargsrepr=kwargs_text if len(kwargs_text) <= REPR_LIMIT
                        else shorten(kwargs_text, REPR_LIMIT),
                        stamps={})
        end = self.body_end
        if end is None:
            end = self.body_end = f",{_tagged_json(self.embed)}]".encode()
        body = _tagged_json([args, kwargs])[:-1].encode("utf-8") + end
        props = Noted(correlation_id=tid, reply_to=self.reply_to, delivery_mode=2) \
            if self.priority is None else \
            Noted(correlation_id=tid, reply_to=self.reply_to, delivery_mode=2,
                  priority=self.priority)
        return Message(body=body, headers=headers, properties=props, made=(self, tid))


@functools.cache
def _envelope_template() -> Any:
    from qops.envelopes import Template  # (it imports this module)

    return Template


def as_built(message: Message) -> tuple[TaskMessages, str] | None:
    """(TaskMessages, task id) of a message that holds what ``TaskMessages.build`` put in
    it, from that TaskMessages's second message on (a template costs more than one
    message): its encodings can come from the TaskMessages's templates, which fill in
    the id, root id and argument reprs (qops/envelopes.py). None for any other message,
    or one changed since: its headers and properties are ``Noted`` dicts, which note a
    change made through them (a signature or compression added, a handler's or a
    transport's change); the content type and the two values a change in place could
    touch are checked here."""
    made = message.made
    if made is None or made[0].built < 2:
        return None
    h = message.headers
    p = message.properties
    if type(h) is not Noted or h.changed or type(p) is not Noted or p.changed or \
            message.content_type != JSON or message.content_encoding != "utf-8":
        return None
    # changed in place? (the very objects build() put in: 0 == False, but an encoder
    # writes them differently)
    limits, own = h["timelimit"], made[0].time_limits
    if len(limits) != 2 or limits[0] is not own[0] or limits[1] is not own[1] or \
            h["stamps"]:
        return None
    return made


def build_task_message(name: str, args: Any = (), kwargs: dict[str, Any] | None = None,
                       **options: Any) -> Message:
    """One task message: ``TaskMessages(name, **options).build(args, kwargs)``."""
    return TaskMessages(name, **options).build(list(args or ()), dict(kwargs or {}))


def saferepr(value: Any, limit: int = REPR_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters (0: whole), as Celery's argsrepr: for
    message headers and log lines, where a 10 MB argument must not be copied whole."""
    return shorten(repr(value), limit)


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in '...' when cut (0: whole)."""
    return text if not limit or len(text) <= limit else text[: max(0, limit - 3)] + "..."


@dataclass
class TaskRequest:
    """A parsed task message: what a worker needs to run it."""

    id: str
    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    retries: int = 0
    eta: dt.datetime | None = None
    expires: dt.datetime | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    group_index: int | None = None
    callbacks: list[dict[str, Any]] | None = None
    errbacks: list[dict[str, Any]] | None = None
    chain: list[dict[str, Any]] | None = None
    chord: dict[str, Any] | None = None
    reply_to: str | None = None
    priority: int | None = None
    ignore_result: bool = False
    headers: dict[str, Any] = field(default_factory=dict)

    def context(self) -> dict[str, Any]:
        """What ``task.request`` shows inside a running task."""
        return {
            "id": self.id, "task": self.name, "args": self.args, "kwargs": self.kwargs,
            "retries": self.retries,
            "eta": None if self.eta is None else _iso(self.eta),
            "expires": None if self.expires is None else _iso(self.expires),
            "root_id": self.root_id, "parent_id": self.parent_id, "group": self.group,
            "group_index": self.group_index, "reply_to": self.reply_to,
            "timelimit": [self.time_limit, self.soft_time_limit],
            "callbacks": self.callbacks, "errbacks": self.errbacks, "chain": self.chain,
            "chord": self.chord, "ignore_result": self.ignore_result,
            "priority": self.priority,
        }


def _num(value: Any) -> float | None:
    """A time limit from the ``timelimit`` header: None or 0 for none, else seconds > 0
    (a negative one would fail every run of the task)."""
    if value is None or (value == 0 and not isinstance(value, bool)):
        return None
    try:
        return seconds(value, "time limit")
    except UsageError:
        raise ProtocolError(f"invalid time limit {value!r}") from None


def parse_task_message(message: Message) -> TaskRequest:
    """Validate and parse a v2 task message. Raises ProtocolError with the reason, for
    whatever is wrong with it (a field of a type nothing checks for, JSON nested too
    deep, ...): the worker dead-letters a message that raises it, and nothing else."""
    try:
        return _parse_task_message(message)
    except ProtocolError:
        raise
    except Exception as exc:
        text = " ".join(str(exc).split())[:300]
        raise ProtocolError(f"malformed task message ({type(exc).__name__}): {text}") from None


def _parse_task_message(message: Message) -> TaskRequest:
    headers = message.headers or {}
    if "task" not in headers:
        raise ProtocolError("protocol v1 message (no 'task' header): not supported")
    name = headers.get("task")
    task_id = headers.get("id") or message.properties.get("correlation_id")
    if not isinstance(name, str) or not name:
        raise ProtocolError("the 'task' header is not a task name")
    if not isinstance(task_id, str) or not task_id:
        raise ProtocolError("the message has no task id")
    if (message.content_type or JSON) != JSON:
        raise ProtocolError(f"content type {message.content_type!r} is not accepted (JSON only)")
    try:
        encoding = message.content_encoding or "utf-8"
        body = loads(message.body if encoding in ("utf-8", "utf8") else
                     message.body.decode(encoding))
    except (ValueError, UnicodeDecodeError, LookupError) as exc:
        raise ProtocolError(f"body is not valid JSON: {exc}") from None
    if not (isinstance(body, list) and len(body) == 3):
        raise ProtocolError("body is not [args, kwargs, embed]")
    args, kwargs, embed = body
    if not isinstance(args, list):
        raise ProtocolError("args is not a list")
    if not isinstance(kwargs, dict):
        raise ProtocolError("kwargs is not an object")
    if not isinstance(embed, dict):
        embed = {}
    timelimit = headers.get("timelimit") or [None, None]
    if not isinstance(timelimit, (list, tuple)) or len(timelimit) != 2:
        timelimit = [None, None]
    try:
        retries = int(headers.get("retries") or 0)
    except (TypeError, ValueError, OverflowError):
        raise ProtocolError("retries is not a number") from None
    if retries < 0:
        raise ProtocolError(f"retries is negative ({retries})")
    prio = message.properties.get("priority")
    # (the calls only for what is there: this runs for every message)
    eta, expires = headers.get("eta"), headers.get("expires")
    hard, soft = timelimit
    return TaskRequest(
        id=task_id,
        name=name,
        args=args,
        kwargs=kwargs,
        retries=retries,
        eta=None if eta is None else parse_time(eta),
        expires=None if expires is None else parse_time(expires),
        time_limit=None if hard is None else _num(hard),
        soft_time_limit=None if soft is None else _num(soft),
        root_id=headers.get("root_id"),
        parent_id=headers.get("parent_id"),
        group=headers.get("group"),
        group_index=headers.get("group_index"),
        callbacks=embed.get("callbacks"),
        errbacks=embed.get("errbacks"),
        chain=embed.get("chain"),
        chord=embed.get("chord"),
        reply_to=message.properties.get("reply_to") or None,
        priority=int(prio) if isinstance(prio, (int, float)) else None,
        ignore_result=bool(headers.get("ignore_result")),
        headers=headers,
    )
