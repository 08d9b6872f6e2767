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
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from qops.backends.base import FAILURE
from qops.builtins import CHAIN, CHORD, CHORD_UNLOCK, GROUP
from qops.errors import UsageError
from qops.result import AsyncResult, GroupResult
from qops.task import Signature, bulk_send, send_options

if TYPE_CHECKING:
    from qops.app import App

log = logging.getLogger("qops.canvas")

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
        """The last step's result; each step's ``parent`` is the one before it."""
        result: ResultType | None = None
        for t in self.tasks:
            step = freeze(t)
            step.parent = result
            result = step
        assert result is not None
        return result

    def apply_async(self, args: Iterable[Any] | None = None,
                    kwargs: dict[str, Any] | None = None, **options: Any) -> Any:
        """Send the first task with the rest in its message; returns the last task's
        result (a GroupResult when the chain ends with a group)."""
        last_id = options.pop("task_id", None)
        after = options.pop("chain", None)  # a worker continuing a chain: what follows
        c = self.clone()
        if after:
            c = chain(*c.tasks, *[maybe_signature(t, self._app) for t in reversed(after)],
                      app=self._app, options=c.options)
        tasks = c.tasks
        if any(isinstance(t, chord) for t in tasks):
            _check_backend(c.app)  # before anything is sent, as Celery
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
            # rpc://: every task says where its result goes, as Celery's do (a Celery
            # worker sending the next one does not pass the first one's reply_to on)
            reply_to = options.get("reply_to")
            if reply_to is None and c.app.has_backend:
                reply_to = c.app.backend.prepare_send()
            for t in rest if reply_to else ():
                _share(t, {"reply_to": reply_to})
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
        """The group's id and its members' (a nested group's members are the group's own,
        as in Celery: its result is one flat list)."""
        gid = self["options"].setdefault("task_id", str(uuid.uuid4()))
        return GroupResult(gid, [freeze(t) for t in _flat_members(self)], app=self.app)

    def apply_async(self, args: Iterable[Any] | None = None,  # type: ignore[override]
                    kwargs: dict[str, Any] | None = None, **options: Any) -> GroupResult:
        gid = options.pop("task_id", None)
        g = self.clone()
        if gid is not None:
            g["options"]["task_id"] = gid
        result = g.freeze()
        shared = {k: v for k, v in send_options(g.options).items()
                  if k not in ("task_id", "group", "group_index", "chord")}
        shared.update(options)
        # the plain members in one batch (App.publish_many), the others one by one
        members = list(enumerate(_flat_members(g)))
        bulk_send(self.app, lambda: [
            member.message(args, kwargs, group=result.id, group_index=index, **shared)
            for index, member in members if _is_plain(member)])
        for _, member in members:
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
        """Send the header, each task carrying the body (Celery's chord protocol,
        docs/canvas.md); returns the body's result. ``chain`` (a worker continuing a
        chain) is what runs after the body."""
        body_id = options.pop("task_id", None)
        after = options.pop("chain", None)
        c = self.clone()
        if body is not None:
            c["kwargs"]["body"] = maybe_signature(body, self._app).clone()
        if c.body is None:
            raise UsageError("a chord needs a body: chord(header, body) or chord(header)(body)")
        app = c.app
        _check_backend(app)
        tail = c.body
        if after:
            tail = chain(tail, *[maybe_signature(t, app) for t in reversed(after)], app=app)
        if body_id is not None and _is_plain(tail):
            tail.set(task_id=body_id)
        for key in CHAIN_SHARED:
            if key in options:
                _share(tail, {key: options[key]})
        result = freeze(tail)
        tail = _unchain(tail)
        gid = c.header["options"].setdefault("task_id", str(uuid.uuid4()))
        members = _flat_members(c.header)
        body_dict = to_dict(tail)
        for index, member in enumerate(members):
            _join_into(member, gid, index, body_dict)
        if not members:
            tail.apply_async(([],))
            return result
        backend = app.backend
        if backend.native_join:
            backend.set_chord_size(gid, sum(_parts(m) for m in members))
        else:
            header_result = GroupResult(gid, [freeze(m) for m in members], app=app)
            send_chord_unlock(app, header_result, tail)
        for member in members:
            member.apply_async(args, kwargs, **options)
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


def _flat_members(header: group) -> list[Signature]:
    """A group's members, nested groups unrolled (their tasks are the group's own)."""
    out: list[Signature] = []
    for member in header.tasks:
        out.extend(_flat_members(member) if isinstance(member, group) else [member])
    return out


def _join_into(sig: Signature, group_id: str, index: int, body: dict[str, Any]) -> None:
    """Make ``sig`` one part of the chord ``group_id``: the task whose end completes it
    (a chain's last, a chord's body) carries the group, its index and the body."""
    if isinstance(sig, chain):
        _join_into(sig.tasks[-1], group_id, index, body)
    elif isinstance(sig, chord):
        if sig.body is not None:
            _join_into(sig.body, group_id, index, body)
    elif isinstance(sig, group):
        for member in sig.tasks:
            _join_into(member, group_id, index, body)
    else:
        sig.set(group_id=group_id, group_index=index, chord=body)


def _parts(sig: Signature) -> int:
    """How many part returns ``sig`` makes to a chord (Celery's ``chord._descend``)."""
    if isinstance(sig, group):
        return sum(_parts(t) for t in sig.tasks)
    if isinstance(sig, chain):
        for step in reversed(sig.tasks):
            n = _parts(step)
            if n:
                return n
        return 0
    if isinstance(sig, chord):
        return _parts(sig.body) if sig.body is not None else 0
    return 1


def _unchain(sig: Signature) -> Signature:
    """A frozen chain led by a task, as that task with the rest in its ``chain`` option
    (what a chain's first message carries): the body travels in every header message,
    and a worker of either kind sends it as one task."""
    if not isinstance(sig, chain):
        return sig
    steps = sig.tasks
    if len(steps) == 1:
        return steps[0]
    first = steps[0]
    rest = [to_dict(t) for t in reversed(steps[1:])]
    return first.set(chain=[*rest, *(first.options.get("chain") or [])])


def send_chord_unlock(app: App, header_result: GroupResult, body: Signature) -> None:
    """Send ``celery.chord_unlock`` to the body's queue (so workers that run the body run
    it too), as Celery does for backends without a counter join."""
    from qops.chords import UNLOCK_FIRST, result_tuple

    queue = body["options"].get("queue") if _is_plain(body) else None
    if queue is None and _is_plain(body):
        queue = app.route(body.name, None, app.tasks.get(body.name))
    app.send_task(CHORD_UNLOCK, [header_result.id, to_dict(body)],
                  {"result": [result_tuple(r) for r in header_result.results]},
                  countdown=UNLOCK_FIRST, queue=queue, ignore_result=True, reply_to="")


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
                         "sqlite://): with rpc:// only the caller sees the header's results "
                         "(Celery's rpc backend has no chords either)")
    if not url:
        raise UsageError("a chord needs a result backend (result_backend): the body waits "
                         "for the header's results there")


# -- failure propagation -------------------------------------------------------------------


def _plain_tasks(sig: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The plain task dicts inside a signature dict, and those of their message ``chain``s
    (a chord: its body only, as Celery's failure propagation)."""
    kind = sig.get("subtask_type")
    kw = sig.get("kwargs") or {}
    if kind in ("chain", "group"):
        for t in kw.get("tasks") or []:
            yield from _plain_tasks(t)
    elif kind == "chord":
        if kw.get("body"):
            yield from _plain_tasks(kw["body"])
    else:
        yield sig
        for t in (sig.get("options") or {}).get("chain") or []:
            yield from _plain_tasks(t)


def task_ids(sig: dict[str, Any]) -> list[str]:
    """Every task id already chosen inside a signature dict (members, bodies)."""
    ids = [(t.get("options") or {}).get("task_id") for t in _plain_tasks(sig)]
    return [i for i in ids if i]


def fail_signature(app: App, sig: dict[str, Any], exc_meta: Any, traceback: str | None = None,
                   *, errbacks: bool = False) -> None:
    """Store FAILURE with ``exc_meta`` (the failed task's exception, as stored) for every
    task inside ``sig``; a chord header task among them counts as its chord's part (or
    the chord would wait for it forever). With ``errbacks``, send the ``link_error``s of
    the first task (of each member, for a group) with that task's id."""
    from qops.chords import part_return

    for task in _plain_tasks(sig):
        opts = task.get("options") or {}
        tid = opts.get("task_id")
        if tid:
            app.backend.store(tid, FAILURE, exc_meta, traceback)
        if opts.get("chord"):
            part_return(app, opts.get("group_id") or opts.get("group"), tid,
                        opts.get("group_index"), opts["chord"], FAILURE, exc_meta)
    if not errbacks:
        return
    firsts = (sig.get("kwargs") or {}).get("tasks") or [] \
        if sig.get("subtask_type") == "group" else [sig]
    for first in firsts:
        while first.get("subtask_type") == "chain":
            first = first["kwargs"]["tasks"][0]
        opts = first.get("options") or {}
        if not _is_plain(Signature(first)) or not opts.get("task_id"):
            continue
        for eb in opts.get("link_error") or []:
            try:
                Signature(eb, app=app).clone([opts["task_id"]]).apply_async()
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
