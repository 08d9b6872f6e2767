"""Workflows. A chain travels inside the message (``chain`` in the body, reversed, as
Celery does), so any worker speaking the protocol can continue it."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from qops.task import Signature

if TYPE_CHECKING:
    from qops.app import App
    from qops.result import AsyncResult


class chain(Signature):  # noqa: N801 - Celery's name
    def __init__(self, *tasks: Any, app: App | None = None) -> None:
        self.tasks: list[Signature]
        flat: list[Signature] = []
        for t in tasks:
            if isinstance(t, (list, tuple)) and not isinstance(t, Signature):
                flat.extend(_sig(x, app) for x in t)
            elif isinstance(t, chain):
                flat.extend(t.tasks)
            else:
                flat.append(_sig(t, app))
        if not flat:
            raise ValueError("chain needs at least one task")
        super().__init__("qops.chain", kwargs={"tasks": [dict(s) for s in flat]},
                         subtask_type="chain", app=app or flat[0]._app)
        self.tasks = flat

    @classmethod
    def from_dict(cls, d: dict[str, Any], app: App | None = None) -> chain:
        return cls(*[Signature(t, app=app) for t in d["kwargs"]["tasks"]], app=app)

    def __or__(self, other: Any) -> chain:  # type: ignore[override] # | means "then", as in Celery
        return chain(*self.tasks, other, app=self._app)

    def apply_async(self, args: Iterable[Any] | None = None,
                    kwargs: dict[str, Any] | None = None, **options: Any) -> AsyncResult:
        # Every task gets its id now, so the result of the last one can be returned
        # before the first has run.
        tasks = [t.clone() for t in self.tasks]
        for t in tasks:
            t["options"].setdefault("task_id", str(uuid.uuid4()))
        first, rest = tasks[0], tasks[1:]
        first = first.clone(args, kwargs, **options)
        rest_dicts = [dict(t) for t in reversed(rest)]
        self.app.send_signature(first, chain=rest_dicts or None)
        return self.app.AsyncResult(tasks[-1]["options"]["task_id"])

    def __call__(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return self.apply_async(args, kwargs)

    def __repr__(self) -> str:
        return " | ".join(repr(t) for t in self.tasks)


def _sig(value: Any, app: App | None) -> Signature:
    if isinstance(value, Signature):
        return value
    if isinstance(value, dict):
        return Signature(value, app=app)
    raise TypeError(f"not a signature: {value!r}")
