"""The chord join: sending a chord's body once its header has ended, as Celery 5 does,
so that Celery and qops clients and workers can share chords (docs/canvas.md).

- **Counter join** (backends with ``native_join``: Redis). The client stores the chord's
  size; every header task carries the body in its message (``chord``) and, when it ends,
  the worker records its result under the chord's keys (``part_return``). The worker
  whose part completes the chord claims it, reads the parts in header order and sends
  the body with their results -- or, if a part failed, fails the chord (``chord_error``).
- **Polling** (other backends: SQLite, memory): the client sends ``celery.chord_unlock``,
  which looks at the header's results and runs again later until they are all ready
  (``unlock``).

``rpc://`` has no chords (neither in Celery): the results are the caller's messages.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from qops import protocol
from qops.backends.base import FAILURE, READY_STATES, REVOKED, SUCCESS
from qops.errors import ChordError

if TYPE_CHECKING:
    from qops.app import App

log = logging.getLogger("qops.chords")

#: seconds a worker holds the claim on a completed chord while it reads the parts, and
#: then while it sends the body (Celery: twice result_chord_join_timeout, at least 5)
CLAIM_JOIN, CLAIM_SEND = 6, 30
#: chord_unlock without an ``interval``: looks again after min(MAX, FIRST * GROWTH ** n)
UNLOCK_FIRST, UNLOCK_GROWTH, UNLOCK_MAX = 0.05, 1.5, 1.0
PROPAGATE = (FAILURE, REVOKED)


def exc_repr(meta: Any) -> str:
    """``ValueError('boom')`` from a stored exception (as Celery's ``repr(exc)``)."""
    if isinstance(meta, dict) and "exc_type" in meta:
        args = meta.get("exc_message")
        args = args if isinstance(args, list) else [args]
        return f"{meta['exc_type']}({', '.join(repr(a) for a in args)})"
    return repr(meta)


def chord_error_meta(app: App, message: str) -> dict[str, Any]:
    """A ChordError as stored: Celery's class under ``compat celery``, so a Celery client
    raises ``celery.exceptions.ChordError`` (qops reads both as ``qops.ChordError``)."""
    meta = protocol.exception_to_dict(ChordError(message))
    if app.conf.compat == "celery":
        meta["exc_module"] = "celery.exceptions"
    return meta


# -- the counter join ------------------------------------------------------------------------


def part_return(app: App, group_id: str | None, task_id: str | None, index: Any,
                body: Any, state: str, result: Any) -> None:
    """A chord header task ended with ``state``: record it, and when it completes the
    chord, send the body (or fail the chord). Never raises (called by the worker)."""
    if not group_id or not task_id or not body or state not in READY_STATES:
        return
    try:
        if not app.has_backend or not app.backend.native_join:
            return  # celery.chord_unlock polls
        if isinstance(result, BaseException):
            result = protocol.exception_to_dict(result)
        entry = protocol.dumps([1, task_id, state, result]).encode()
        index = index if isinstance(index, int) else None
        done = app.backend.join_part(group_id, task_id, index, entry, CLAIM_JOIN)
        if done is not None:
            _join(app, group_id, body, *done)
    except Exception as exc:
        log.error("chord %s: could not record part %s: %s", group_id, task_id, exc)


def _join(app: App, group_id: str, body: Any, token: str, entries: list[bytes]) -> None:
    backend = app.backend
    values = []
    for raw in entries:
        _, tid, state, value = protocol.loads(raw)
        if state in PROPAGATE:
            log.error("chord %s: part %s raised %s: failing the chord", group_id, tid,
                      exc_repr(value))
            try:
                chord_error(app, body, chord_error_meta(
                    app, f"Dependency {tid} raised {exc_repr(value)}"))
            finally:
                backend.join_abandon(group_id)
            return
        values.append(value)
    if not backend.join_extend(group_id, token, CLAIM_SEND):
        log.warning("chord %s: body not sent: another worker holds the claim", group_id)
        return
    try:
        apply_body(app, body, values)
    except Exception as exc:
        log.error("chord %s: could not send the body: %s", group_id, exc)
        chord_error(app, body, chord_error_meta(app, f"Callback error: {exc!r}"))
    finally:
        if not backend.join_done(group_id, token):
            log.warning("chord %s: claim lost before clean-up; its keys expire", group_id)


def apply_body(app: App, body: Any, values: list[Any]) -> None:
    """Send the chord's body with the header's results as its first argument."""
    from qops.canvas import maybe_signature

    maybe_signature(body, app).apply_async((values,))


def chord_error(app: App, body: Any, meta: dict[str, Any]) -> None:
    """The chord failed: store ``meta`` (a ChordError) as the body's result -- every task
    of a group body, and the rest of the body's chain -- and call the body's errbacks
    with the body's id (each member's, for a group), as Celery does."""
    from qops.canvas import fail_signature, to_dict

    if hasattr(body, "_app"):
        body = to_dict(body)
    fail_signature(app, body, meta, errbacks=True)
    if body.get("subtask_type") == "group":
        gid = (body.get("options") or {}).get("task_id")
        if gid:
            app.backend.store(gid, FAILURE, meta)


# -- polling: celery.chord_unlock -----------------------------------------------------------------


def _tree(spec: Any) -> Any:
    """A result tuple (Celery's ``as_tuple()``: ``[[id, parent], children]``) as a task
    id, or a list of trees for a group."""
    node, children = spec
    if children is not None:
        return [_tree(c) for c in children]
    return node[0] if isinstance(node, list) else node


def _ids(tree: Any) -> list[str]:
    return [i for t in tree for i in _ids(t)] if isinstance(tree, list) else [tree]


def _values(tree: Any, metas: dict[str, dict[str, Any]]) -> Any:
    if isinstance(tree, list):
        return [_values(t, metas) for t in tree]
    return metas[tree]["result"]


def unlock_step(app: App, group_id: str, body: Any, result: list[Any]) -> bool:
    """One look at a chord's header: False while a part is not ready; else the body is
    sent (all succeeded) or the chord failed (a part failed), and True."""
    tree = [_tree(r) for r in result]
    ids = _ids(tree)
    metas = {tid: app.backend.get_meta(tid) for tid in ids}
    if any(m["status"] not in READY_STATES for m in metas.values()):
        return False
    for tid in ids:
        if metas[tid]["status"] in PROPAGATE:
            value = metas[tid]["result"]
            log.error("chord %s: part %s raised %s: failing the chord", group_id, tid,
                      exc_repr(value))
            chord_error(app, body, chord_error_meta(
                app, f"Dependency {tid} raised {exc_repr(value)}"))
            return True
    assert all(m["status"] == SUCCESS for m in metas.values())
    try:
        apply_body(app, body, _values(tree, metas))
    except Exception as exc:
        log.error("chord %s: could not send the body: %s", group_id, exc)
        chord_error(app, body, chord_error_meta(app, f"Callback error: {exc!r}"))
    return True


def unlock_delay(interval: float | None, retries: int) -> float:
    if interval is not None:
        return float(interval)
    return min(UNLOCK_MAX, UNLOCK_FIRST * UNLOCK_GROWTH ** retries)


def result_tuple(res: Any) -> Any:
    """Celery's ``as_tuple()`` of an AsyncResult or GroupResult (no parents)."""
    from qops.result import GroupResult

    if isinstance(res, GroupResult):
        return [[res.id, None], [result_tuple(r) for r in res.results]]
    return [[res.id, None], None]
