"""The worker side of remote control (docs/protocol.md, section 4): listen on the
mailbox broadcast channel, run the command if this node is a destination, reply to the
client's queue.

Each ``handle_<method>`` pairs with the client-side validation in ``qops/control.py``.
Two kinds of handlers:

- ``@handler``: about the node (ping, stats, pool size, shutdown...), given the node
  (``qops/worker/worker.py``);
- ``@task_handler``: about tasks (active, reserved, revoke, rate limits, queues...),
  given a consumer loop (``qops/worker/consumer.py``). Every process that consumes
  answers them: the node with its loop, and where pool children consume for
  themselves, each child with its own; the node's reply merges theirs (Pool.gather).
  ``stats`` is both: the node's facts, and each process's count of finished tasks.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qops.control import reply_queue_name
from qops.errors import ProtocolError, UsageError
from qops.protocol import Message, parse_task_message
from qops.rates import parse_rate
from qops.signing import HEADER, SignatureError, control_signer
from qops.values import check_arguments, expired, target

if TYPE_CHECKING:
    from qops.worker.consumer import ConsumerLoop
    from qops.worker.worker import Worker

log = logging.getLogger("qops.worker")

Handler = Callable[..., Any]
#: commands about the node: fun(worker, **arguments)
HANDLERS: dict[str, Handler] = {}
#: commands about tasks, that each consuming process answers: fun(loop, **arguments)
TASK_HANDLERS: dict[str, Handler] = {}


def handler(fun: Handler) -> Handler:
    HANDLERS[fun.__name__.removeprefix("handle_")] = fun
    return fun


def task_handler(fun: Handler) -> Handler:
    TASK_HANDLERS[fun.__name__.removeprefix("handle_")] = fun
    return fun


def run_command(worker: Worker, method: str, arguments: dict[str, Any]) -> Any:
    """The node's reply to a known command (with its consuming children's, for those
    about tasks); raises what the handler raises."""
    fun = HANDLERS.get(method)
    if fun is not None:
        reply = fun(worker, **arguments)
    else:
        reply = TASK_HANDLERS[method](worker.loop, **arguments)
    if method in TASK_HANDLERS and worker.pool is not None:
        reply = worker.pool.gather(method, arguments, reply)
    return reply


def run_task_command(loop: ConsumerLoop, method: str, arguments: dict[str, Any]) -> Any:
    """A pool child's answer to a command about tasks (never raises)."""
    try:
        return TASK_HANDLERS[method](loop, **arguments)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


class ControlServer:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.app = worker.app
        self.mailbox = self.app.names["mailbox"]
        self.clock = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)
        self._sub: Any = None
        #: with a key: only signed commands run, replies are signed (docs/security.md)
        self.signer = control_signer(self.app, sender=worker.hostname)

    def start(self) -> None:
        # Subscribe before returning, so a client that sees this node as live (its
        # heartbeat is registered right after) never broadcasts into the void.
        self._sub = self.app.transport.subscribe(self.mailbox)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and wait for the thread (at most a command it runs now), so
        that nothing uses the broker connections once the worker closes them."""
        self._stop.set()
        if self._sub is not None:
            try:
                self._sub.close()  # wakes the thread's get()
            except Exception:
                pass
        self._thread.join(10.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._sub.get(0.5)
            except Exception as exc:
                if self._stop.is_set():
                    return  # the subscription was closed under us at shutdown
                log.error("control channel error: %s; resubscribing in 1s", exc)
                self._stop.wait(1.0)
                try:
                    self._sub = self.app.transport.subscribe(self.mailbox)
                except Exception:
                    pass
                continue
            if msg is not None:
                try:
                    self.dispatch(msg)
                except Exception:  # whatever it was, the next command must be heard
                    log.exception("control: a message could not be handled; ignored")

    def matches(self, request: dict[str, Any]) -> bool:
        """Whether this node is addressed; raises UsageError if the address is bad."""
        names, test = target(request.get("destination"), request.get("pattern"),
                             request.get("matcher"))
        me = self.worker.hostname
        if names is not None:
            return me in names  # exact names: "w1@h" is not "w11@h"
        return test is None or test(me)

    def dispatch(self, msg: Message) -> None:
        try:
            request = json.loads(msg.body)
        except ValueError:
            log.warning("control: ignored a message that is not JSON")
            return
        if not isinstance(request, dict):
            log.warning("control: ignored a message that is not an object")
            return
        method = str(request.get("method"))
        if self.signer is not None and self.refused(msg, request, method):
            return
        try:
            if not self.matches(request) or \
                    expired((msg.headers or {}).get("expires"), time.time()):
                return  # not for this node, or the client gave up already
        except UsageError as exc:
            log.warning("control: ignored a malformed %s message: %s", method, exc)
            self.reply(request, {"error": f"malformed control message: {exc}"})
            return
        method = control_celery.ALIASES.get(method, method)  # dump_tasks, ...
        fun = HANDLERS.get(method) or TASK_HANDLERS.get(method)
        if fun is None:
            reply: Any = {"error": f"unknown command {method!r}"}
        else:
            try:
                # checked here too: not every client checks (another tool, Celery's)
                args = check_arguments(method, request.get("arguments"))
                reply = run_command(self.worker, method, args)
            except UsageError as exc:
                log.warning("control: refused %s: %s", method, exc)
                reply = {"error": str(exc)}
            except TypeError as exc:
                reply = {"error": f"bad arguments for {method}: {exc}"}
            except Exception as exc:
                log.exception("control command %s failed", method)
                reply = {"error": f"{type(exc).__name__}: {exc}"}
        self.reply(request, reply)
        after = getattr(fun, "after_reply", None)
        if after is not None:
            after(self.worker)

    def refused(self, msg: Message, request: dict[str, Any], method: str) -> bool:
        """With a key: False for a valid, fresh, first-seen signature; otherwise log
        the refusal (once: one line per message, only on the nodes it addresses), send
        an error reply where one is expected (not to a replay), and return True."""
        assert self.signer is not None
        auth = (msg.headers or {}).get(HEADER)
        try:
            self.signer.verify("control", msg.body, auth)
            return False
        except SignatureError as exc:
            reason = str(exc)
        try:
            if not self.matches(request):
                return True
        except UsageError:
            pass
        claimed = auth.get("sender") if isinstance(auth, dict) else None
        reply_to = request.get("reply_to")
        sender = (f"{claimed!r}" if isinstance(claimed, str) else "no sender") + (
            f", reply queue {reply_to.get('routing_key')!r}"
            if isinstance(reply_to, dict) else "")
        log.warning("control: refused %s from %s: %s", method, sender, reason)
        if not reason.startswith("replayed"):
            self.reply(request, {"error": f"refused ({reason}): this node only obeys "
                                          "control messages signed with its control key"})
        return True

    def reply(self, request: dict[str, Any], reply: Any) -> None:
        """Answer the client, if it wants an answer (never raises)."""
        reply_to, ticket = request.get("reply_to"), request.get("ticket")
        if not reply_to or not ticket:
            return
        self.clock += 1
        try:
            body = json.dumps({self.worker.hostname: reply}, default=str).encode()
            headers: dict[str, Any] = {"ticket": ticket, "clock": self.clock}
            if self.signer is not None:
                headers[HEADER] = self.signer.sign("reply", body, context=str(ticket))
            self.app.transport.send_reply(reply_queue_name(reply_to),
                                          Message(body=body, headers=headers))
        except Exception as exc:
            log.error("control: could not reply to %s: %s", request.get("method"), exc)


# -- what the worker knows about its tasks ----------------------------------------------


def _job_info(loop: ConsumerLoop, job: dict[str, Any], acknowledged: bool) -> dict[str, Any]:
    ctx = job.get("context", {})
    return {
        "id": job["id"], "name": job["name"], "args": job["args"], "kwargs": job["kwargs"],
        "type": job["name"], "hostname": loop.hostname,
        "time_start": job.get("time_start"), "acknowledged": acknowledged,
        "delivery_info": ctx.get("delivery_info", {}), "worker_pid": job.get("worker_pid"),
    }


def _request_info(loop: ConsumerLoop, req: Any, delivery: Any) -> dict[str, Any]:
    return {
        "id": req.id, "name": req.name, "args": req.args, "kwargs": req.kwargs,
        "type": req.name, "hostname": loop.hostname, "time_start": None,
        "acknowledged": False, "worker_pid": None,
        "delivery_info": {"exchange": "", "routing_key": delivery.queue,
                          "priority": req.priority, "redelivered": delivery.redelivered},
    }


def active(loop: ConsumerLoop) -> list[dict[str, Any]]:
    assert loop.pool is not None
    return [_job_info(loop, j, not loop.acks_late_for(j["name"]))
            for j in loop.pool.running_jobs()]


def _taken(loop: ConsumerLoop, waiting: bool) -> list[tuple[Any, Any]]:
    """Reserved tasks (taken, not started): those waiting for their ETA if ``waiting``,
    else the others (prefetched: queued for the pool, waiting for a rate limit, or
    received by the consumer and not handed out yet: a pool child running a task)."""
    now = dt.datetime.now(dt.timezone.utc)
    with loop.lock:
        items = list(loop.reserved.values())
    if loop.consumer is not None:
        loop.consumer.keepalive()  # read what the broker sent meanwhile (owner busy)
        for d in loop.consumer.buffered():
            if d.message is None:
                continue
            try:
                items.append((parse_task_message(d.message), d))
            except ProtocolError:
                continue  # dead-lettered when its turn comes
    return [(req, d) for req, d in items
            if (req.eta is not None and req.eta > now) is waiting]


def reserved(loop: ConsumerLoop) -> list[dict[str, Any]]:
    return [_request_info(loop, req, d) for req, d in _taken(loop, False)]


def scheduled(loop: ConsumerLoop) -> list[dict[str, Any]]:
    return [{"eta": req.eta.isoformat(), "priority": req.priority,
             "request": _request_info(loop, req, d)} for req, d in _taken(loop, True)]


# -- handlers -------------------------------------------------------------------------------


@handler
def handle_ping(worker: Worker) -> dict[str, Any]:
    return {"ok": "pong"}


@handler
def handle_stats(worker: Worker) -> dict[str, Any]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    pool = worker.pool
    return {
        "total": dict(worker.loop.processed),
        "pid": os.getpid(),
        "clock": str(worker.events.clock if worker.events else 0),
        "uptime": int(time.time() - worker.started_at),
        "pool": {"implementation": worker.pool_kind,
                 "max-concurrency": pool.concurrency if pool else worker.concurrency,
                 "processes": pool.pids() if pool else [],
                 "max-tasks-per-child": worker.max_tasks_per_child or "N/A",
                 "timeouts": [worker.app.conf.task_soft_time_limit or 0,
                              worker.app.conf.task_time_limit or 0]},
        "broker": {"transport": worker.app.transport.scheme,
                   "url": worker.app.transport.safe_url()},
        "prefetch_count": worker.prefetch,
        "rusage": {"utime": ru.ru_utime, "stime": ru.ru_stime, "maxrss": ru.ru_maxrss,
                   "minflt": ru.ru_minflt, "majflt": ru.ru_majflt, "nvcsw": ru.ru_nvcsw,
                   "nivcsw": ru.ru_nivcsw},
    }


def _finished(loop: ConsumerLoop) -> dict[str, Any]:
    """A consuming pool child's part of ``stats``: the tasks it finished (the rest of
    the reply is the node's)."""
    return {"total": dict(loop.processed)}


TASK_HANDLERS["stats"] = _finished


@task_handler
def handle_active(loop: ConsumerLoop, safe: bool = False) -> list[dict[str, Any]]:
    return active(loop)


@task_handler
def handle_reserved(loop: ConsumerLoop, safe: bool = False) -> list[dict[str, Any]]:
    return reserved(loop)


@task_handler
def handle_scheduled(loop: ConsumerLoop, safe: bool = False) -> list[dict[str, Any]]:
    return scheduled(loop)


@handler
def handle_registered(worker: Worker, taskinfoitems: Any = None) -> list[str]:
    from qops.builtins import is_builtin

    # the celery.* built-ins are left out, as Celery's workers leave them out
    return sorted(name for name in worker.app.tasks if not is_builtin(name))


@handler
def handle_active_queues(worker: Worker) -> list[dict[str, Any]]:
    decl = worker.app.declarations()
    return [decl.kombu_dict(q) for q in worker.loop.consumed_queues]


@handler
def handle_revoked(worker: Worker) -> list[str]:
    return sorted(worker.loop.revoked)  # the node's: its pool children's are the same


@handler
def handle_conf(worker: Worker, with_defaults: bool = False) -> dict[str, Any]:
    from qops.transports.urls import mask_secrets

    out = {}
    for name, value, source in worker.app.conf.table():
        if not with_defaults and source == "default":
            continue
        value = mask_secrets(value)  # URLs' passwords and password-like keys
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            value = repr(value)
        out[name] = value
    return out


@task_handler
def handle_query_task(loop: ConsumerLoop, ids: Any = None) -> dict[str, Any]:
    wanted = {ids} if isinstance(ids, str) else set(ids or [])
    found: dict[str, Any] = {}
    for state, infos in (("active", active(loop)), ("reserved", reserved(loop)),
                         ("scheduled", [s["request"] for s in scheduled(loop)])):
        for info in infos:
            if info["id"] in wanted:
                found[info["id"]] = [state, info]
    return found


@handler
def handle_report(worker: Worker) -> dict[str, Any]:
    import platform

    from qops import __version__

    info = worker.info()
    lines = [f"software -> qops:{__version__} python:{platform.python_version()}",
             f"platform -> system:{platform.system()} release:{platform.release()}",
             *(f"{k} -> {v}" for k, v in info.items() if k != "tasks")]
    return {"ok": "\n".join(lines)}


@task_handler
def handle_revoke(loop: ConsumerLoop, task_id: Any, terminate: bool = False,
                  signal_name: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Revoke tasks: never run them here (checked again as each starts), settle those
    reserved now (REVOKED), and with ``terminate`` signal the process running one."""
    ids = [task_id] if isinstance(task_id, str) else list(task_id)
    sig_name = signal_name or kwargs.get("signal") or "SIGTERM"
    try:
        signum = _signum(str(sig_name)) if terminate else 0
    except ValueError as exc:
        return {"error": str(exc)}  # nothing changed
    loop.revoked.update(ids)
    loop.revoked.save()  # with a state file (the node's)
    loop.revoke_reserved(ids)
    killed: list[str] = []
    unstoppable: list[str] = []
    if terminate and loop.pool is not None:
        killed = [tid for tid in ids if loop.pool.terminate_job(tid, signum)]
        unstoppable = loop.pool.cannot_terminate(ids)
    text = f"tasks {', '.join(ids)} flagged as revoked"
    if unstoppable:
        assert loop.pool is not None
        return {"error": f"cannot terminate {', '.join(unstoppable)}: the {loop.pool.name} "
                         "pool runs tasks on threads of the worker, which cannot be stopped "
                         "(prefork can): it runs on to its end"
                         + (f"; terminated {', '.join(killed)}" if killed else "")
                         + f"; {text}"}
    if terminate:
        text = f"terminate: {', '.join(killed) or 'none running'}; " + text
    return {"ok": text}


def _signum(name: str) -> int:
    name = name.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ValueError(f"unknown signal {name}") from None


@task_handler
def handle_rate_limit(loop: ConsumerLoop, task_name: str, rate_limit: Any) -> dict[str, Any]:
    task = loop.app.tasks.get(task_name)
    if task is None:
        return {"error": f"unknown task {task_name!r}"}
    loop.rate_limits.set(task_name, rate_limit)
    if not parse_rate(rate_limit):  # "0", "0/m", 0, "": no limit
        task.rate_limit = None
        return {"ok": "rate limit disabled successfully"}
    task.rate_limit = rate_limit
    return {"ok": "new rate limit set successfully"}


@task_handler
def handle_time_limit(loop: ConsumerLoop, task_name: str, soft: float | None = None,
                      hard: float | None = None) -> dict[str, Any]:
    task = loop.app.tasks.get(task_name)
    if task is None:
        return {"error": f"unknown task {task_name!r}"}
    task.soft_time_limit = soft
    task.time_limit = hard
    loop.forget_options(task_name)
    return {"ok": "time limits set successfully"}


@task_handler
def handle_add_consumer(loop: ConsumerLoop, queue: str, **kwargs: Any) -> dict[str, Any]:
    if queue in loop.consumed_queues:
        return {"ok": f"already consuming from {queue!r}"}
    loop.add_queue(queue)
    return {"ok": f"add consumer {queue}"}


@task_handler
def handle_cancel_consumer(loop: ConsumerLoop, queue: str, **kwargs: Any) -> dict[str, Any]:
    if queue not in loop.consumed_queues:
        return {"error": f"not consuming from {queue!r}"}
    loop.cancel_queue(queue)
    return {"ok": f"no longer consuming from {queue}"}


def _resizable(worker: Worker, verb: str) -> Any:
    """The pool, or an error reply when it can't be resized (solo is one thread)."""
    if worker.pool is None or worker.pool_kind == "solo":
        return {"error": f"the {worker.pool_kind} pool cannot {verb}"}
    return worker.pool


@handler
def handle_pool_grow(worker: Worker, n: int = 1) -> dict[str, Any]:
    pool = _resizable(worker, "grow")
    if isinstance(pool, dict):
        return pool
    pool.grow(int(n))
    return {"ok": f"pool will grow to {pool.concurrency}"}


@handler
def handle_pool_shrink(worker: Worker, n: int = 1) -> dict[str, Any]:
    pool = _resizable(worker, "shrink")
    if isinstance(pool, dict):
        return pool
    if pool.concurrency <= 1:
        return {"error": "the pool has one process: it cannot shrink"}
    pool.shrink(int(n))
    return {"ok": f"pool will shrink to {pool.concurrency}"}


@handler
def handle_autoscale(worker: Worker, max: int, min: int) -> dict[str, Any]:  # noqa: A002
    pool = _resizable(worker, "scale")
    if isinstance(pool, dict):
        return pool
    target = max
    if pool.concurrency < target:
        pool.grow(target - pool.concurrency)
    elif pool.concurrency > target:
        pool.shrink(pool.concurrency - target)
    return {"ok": f"autoscale now max={max} min={min} (pool size {pool.concurrency})"}


@handler
def handle_shutdown(worker: Worker, msg: str | None = None) -> dict[str, Any]:
    log.warning("Got shutdown from remote control: %s", msg or "")
    return {"ok": "shutting down"}


def _shutdown_after_reply(worker: Worker) -> None:
    worker.request_stop("warm")


handle_shutdown.after_reply = _shutdown_after_reply  # type: ignore[attr-defined]


@task_handler
def handle_enable_events(loop: ConsumerLoop) -> dict[str, Any]:
    if loop.events is not None:
        loop.events.task_events = True
    return {"ok": "task events enabled"}


@task_handler
def handle_disable_events(loop: ConsumerLoop) -> dict[str, Any]:
    if loop.events is not None:
        loop.events.task_events = False
    return {"ok": "task events disabled"}


# Celery 5's other commands register themselves (handler/task_handler above).
from qops.worker import control_celery  # noqa: E402
