"""Workflows: chain, group, chord.

They are signatures (docs/protocol.md §1.3 dicts) like Celery's, with ``subtask_type``
``chain``/``group``/``chord`` and the members in ``kwargs``, so they travel in messages:

- A **chain** travels inside the message: the first task is sent with the rest in its
  body's ``chain`` field (reversed: the worker pops the last one), as Celery does, so a
  Celery worker can continue a chain a qops client started. Every task's id is chosen
  before anything is sent, so the chain's result (the last task's) is known at once.
- A **group** sends every member at once with the same ``group`` id and its
  ``group_index``; its result is a GroupResult in the members' order.
- A **chord** is a group (the header) and a callback (the body) that gets the list of
  the header's results. It needs no worker support: the built-in task
  ``qops.chord_unlock`` looks at the header's results in the result backend, runs again
  a little later until they are all ready (as Celery does without Redis), then sends
  the body -- or, if a member failed, stores that failure as the chord's result.

``group | task`` becomes a chord, and whatever follows a group or chord in a chain goes
into the chord's body, as in Celery. A group or chord inside a chain is continued by a
worker through the built-in tasks ``qops.group`` / ``qops.chord`` (a worker sends the
next signature of a chain by its task name); ``register_builtins(app)`` registers them.

A chain's result stays PENDING if a task in the middle fails, unless the worker calls
``propagate_chain_failure`` for the failed task's remaining chain (it stores the same
failure for each of them).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from qops.backends.base import FAILURE, READY_STATES, REVOKED, SUCCESS
from qops.errors import UsageError
from qops.result import AsyncResult, GroupResult
from qops.task import Signature

if TYPE_CHECKING:
    from qops.app import App

log = logging.getLogger("qops.canvas")

CHAIN, GROUP, CHORD = "qops.chain", "qops.group", "qops.chord"
CHORD_UNLOCK = "qops.chord_unlock"
#: chord_unlock looks again after min(MAX, FIRST * GROWTH ** retries) seconds
UNLOCK_FIRST, UNLOCK_GROWTH, UNLOCK_MAX = 0.05, 1.5, 1.0
#: options of a chain that the later tasks get too (countdown/eta: only the first)
CHAIN_SHARED = ("queue", "priority", "expires", "time_limit", "soft_time_limit",
                "ignore_result")

ResultType = AsyncResult | GroupResult


# -- building signatures ---------------------------------------------------------------


def maybe_signature(value: Any, app: App | None = None) -> Signature:
    """A Signature (or chain/group/chord) from a signature or a signature dict."""
    if isinstance(value, Signature):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"not a signature: {value!r}")
    kind = value.get("subtask_type")
    if kind == "chain":
        return chain.from_dict(value, app=app)
    if kind == "group":
        return group.from_dict(value, app=app)
    if kind == "chord":
        return chord.from_dict(value, app=app)
    return Signature(value, app=app)


def _app_of(sigs: Iterable[Signature], app: App | None) -> App | None:
    if app is not None:
        return app
    for s in sigs:
        if s._app is not None:
            return s._app
    return None


def _options(options: dict[str, Any] | None) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, list) else v) for k, v in (options or {}).items()}


class chain(Signature):  # noqa: N801 - Celery's name
    """``chain(add.s(4, 4), mul.s(8))`` or ``add.s(4, 4) | mul.s(8)``: each task gets the
    previous one's result as its first argument (unless it is immutable, ``.si()``)."""

    def __init__(self, *tasks: Any, app: App | None = None,
                 options: dict[str, Any] | None = None) -> None:
        flat: list[Signature] = []
        for t in tasks:
            if isinstance(t, chain):
                flat.extend(t.tasks)
            elif isinstance(t, dict):
                sig = maybe_signature(t, app)
                flat.extend(sig.tasks if isinstance(sig, chain) else [sig])
            elif isinstance(t, Iterable) and not isinstance(t, (str, bytes)):
                flat.extend(chain(*t, app=app).tasks)
            else:
                raise TypeError(f"not a signature: {t!r}")
        if not flat:
            raise ValueError("chain needs at least one task")
        steps = _upgrade(flat, app)
        super().__init__(CHAIN, kwargs={"tasks": steps}, options=_options(options),
                         subtask_type="chain", app=_app_of(steps, app))

    @property
    def tasks(self) -> list[Signature]:
        return list(self["kwargs"]["tasks"])

    @classmethod
    def from_dict(cls, d: dict[str, Any], app: App | None = None) -> chain:
        return cls(*[maybe_signature(t, app) for t in d["kwargs"]["tasks"]], app=app,
                   options=d.get("options"))

    def clone(self, args: Iterable[Any] | None = None, kwargs: dict[str, Any] | None = None,
              **options: Any) -> chain:
        tasks = [t.clone() for t in self.tasks]
        if args or kwargs:
            tasks[0] = tasks[0].clone(args, kwargs)
        return chain(*tasks, app=self._app, options={**_options(self.options), **options})

    def __or__(self, other: Any) -> chain:  # type: ignore[override] # "then", as in Celery
        return chain(*self.tasks, other, app=self._app, options=self.options)

    def link(self, callback: dict[str, Any]) -> dict[str, Any]:
        return self.tasks[-1].link(callback)

    def link_error(self, errback: dict[str, Any]) -> dict[str, Any]:
        for t in self.tasks:
            t.link_error(errback)
        return errback

    def freeze(self) -> ResultType:
        result: ResultType | None = None
        for t in self.tasks:
            result = freeze(t)
        assert result is not None
        return result

    def apply_async(self, args: Iterable[Any] | None = None,
                    kwargs: dict[str, Any] | None = None, **options: Any) -> Any:
        """Send the first task with the rest in its message; returns the last task's
        result (a GroupResult when the chain ends with a group)."""
        last_id = options.pop("task_id", None)
        c = self.clone()
        tasks = c.tasks
        if last_id is not None:
            tasks[-1].set(task_id=last_id)
        shared = {**{k: v for k, v in c.options.items() if k in CHAIN_SHARED},
                  **{k: v for k, v in options.items() if k in CHAIN_SHARED}}
        for t in tasks:
            _share(t, shared)
        result = c.freeze()
        first, rest = tasks[0], tasks[1:]
        if rest:
            if not _is_plain(first):  # cannot happen after _upgrade; kept for safety
                raise UsageError(f"a chain cannot start with {first!r} and go on")
            options["chain"] = [to_dict(t) for t in reversed(rest)] or None
        first.apply_async(args, kwargs, **options)
        return result

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)

    def __repr__(self) -> str:
        return " | ".join(repr(t) for t in self.tasks)


class group(Signature):  # noqa: N801 - Celery's name
    """``group(add.s(i, i) for i in range(10))``: the members run in parallel; the
    result is a GroupResult whose ``get()`` lists their results in order."""

    def __init__(self, *tasks: Any, app: App | None = None,
                 options: dict[str, Any] | None = None, **extra: Any) -> None:
        items: list[Any]
        if len(tasks) == 1 and not isinstance(tasks[0], dict) and isinstance(tasks[0], Iterable):
            items = list(tasks[0])
        else:
            items = list(tasks)
        members = [maybe_signature(t, app) for t in items]
        super().__init__(GROUP, kwargs={"tasks": members},
                         options={**_options(options), **extra}, subtask_type="group",
                         app=_app_of(members, app))

    @property
    def tasks(self) -> list[Signature]:
        return list(self["kwargs"]["tasks"])

    @classmethod
    def from_dict(cls, d: dict[str, Any], app: App | None = None) -> group:
        return cls([maybe_signature(t, app) for t in d["kwargs"]["tasks"]], app=app,
                   options=d.get("options"))

    def clone(self, args: Iterable[Any] | None = None, kwargs: dict[str, Any] | None = None,
              **options: Any) -> group:
        return group([t.clone(args, kwargs) for t in self.tasks], app=self._app,
                     options={**_options(self.options), **options})

    def __or__(self, other: Any) -> Any:
        return chain(self, other, app=self._app)

    def link_error(self, errback: dict[str, Any]) -> dict[str, Any]:
        for t in self.tasks:
            t.link_error(errback)
        return errback

    def freeze(self) -> GroupResult:
        gid = self["options"].setdefault("task_id", str(uuid.uuid4()))
        return GroupResult(gid, [freeze(t) for t in self.tasks], app=self.app)

    def apply_async(self, args: Iterable[Any] | None = None,  # type: ignore[override]
                    kwargs: dict[str, Any] | None = None, **options: Any) -> GroupResult:
        gid = options.pop("task_id", None)
        g = self.clone()
        if gid is not None:
            g["options"]["task_id"] = gid
        result = g.freeze()
        shared = {k: v for k, v in g.options.items() if k != "task_id"}
        shared.update(options)
        # the plain members in one batch (App.publish_many), the others one by one
        plain = [member.message(args, kwargs, group=result.id, group_index=index, **shared)
                 for index, member in enumerate(g.tasks) if _is_plain(member)]
        if plain:
            self.app.publish_many(plain)
        for member in g.tasks:
            if not _is_plain(member):
                member.apply_async(args, kwargs, **shared)
        return result

    def __call__(self, *args: Any, **options: Any) -> GroupResult:
        return self.apply_async(args, **options)

    def delay(self, *args: Any, **kwargs: Any) -> GroupResult:  # type: ignore[override]
        return self.apply_async(args, kwargs)

    def __len__(self) -> int:
        return len(self["kwargs"]["tasks"])

    def __repr__(self) -> str:
        return f"group([{', '.join(repr(t) for t in self.tasks)}])"


class chord(Signature):  # noqa: N801 - Celery's name
    """``chord(header, body)``: run the header group, then the body with the list of
    the header's results. ``chord(header)(body)`` works too. The result is the body's."""

    def __init__(self, header: Any, body: Any = None, *, app: App | None = None,
                 options: dict[str, Any] | None = None, kwargs: dict[str, Any] | None = None,
                 **extra: Any) -> None:
        head = header if isinstance(header, group) else (
            maybe_signature(header, app) if isinstance(header, dict) else group(header, app=app))
        if not isinstance(head, group):
            head = group([head], app=app)
        tail = None if body is None else maybe_signature(body, app)
        super().__init__(CHORD, kwargs={"header": head, "body": tail, "kwargs": kwargs or {}},
                         options={**_options(options), **extra}, subtask_type="chord",
                         app=_app_of([head, *([tail] if tail else [])], app))

    @property
    def header(self) -> group:
        head: group = self["kwargs"]["header"]
        return head

    @property
    def body(self) -> Signature | None:
        body: Signature | None = self["kwargs"]["body"]
        return body

    @property
    def tasks(self) -> list[Signature]:
        return self.header.tasks

    @classmethod
    def from_dict(cls, d: dict[str, Any], app: App | None = None) -> chord:
        kw = d["kwargs"]
        body = kw.get("body")
        return cls(maybe_signature(kw["header"], app), body and maybe_signature(body, app),
                   app=app, options=d.get("options"), kwargs=kw.get("kwargs"))

    def clone(self, args: Iterable[Any] | None = None, kwargs: dict[str, Any] | None = None,
              **options: Any) -> chord:
        body = self.body
        return chord(self.header.clone(args, kwargs), body.clone() if body else None,
                     app=self._app, options={**_options(self.options), **options})

    def __or__(self, other: Any) -> Any:
        return chain(self, other, app=self._app)

    def link(self, callback: dict[str, Any]) -> dict[str, Any]:
        if self.body is None:
            raise UsageError("this chord has no body yet")
        return self.body.link(callback)

    def link_error(self, errback: dict[str, Any]) -> dict[str, Any]:
        if self.body is not None:
            self.body.link_error(errback)
        return errback

    def freeze(self) -> ResultType:
        if self.body is None:
            raise UsageError("a chord needs a body: chord(header, body) or chord(header)(body)")
        self.header.freeze()
        return freeze(self.body)

    def apply_async(self, args: Iterable[Any] | None = None,
                    kwargs: dict[str, Any] | None = None, *, body: Any = None,
                    **options: Any) -> Any:
        body_id = options.pop("task_id", None)
        c = self.clone()
        if body is not None:
            c["kwargs"]["body"] = maybe_signature(body, self._app).clone()
        if c.body is None:
            raise UsageError("a chord needs a body: chord(header, body) or chord(header)(body)")
        if body_id is not None and _is_plain(c.body):
            c.body.set(task_id=body_id)
        app = c.app
        _check_backend(app)
        result = c.freeze()
        header = c.header
        header_result = header.apply_async(args, kwargs, **options)
        send_chord_unlock(app, header_result, c.body)
        return result

    def __call__(self, body: Any = None, **options: Any) -> ResultType:
        return self.apply_async((), {}, body=body, **options)

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"


def _upgrade(steps: list[Signature], app: App | None) -> list[Signature]:
    """``group`` followed by anything becomes a chord whose body is the rest; a
    ``chord`` followed by anything gets the rest appended to its body (as Celery)."""
    out: list[Signature] = []
    for i, step in enumerate(steps):
        rest = steps[i + 1:]
        if rest and isinstance(step, group):
            body = rest[0] if len(rest) == 1 else chain(*rest, app=app)
            out.append(chord(step, body, app=app, options=step.options))
            return out
        if rest and isinstance(step, chord):
            body = chain(*([step.body] if step.body else []), *rest, app=app)
            out.append(chord(step.header, body if len(body.tasks) > 1 else body.tasks[0],
                             app=app, options=step.options))
            return out
        out.append(step)
    return out


def _share(sig: Signature, shared: dict[str, Any]) -> None:
    """Options of a whole chain, as defaults for each of its tasks (members too)."""
    if isinstance(sig, (chain, group)):
        for t in sig.tasks:
            _share(t, shared)
    elif isinstance(sig, chord):
        _share(sig.header, shared)
        if sig.body is not None:
            _share(sig.body, shared)
    else:
        for key, value in shared.items():
            sig["options"].setdefault(key, value)


def _is_plain(sig: Signature) -> bool:
    return sig.get("subtask_type") not in ("chain", "group", "chord")


def to_dict(sig: Signature) -> dict[str, Any]:
    """A plain JSON-ready dict of a signature (nested members too)."""
    out = dict(sig)
    out["options"] = dict(sig["options"])
    kw = sig["kwargs"]
    kind = sig.get("subtask_type")
    if kind in ("chain", "group"):
        out["kwargs"] = {**kw, "tasks": [to_dict(t) for t in kw["tasks"]]}
    elif kind == "chord":
        out["kwargs"] = {**kw, "header": to_dict(kw["header"]),
                         "body": to_dict(kw["body"]) if kw.get("body") else None}
    return out


def freeze(sig: Signature) -> ResultType:
    """Give ``sig`` (and its members) their task ids now; return its result handle."""
    if isinstance(sig, (chain, group, chord)):
        return sig.freeze()
    tid = sig["options"].setdefault("task_id", str(uuid.uuid4()))
    return AsyncResult(tid, app=sig.app)


def _check_backend(app: App) -> None:
    url = app.result_backend_url or ""
    if url.startswith("rpc:"):
        raise UsageError("a chord needs a result backend that stores results (redis:// or "
                         "sqlite://): with rpc:// only the caller sees the header's results")
    if not url:
        raise UsageError("a chord needs a result backend (result_backend): the body waits "
                         "for the header's results there")


# -- chord_unlock ------------------------------------------------------------------------


def result_spec(res: ResultType) -> Any:
    """A result as plain data: a task id, or ``{"group": id, "results": [...]}``."""
    if isinstance(res, GroupResult):
        return {"group": res.id, "results": [result_spec(r) for r in res.results]}
    return res.id


def result_from_spec(spec: Any, app: App) -> ResultType:
    if isinstance(spec, dict):
        return GroupResult(spec["group"], [result_from_spec(s, app) for s in spec["results"]],
                           app=app)
    return AsyncResult(str(spec), app=app)


def send_chord_unlock(app: App, header_result: GroupResult, body: Signature,
                      countdown: float = 0.0) -> None:
    """Send ``qops.chord_unlock`` to the body's queue (so workers that run the body
    run it too), as Celery's fallback_chord_unlock does."""
    first = body.tasks[0] if isinstance(body, chain) else body
    queue = first["options"].get("queue") if _is_plain(first) else None
    if queue is None and _is_plain(first):
        queue = app.route(first.name, None, app.tasks.get(first.name))
    app.send_task(CHORD_UNLOCK, [header_result.id, result_spec(header_result), to_dict(body)],
                  countdown=countdown or None, queue=queue, ignore_result=True, reply_to="")


def _leaves(res: ResultType) -> list[AsyncResult]:
    if isinstance(res, GroupResult):
        return [leaf for r in res.results for leaf in _leaves(r)]
    return [res]


def chord_unlock_step(app: App, results: Any, body: dict[str, Any]) -> bool:
    """One look at a chord's header: False when not everything is ready yet; else the
    body is sent (all succeeded) or failed (a member failed), and True is returned."""
    header = result_from_spec(results, app)
    metas = [(leaf, app.backend.get_meta(leaf.id)) for leaf in _leaves(header)]
    failed = [(leaf, m) for leaf, m in metas if m["status"] in (FAILURE, REVOKED)]
    if failed:
        leaf, meta = failed[0]
        log.error("chord: member %s failed (%s): failing the chord", leaf.id,
                  _exc_text(meta.get("result")))
        fail_signature(app, body, meta.get("result"), meta.get("traceback"), errbacks=True)
        return True
    if any(m["status"] not in READY_STATES for _, m in metas):
        return False
    values = {leaf.id: m["result"] for leaf, m in metas if m["status"] == SUCCESS}
    maybe_signature(body, app).apply_async((_values(header, values),))
    return True


def _values(res: ResultType, values: dict[str, Any]) -> Any:
    if isinstance(res, GroupResult):
        return [_values(r, values) for r in res.results]
    return values[res.id]


def _exc_text(meta: Any) -> str:
    if isinstance(meta, dict) and "exc_type" in meta:
        return f"{meta['exc_type']}: {', '.join(str(m) for m in meta.get('exc_message') or [])}"
    return repr(meta)


# -- failure propagation -------------------------------------------------------------------


def task_ids(sig: dict[str, Any]) -> list[str]:
    """Every task id already chosen inside a signature dict (members, bodies)."""
    kind = sig.get("subtask_type")
    kw = sig.get("kwargs") or {}
    if kind in ("chain", "group"):
        return [i for t in kw.get("tasks") or [] for i in task_ids(t)]
    if kind == "chord":
        ids = task_ids(kw["header"]) if kw.get("header") else []
        return ids + (task_ids(kw["body"]) if kw.get("body") else [])
    tid = (sig.get("options") or {}).get("task_id")
    nested = (sig.get("options") or {}).get("chain") or []
    return ([tid] if tid else []) + [i for t in nested for i in task_ids(t)]


def fail_signature(app: App, sig: dict[str, Any], exc_meta: Any, traceback: str | None = None,
                   *, errbacks: bool = False) -> None:
    """Store FAILURE with ``exc_meta`` (the failed task's exception, as stored) for every
    task id inside ``sig``; with ``errbacks``, send the first task's ``link_error``s."""
    for tid in task_ids(sig):
        app.backend.store(tid, FAILURE, exc_meta, traceback)
    if errbacks:
        first: dict[str, Any] = sig
        while first.get("subtask_type") == "chain":
            first = first["kwargs"]["tasks"][0]
        first_id = (first.get("options") or {}).get("task_id")
        if _is_plain(Signature(first)) and first_id:
            for eb in (first.get("options") or {}).get("link_error") or []:
                try:
                    Signature(eb, app=app).clone([first_id]).apply_async()
                except Exception as exc:
                    log.error("chord: could not send errback %r: %s", eb, exc)


def propagate_chain_failure(app: App, request_chain: list[dict[str, Any]] | None,
                            exc_meta: Any, traceback: str | None = None) -> None:
    """A task failed with ``request_chain`` still to run: store its failure for every
    task of that rest, so the chain's result (the last task's) fails with the original
    exception instead of staying PENDING. Never raises (called by the worker)."""
    if not request_chain:
        return
    try:
        if not app.has_backend:
            return
        for sig in request_chain:
            fail_signature(app, sig, exc_meta, traceback)
    except Exception as exc:
        log.error("could not store the failure for the rest of the chain: %s", exc)


# -- built-in tasks --------------------------------------------------------------------------


def register_builtins(app: App) -> None:
    """Register qops.chain / qops.group / qops.chord (a worker continuing a chain sends
    these by name) and qops.chord_unlock on ``app``. Called from App.__init__."""
    if CHORD_UNLOCK in app.tasks:
        return

    def run_chain(*args: Any, tasks: list[dict[str, Any]], **_: Any) -> None:
        chain(*[maybe_signature(t, app) for t in tasks], app=app).apply_async(args)

    def run_group(*args: Any, tasks: list[dict[str, Any]], **_: Any) -> None:
        gid = _current_id(app)
        g = group([maybe_signature(t, app) for t in tasks], app=app)
        g.apply_async(args, task_id=gid)

    def run_chord(*args: Any, header: dict[str, Any], body: dict[str, Any] | None = None,
                  kwargs: dict[str, Any] | None = None, **_: Any) -> None:
        c = chord(maybe_signature(header, app), body and maybe_signature(body, app), app=app)
        c.apply_async(args)

    def chord_unlock(self: Any, group_id: str, results: Any, body: dict[str, Any]) -> None:
        if not chord_unlock_step(app, results, body):
            retries = int(self.request.retries or 0)
            raise self.retry(countdown=min(UNLOCK_MAX, UNLOCK_FIRST * UNLOCK_GROWTH ** retries))

    app.task(name=CHAIN, typing=False)(run_chain)
    app.task(name=GROUP, typing=False)(run_group)
    app.task(name=CHORD, typing=False)(run_chord)
    app.task(name=CHORD_UNLOCK, bind=True, max_retries=None, ignore_result=True)(chord_unlock)


def _current_id(app: App) -> str | None:
    req = app.current_request()
    return req.id if req is not None else None
