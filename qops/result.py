"""AsyncResult: the handle a producer keeps for a task it sent."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qops import protocol
from qops.backends.base import FAILURE, READY_STATES, REVOKED, SUCCESS
from qops.errors import NoResultBackend, TaskRevokedError

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
            if self.app is None:
                raise NoResultBackend("this result has no app; make it with app.AsyncResult(id)")
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

    def as_dict(self) -> dict[str, Any]:
        meta = dict(self._meta())
        meta.setdefault("task_id", self.id)
        return meta
