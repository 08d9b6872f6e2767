"""In-process result backend for unit tests (``memory://name``)."""

from __future__ import annotations

import json
import threading
import time

from qops.backends.base import SUCCESS, ResultBackend

_STORES: dict[str, dict[str, tuple[bytes, float | None]]] = {}
_LOCK = threading.Condition()


class MemoryBackend(ResultBackend):
    def __init__(self, url: str, **kwargs: object) -> None:
        super().__init__(url, **kwargs)  # type: ignore[arg-type]
        with _LOCK:
            self._data = _STORES.setdefault(url, {})

    def _get(self, task_id: str) -> bytes | None:
        with _LOCK:
            item = self._data.get(task_id)
            if item is None:
                return None
            data, until = item
            if until is not None and until < time.time():
                del self._data[task_id]
                return None
            return data

    def _store(self, task_id: str, data: bytes, state: str, *, reply_to: str | None) -> None:
        with _LOCK:
            old = self._data.get(task_id)
            if old is not None and json.loads(old[0]).get("status") == SUCCESS:
                return
            until = time.time() + self.expires if self.expires else None
            self._data[task_id] = (data, until)
            _LOCK.notify_all()

    def _delete(self, task_id: str) -> None:
        with _LOCK:
            self._data.pop(task_id, None)

    def _wait(self, task_id: str, timeout: float) -> None:
        with _LOCK:
            _LOCK.wait(timeout)
