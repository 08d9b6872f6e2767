"""AsyncResult: the handle a producer keeps for a task it sent."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from qops import protocol
from qops.backends.base import FAILURE, READY_STATES, REVOKED, SUCCESS
from qops.errors import TaskRevokedError

if TYPE_CHECKING:
    from qops.app import App
    from qops.backends.base import ResultBackend


class AsyncResult:
    def __init__(self, id: str, app: App | None = None,
                 backend: ResultBackend | None = None) -> None:
        self.id = id
        self.app = app
        self._backend = backend
        self._cache: dict[str, Any] | None = None
        #: the result of the step before this one in a chain (None: the first, or not
        #: sent as part of a chain by this process), as Celery's ``parent``
        self.parent: AsyncResult | GroupResult | None = None

    def __repr__(self) -> str:
        return f"<AsyncResult: {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def task_id(self) -> str:
        return self.id

    @property
    def backend(self) -> ResultBackend:
        if self._backend is None:
            if self.app is None:  # AsyncResult(id), as in Celery: the current app's
                from qops.app import current_app

                self.app = current_app()
            self._backend = self.app.backend
        return self._backend

    def _meta(self) -> dict[str, Any]:
        if self._cache is not None:
            return self._cache
        meta = self.backend.get_meta(self.id)
        if meta["status"] in READY_STATES:
            self._cache = meta  # a final state never changes
        return meta

    @property
    def state(self) -> str:
        return str(self._meta()["status"])

    status = state

    @property
    def result(self) -> Any:
        meta = self._meta()
        if meta["status"] in (FAILURE, REVOKED) or (
                meta["status"] == "RETRY" and isinstance(meta.get("result"), dict)):
            return protocol.dict_to_exception(meta["result"])
        return meta["result"]

    info = result

    @property
    def traceback(self) -> str | None:
        return self._meta().get("traceback")

    @property
    def date_done(self) -> str | None:
        return self._meta().get("date_done")

    def ready(self) -> bool:
        return self.state in READY_STATES

    def successful(self) -> bool:
        return self.state == SUCCESS

    def failed(self) -> bool:
        return self.state == FAILURE

    def get(self, timeout: float | None = None, propagate: bool = True,
            interval: float | None = None) -> Any:
        """Wait for the task and return its result.

        A failed task's exception is raised (its own type where it can be rebuilt) when
        ``propagate`` is true, returned otherwise. Raises ResultTimeout after ``timeout``."""
        if self._cache is None:
            self._cache = self.backend.wait(self.id, timeout)
        meta = self._cache
        if meta["status"] == SUCCESS:
            return meta["result"]
        exc = protocol.dict_to_exception(meta["result"])
        if meta["status"] == REVOKED and not isinstance(exc, TaskRevokedError):
            exc = TaskRevokedError(f"task {self.id} was revoked: {meta['result']}")
        if propagate:
            raise exc
        return exc

    wait = get

    def forget(self) -> None:
        self._cache = None
        self.backend.forget(self.id)

    def revoke(self, connection: Any = None, terminate: bool = False,
               signal: str | None = None, wait: bool = False,
               timeout: float | None = None) -> None:
        """Tell every node not to run this task: one that holds it (prefetched, waiting
        for its ETA) settles it REVOKED at once, one that gets it later too. With
        ``terminate``, a running one is killed with ``signal`` (default SIGTERM; prefork
        pool only). ``wait``: until the live nodes have answered, at most ``timeout``
        seconds (default 1). ``connection`` is accepted for Celery's signature."""
        _revoke(self.app, [self.id], terminate, signal, wait, timeout)

    def as_dict(self) -> dict[str, Any]:
        meta = dict(self._meta())
        meta.setdefault("task_id", self.id)
        return meta


class GroupResult:
    """The results of a group, in the order of its members: ``group(...)().get()``.

    Members are AsyncResults, or GroupResults for nested groups (whose ``get()`` gives
    a list in that place)."""

    def __init__(self, id: str, results: Iterable[AsyncResult | GroupResult] | None = None,
                 app: App | None = None) -> None:
        self.id = id
        self.results: list[AsyncResult | GroupResult] = list(results or ())
        self.app = app
        self.parent: AsyncResult | GroupResult | None = None  # as AsyncResult.parent

    def __repr__(self) -> str:
        return f"<GroupResult: {self.id} [{', '.join(r.id for r in self.results)}]>"

    def __iter__(self) -> Iterator[AsyncResult | GroupResult]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index: int) -> AsyncResult | GroupResult:
        return self.results[index]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GroupResult) and other.id == self.id \
            and other.results == self.results

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def children(self) -> list[AsyncResult | GroupResult]:
        return self.results

    def ready(self) -> bool:
        """Every member has finished (succeeded, failed or was revoked)."""
        return all(r.ready() for r in self.results)

    def successful(self) -> bool:
        """Every member succeeded."""
        return all(r.successful() for r in self.results)

    def failed(self) -> bool:
        """At least one member failed."""
        return any(r.failed() for r in self.results)

    def waiting(self) -> bool:
        return not self.ready()

    def completed_count(self) -> int:
        """How many members succeeded (as Celery counts it)."""
        return sum(1 for r in self.results if r.successful())

    def get(self, timeout: float | None = None, propagate: bool = True,
            interval: float | None = None) -> list[Any]:
        """The members' results in order. With ``propagate`` the first failure met (in
        member order) is raised; without, failed members give their exception. Raises
        ResultTimeout when ``timeout`` (for the whole group) runs out."""
        return self.join(timeout=timeout, propagate=propagate, interval=interval)

    def join(self, timeout: float | None = None, propagate: bool = True,
             interval: float | None = None) -> list[Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        values: list[Any] = []
        for r in self.results:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            values.append(r.get(timeout=left, propagate=propagate))
        return values

    wait = get

    def forget(self) -> None:
        for r in self.results:
            r.forget()

    def revoke(self, connection: Any = None, terminate: bool = False,
               signal: str | None = None, wait: bool = False,
               timeout: float | None = None) -> None:
        """Revoke every member (nested groups too) in one command: see AsyncResult.revoke."""
        app = self.app or next((r.app for r in self.results if r.app is not None), None)
        _revoke(app, self._ids(), terminate, signal, wait, timeout)

    def _ids(self) -> list[str]:
        return [i for r in self.results
                for i in (r._ids() if isinstance(r, GroupResult) else [r.id])]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "results": [r.as_dict() for r in self.results]}


def _revoke(app: App | None, ids: list[str], terminate: bool, signal: str | None,
            wait: bool, timeout: float | None) -> None:
    if app is None:
        from qops.app import current_app

        app = current_app()
    app.control.revoke(ids, terminate=terminate, signal=signal or "SIGTERM", reply=wait,
                       timeout=1.0 if timeout is None else timeout)
