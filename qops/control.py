"""The client side of remote control: validate a command, broadcast it, collect replies.

Replies are collected until every *expected* node has answered -- the nodes named with
``destination``, else the live nodes the broker knows of (registered by their
heartbeats) -- so a healthy cluster answers in milliseconds. ``timeout`` bounds only
the wait for nodes that stay silent. Where the live nodes can't be known (the celery
preset: Celery workers don't register), the client waits the whole timeout, as Celery.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qops.errors import EX_FAILURE, EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, UsageError
from qops.protocol import Message
from qops.signing import HEADER, SignatureError, control_signer
from qops.values import check_arguments, target

if TYPE_CHECKING:
    from qops.app import App


@dataclass(frozen=True)
class Arg:
    name: str
    kind: type = str
    required: bool = True
    many: bool = False  # takes every remaining positional argument


@dataclass(frozen=True)
class Command:
    name: str
    group: str  # "inspect" (reads) or "control" (changes)
    args: tuple[Arg, ...] = ()
    help: str = ""


COMMANDS: dict[str, Command] = {c.name: c for c in [
    Command("ping", "inspect", help="Ask every node to reply."),
    Command("stats", "inspect", help="Counters, pool, broker and resource usage."),
    Command("active", "inspect", help="Tasks running now."),
    Command("reserved", "inspect", help="Tasks taken from the queue, not started yet."),
    Command("scheduled", "inspect", help="Tasks waiting for their ETA."),
    Command("registered", "inspect", help="Task names each node knows."),
    Command("active_queues", "inspect", help="Queues each node consumes."),
    Command("revoked", "inspect", help="Ids of revoked tasks."),
    Command("conf", "inspect", (Arg("with_defaults", bool, False),), "The node's settings."),
    Command("query_task", "inspect", (Arg("ids", str, True, many=True),),
            "Where tasks are: active, reserved or scheduled."),
    Command("report", "inspect", help="Software and platform information."),
    Command("clock", "inspect", help="The node's logical clock."),
    Command("hello", "inspect", (Arg("from_node"),),
            "Celery's mingle: the node's revoked ids and clock."),
    Command("memsample", "inspect", help="Not in qops (Celery: psutil); says so."),
    Command("memdump", "inspect", help="Not in qops (Celery: psutil); says so."),
    Command("objgraph", "inspect", help="Not in qops (Celery: objgraph); says so."),
    Command("revoke", "control", (Arg("task_id", str, True, many=True),),
            "Do not run these tasks (with --terminate: kill them if running)."),
    Command("terminate", "control", (Arg("signal"), Arg("task_id", str, True, many=True)),
            "Kill running tasks with a signal (revoke --terminate)."),
    Command("rate_limit", "control", (Arg("task_name"), Arg("rate_limit")),
            "Set a task's rate limit (e.g. 10/m; 0 removes it)."),
    Command("time_limit", "control",
            (Arg("task_name"), Arg("soft", float), Arg("hard", float, False)),
            "Set a task's soft and hard time limits (seconds)."),
    Command("add_consumer", "control", (Arg("queue"),), "Start consuming a queue."),
    Command("cancel_consumer", "control", (Arg("queue"),), "Stop consuming a queue."),
    Command("pool_grow", "control", (Arg("n", int, False),), "Add pool processes."),
    Command("pool_shrink", "control", (Arg("n", int, False),), "Remove pool processes."),
    Command("autoscale", "control", (Arg("max", int), Arg("min", int)),
            "Set the pool size bounds."),
    Command("pool_restart", "control", (Arg("modules", str, False, many=True),),
            "Import task modules (--reload: reload them) and replace the pool processes; "
            "needs worker_pool_restarts."),
    Command("heartbeat", "control", help="Send a worker-heartbeat event now."),
    Command("election", "control", (Arg("id"), Arg("topic"), Arg("action", str, False)),
            "Not in qops (no gossip); says so."),
    Command("shutdown", "control", help="Warm shutdown (each node replies first)."),
    Command("enable_events", "control", help="Start sending task events."),
    Command("disable_events", "control", help="Stop sending task events."),
]}
# ping is both an inspect and a control command in Celery
INSPECT = [c for c in COMMANDS.values() if c.group == "inspect"]
CONTROL = [c for c in COMMANDS.values() if c.group == "control"] + [COMMANDS["ping"]]


def parse_arguments(method: str, values: Sequence[str],
                    options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The arguments of ``method`` from its positional arguments (strings) and
    ``options``, checked before anything is sent (``qops.values``)."""
    cmd = COMMANDS.get(method)
    if cmd is None:
        raise UsageError(f"unknown command {method!r}: see --list")
    out: dict[str, Any] = {}
    rest = list(values)
    for raw in rest:
        if not raw.strip():  # "$RATE" unset: never read as "no limit" or "every task"
            raise UsageError(f"{method}: an empty argument (an unset variable?)")
    for arg in cmd.args:
        if arg.many:
            if not rest:
                if arg.required:
                    raise UsageError(f"{method} needs {arg.name} (at least one)")
                continue
            out[arg.name] = rest
            rest = []
            continue
        if not rest:
            if arg.required:
                raise UsageError(f"{method} needs {arg.name} "
                                 f"(usage: {method} {' '.join(a.name for a in cmd.args)})")
            continue
        raw = rest.pop(0)
        try:
            if arg.kind is bool:
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError
                out[arg.name] = raw.lower() in ("1", "true", "yes")
            else:
                out[arg.name] = arg.kind(raw)
        except ValueError:
            raise UsageError(f"{method}: {arg.name} must be a {arg.kind.__name__}, "
                             f"not {raw!r}") from None
    if rest:
        raise UsageError(f"{method}: too many arguments: {' '.join(rest)}")
    return check_arguments(method, {**out, **(options or {})})


@dataclass
class Replies:
    method: str
    replies: dict[str, Any] = field(default_factory=dict)
    expected: list[str] | None = None  # named nodes waited for
    expected_count: int | None = None  # how many live nodes (when names are unknown)
    elapsed: float = 0.0
    duplicates: list[str] = field(default_factory=list)  # names more than one node replied as
    #: replies dropped because their signature did not verify: node (or sender) -> why
    rejected: dict[str, str] = field(default_factory=dict)
    #: whether the command was signed (a control key is configured)
    signed: bool = False

    @property
    def missing(self) -> list[str]:
        return sorted(set(self.expected or ()) - set(self.replies))

    @property
    def errors(self) -> dict[str, str]:
        return {n: r["error"] for n, r in self.replies.items()
                if isinstance(r, dict) and "error" in r}

    def complete(self) -> bool:
        if self.expected is not None:
            return not self.missing
        if self.expected_count is not None:
            return len(self.replies) >= self.expected_count
        return False

    def exit_code(self) -> int:
        if not self.replies:
            return EX_UNAVAILABLE
        if self.errors:
            return EX_FAILURE
        if self.expected is not None and self.missing:
            return EX_TEMPFAIL
        if self.expected_count is not None and len(self.replies) < self.expected_count:
            return EX_TEMPFAIL
        return EX_OK

    def as_dict(self) -> dict[str, Any]:
        out = {"method": self.method, "replies": self.replies, "missing": self.missing,
               "elapsed": round(self.elapsed, 4)}
        if self.rejected:  # replies whose signature did not verify (docs/security.md)
            out["rejected"] = self.rejected
        return out


def name_taken(app: App, name: str, timeout: float = 1.0) -> bool:
    """True when a live node already answers to ``name``. The broker's node registry
    says whom to ask (a name it lists, or any live node where it only counts them); the
    ping proves it, so a node killed a moment ago (still listed) does not count."""
    live = app.transport.live_nodes()
    if not live or (isinstance(live, list) and name not in live):
        return False
    return name in broadcast(app, "ping", destination=[name], timeout=timeout).replies


def reply_queue_name(reply_to: dict[str, Any]) -> str:
    """kombu's name for a client's reply queue: ``<oid>.reply.<mailbox>``."""
    return f"{reply_to['routing_key']}.{reply_to['exchange']}"


def broadcast(app: App, method: str, arguments: dict[str, Any] | None = None, *,
              destination: Sequence[str] | None = None, pattern: str | None = None,
              matcher: str | None = None, timeout: float = 1.0,
              reply: bool = True, linger: float = 0.0) -> Replies:
    """Send a remote-control command; collect replies until every expected node has
    answered or ``timeout`` (a total deadline) passes. ``linger``: keep listening that
    long once complete, for a second node answering to a name already heard from. Bad
    arguments or a bad destination/pattern raise UsageError before anything is sent."""
    arguments = check_arguments(method, arguments)
    target(destination, pattern, matcher)
    start = time.monotonic()
    deadline = start + timeout
    transport = app.transport
    mailbox = app.names["mailbox"]
    result = Replies(method)
    if destination:
        result.expected = list(destination)
    elif pattern is None and app.conf.compat == "qops":
        live = transport.live_nodes()
        if isinstance(live, int):
            result.expected_count = live
        elif live is not None:
            result.expected = list(live)
    oid = uuid.uuid4().hex
    ticket = str(uuid.uuid4())
    request: dict[str, Any] = {
        "method": method, "arguments": arguments or {},
        "destination": list(destination) if destination else None,
        "pattern": pattern, "matcher": matcher,
    }
    consumer = None
    if reply:
        request["ticket"] = ticket
        reply_to = request["reply_to"] = {"exchange": f"reply.{mailbox}", "routing_key": oid}
        consumer = transport.reply_consumer(reply_queue_name(reply_to),
                                            exchange=reply_to["exchange"], routing_key=oid)
    signer = control_signer(app)
    result.signed = signer is not None
    try:
        body = json.dumps(request).encode()
        headers: dict[str, Any] = {"clock": 1, "expires": int(time.time() + timeout + 1)}
        if signer is not None:
            headers[HEADER] = signer.sign("control", body)
        transport.broadcast(mailbox, Message(body=body, headers=headers))
        if consumer is None:
            return result
        if (result.expected is not None and not result.expected) or \
                result.expected_count == 0:
            # nobody is alive: still give a stray node a moment, but not the timeout
            deadline = min(deadline, time.monotonic() + min(timeout, 0.2))
        done_at: float | None = None
        while True:
            if done_at is None and result.complete():
                if linger <= 0:
                    break
                done_at = time.monotonic()
                deadline = min(deadline, done_at + linger)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            d = consumer.get(left)
            if d is None:
                continue
            consumer.ack(d)
            if d.message is None or (d.message.headers or {}).get("ticket") != ticket:
                continue
            try:
                body = json.loads(d.message.body)
            except ValueError:
                continue
            if signer is not None and isinstance(body, dict):
                auth = d.message.headers.get(HEADER)
                try:
                    signer.verify("reply", d.message.body, auth, context=ticket)
                except SignatureError as exc:
                    for node in body or ["?"]:
                        result.rejected[str(node)] = str(exc)
                    continue
            if isinstance(body, dict):
                result.duplicates += [n for n in body if n in result.replies]
                result.replies.update(body)
    finally:
        if consumer is not None:
            consumer.close()
        result.elapsed = time.monotonic() - start
    return result


class Control:
    """``app.control``: remote control from code, with Celery's method names, arguments
    and replies: without ``reply=True`` nothing is awaited and None is returned; with
    it, a list of ``{node: reply}``. ``inspect()`` gives the read-only commands."""

    def __init__(self, app: App) -> None:
        self.app = app

    def inspect(self, destination: Sequence[str] | str | None = None, timeout: float = 1.0,
                pattern: str | None = None, matcher: str | None = None,
                **kwargs: Any) -> Inspect:
        return Inspect(self.app, destination=destination, timeout=timeout,
                       pattern=pattern, matcher=matcher)

    def broadcast(self, command: str, arguments: dict[str, Any] | None = None,
                  destination: Sequence[str] | str | None = None, reply: bool = False,
                  timeout: float = 1.0, pattern: str | None = None,
                  matcher: str | None = None, **kwargs: Any) -> list[dict[str, Any]] | None:
        """Send ``command`` to the nodes (``destination``: those only); with ``reply``, the
        replies as Celery gives them: ``[{node: reply}, ...]``."""
        if isinstance(destination, str):
            destination = [destination]
        found = broadcast(self.app, command, arguments, destination=destination,
                          pattern=pattern, matcher=matcher, timeout=timeout, reply=reply)
        if not reply:
            return None
        return [{node: answer} for node, answer in found.replies.items()]

    def _send(self, command: str, arguments: dict[str, Any], destination: Any,
              kwargs: dict[str, Any]) -> list[dict[str, Any]] | None:
        return self.broadcast(command, arguments, destination=destination, **kwargs)

    def revoke(self, task_id: str | Sequence[str], destination: Sequence[str] | None = None,
               terminate: bool = False, signal: str = "SIGTERM", **kwargs: Any
               ) -> list[dict[str, Any]] | None:
        """Tell the nodes not to run these tasks (they settle them REVOKED); with
        ``terminate``, also send ``signal`` to the process running one (prefork)."""
        ids = [task_id] if isinstance(task_id, str) else list(task_id)
        return self._send("revoke", {"task_id": ids, "terminate": terminate,
                                     "signal": signal or "SIGTERM"}, destination, kwargs)

    def terminate(self, task_id: str | Sequence[str], destination: Sequence[str] | None = None,
                  signal: str = "SIGTERM", **kwargs: Any) -> list[dict[str, Any]] | None:
        """``revoke(..., terminate=True)``."""
        return self.revoke(task_id, destination=destination, terminate=True, signal=signal,
                           **kwargs)

    def ping(self, destination: Sequence[str] | None = None, timeout: float = 1.0,
             **kwargs: Any) -> list[dict[str, Any]]:
        return self.broadcast("ping", destination=destination, reply=True,
                              timeout=timeout) or []

    def rate_limit(self, task_name: str, rate_limit: str | int,
                   destination: Sequence[str] | None = None, **kwargs: Any
                   ) -> list[dict[str, Any]] | None:
        return self._send("rate_limit", {"task_name": task_name, "rate_limit": rate_limit},
                          destination, kwargs)

    def time_limit(self, task_name: str, soft: float | None = None,
                   hard: float | None = None, destination: Sequence[str] | None = None,
                   **kwargs: Any) -> list[dict[str, Any]] | None:
        return self._send("time_limit", {"task_name": task_name, "soft": soft, "hard": hard},
                          destination, kwargs)

    def add_consumer(self, queue: str, exchange: str | None = None,
                     exchange_type: str = "direct", routing_key: str | None = None,
                     options: dict[str, Any] | None = None,
                     destination: Sequence[str] | None = None, **kwargs: Any
                     ) -> list[dict[str, Any]] | None:
        args = {"queue": queue, "exchange": exchange, "exchange_type": exchange_type,
                "routing_key": routing_key, **(options or {})}
        return self._send("add_consumer", args, destination, kwargs)

    def cancel_consumer(self, queue: str, destination: Sequence[str] | None = None,
                        **kwargs: Any) -> list[dict[str, Any]] | None:
        return self._send("cancel_consumer", {"queue": queue}, destination, kwargs)

    def pool_grow(self, n: int = 1, destination: Sequence[str] | None = None,
                  **kwargs: Any) -> list[dict[str, Any]] | None:
        return self._send("pool_grow", {"n": n}, destination, kwargs)

    def pool_shrink(self, n: int = 1, destination: Sequence[str] | None = None,
                    **kwargs: Any) -> list[dict[str, Any]] | None:
        return self._send("pool_shrink", {"n": n}, destination, kwargs)

    def autoscale(self, max: int, min: int,  # noqa: A002 - Celery's names
                  destination: Sequence[str] | None = None, **kwargs: Any
                  ) -> list[dict[str, Any]] | None:
        return self._send("autoscale", {"max": max, "min": min}, destination, kwargs)

    def pool_restart(self, modules: Sequence[str] | None = None, reload: bool = False,
                     reloader: Any = None, destination: Sequence[str] | None = None,
                     **kwargs: Any) -> list[dict[str, Any]] | None:
        """Import ``modules`` (all task modules if None; ``reload``: reload those
        imported already) and replace the pool processes; the nodes refuse unless
        ``worker_pool_restarts`` is on."""
        args: dict[str, Any] = {"reload": reload}
        if modules is not None:
            args["modules"] = list(modules)
        return self._send("pool_restart", args, destination, kwargs)

    def shutdown(self, destination: Sequence[str] | None = None, **kwargs: Any
                 ) -> list[dict[str, Any]] | None:
        return self._send("shutdown", {}, destination, kwargs)

    def heartbeat(self, destination: Sequence[str] | None = None, **kwargs: Any
                  ) -> list[dict[str, Any]] | None:
        return self._send("heartbeat", {}, destination, kwargs)

    def election(self, id: str, topic: str, action: str | None = None,  # noqa: A002
                 destination: Sequence[str] | None = None, **kwargs: Any
                 ) -> list[dict[str, Any]] | None:
        return self._send("election", {"id": id, "topic": topic, "action": action},
                          destination, kwargs)

    def enable_events(self, destination: Sequence[str] | None = None, **kwargs: Any
                      ) -> list[dict[str, Any]] | None:
        return self._send("enable_events", {}, destination, kwargs)

    def disable_events(self, destination: Sequence[str] | None = None, **kwargs: Any
                       ) -> list[dict[str, Any]] | None:
        return self._send("disable_events", {}, destination, kwargs)

    def purge(self) -> int:
        """Delete the messages waiting in the app's default queue; how many."""
        return int(self.app.transport.purge(self.app.default_queue))


class Inspect:
    """``app.control.inspect()``: each method asks the nodes and returns
    ``{node: reply}``, or None when no node answered (as Celery's)."""

    def __init__(self, app: App, destination: Sequence[str] | str | None = None,
                 timeout: float = 1.0, pattern: str | None = None,
                 matcher: str | None = None) -> None:
        self.app = app
        self.destination = destination
        self.timeout = timeout
        self.pattern = pattern
        self.matcher = matcher

    def _request(self, command: str, **arguments: Any) -> dict[str, Any] | None:
        dest = self.destination
        found = broadcast(self.app, command, arguments,
                          destination=[dest] if isinstance(dest, str) else dest,
                          pattern=self.pattern, matcher=self.matcher, timeout=self.timeout)
        return dict(found.replies) or None

    def ping(self, destination: Sequence[str] | None = None) -> dict[str, Any] | None:
        if destination:
            self.destination = destination
        return self._request("ping")

    def clock(self) -> dict[str, Any] | None:
        return self._request("clock")

    def active(self, safe: bool | None = None) -> dict[str, Any] | None:
        return self._request("active")

    def scheduled(self, safe: bool | None = None) -> dict[str, Any] | None:
        return self._request("scheduled")

    def reserved(self, safe: bool | None = None) -> dict[str, Any] | None:
        return self._request("reserved")

    def stats(self) -> dict[str, Any] | None:
        return self._request("stats")

    def revoked(self) -> dict[str, Any] | None:
        return self._request("revoked")

    def registered(self, *taskinfoitems: str) -> dict[str, Any] | None:
        return self._request("registered", taskinfoitems=list(taskinfoitems))

    registered_tasks = registered

    def active_queues(self) -> dict[str, Any] | None:
        return self._request("active_queues")

    def query_task(self, *ids: str | Sequence[str]) -> dict[str, Any] | None:
        flat: list[str] = []
        for i in ids:  # Celery takes query_task(a, b) and query_task([a, b])
            flat.extend([i] if isinstance(i, str) else i)
        return self._request("query_task", ids=flat)

    def conf(self, with_defaults: bool = False) -> dict[str, Any] | None:
        return self._request("conf", with_defaults=with_defaults)

    def report(self) -> dict[str, Any] | None:
        return self._request("report")

    def hello(self, from_node: str, revoked: Any = None) -> dict[str, Any] | None:
        return self._request("hello", from_node=from_node, revoked=revoked)

    def memsample(self) -> dict[str, Any] | None:
        return self._request("memsample")

    def memdump(self, samples: int = 10) -> dict[str, Any] | None:
        return self._request("memdump", samples=samples)

    def objgraph(self, type: str = "Request", n: int = 200,  # noqa: A002
                 max_depth: int = 10) -> dict[str, Any] | None:
        return self._request("objgraph", type=type, num=n, max_depth=max_depth)
