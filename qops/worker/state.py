"""Revoked task ids: what a node must not run, and the state file that keeps them.

A node remembers each revoked id for ``REVOKE_EXPIRES`` seconds, at most
``REVOKES_MAX`` ids (the oldest go first), as Celery does (the same defaults, and the
same environment variables to change them). With a state file (``qops worker
--statedb PATH``, the ``worker_state_db`` setting) the ids outlive a restart: the file
is read at start-up and written, atomically (a temporary file renamed over it), after
each revoke and at shutdown.

The file is qops's own, JSON: ``{"qops_state": 1, "revoked": [[id, unix time], ...]}``
(Celery's shelve file is not read).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator

log = logging.getLogger("qops.worker")

REVOKES_MAX = int(os.environ.get("CELERY_WORKER_REVOKES_MAX", "50000"))
REVOKE_EXPIRES = float(os.environ.get("CELERY_WORKER_REVOKE_EXPIRES", "10800"))
FORMAT_VERSION = 1


class Revoked:
    """A bounded set of revoked task ids, each forgotten ``expires`` seconds after it was
    revoked. ``id in revoked`` is a dict lookup (it runs for every task)."""

    def __init__(self, maxlen: int = REVOKES_MAX, expires: float = REVOKE_EXPIRES,
                 path: str | None = None) -> None:
        self.maxlen = maxlen
        self.expires = expires
        self.path = path
        self._ids: dict[str, float] = {}  # id -> when revoked, oldest first
        self._lock = threading.Lock()

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._ids

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._ids))

    def __len__(self) -> int:
        return len(self._ids)

    def items(self) -> list[tuple[str, float]]:
        with self._lock:
            return list(self._ids.items())

    def update(self, ids: Iterable[str], when: float | None = None) -> None:
        """Revoke ``ids`` (now, or at ``when``)."""
        self.merge((task_id, when or time.time()) for task_id in ids)

    def merge(self, items: Iterable[tuple[str, float]]) -> None:
        """Add (id, when revoked) pairs: another process's or the state file's."""
        with self._lock:
            ids = self._ids
            for task_id, when in items:
                ids.pop(task_id, None)  # re-revoking renews it
                ids[task_id] = when
            self._purge_locked()

    def _purge_locked(self) -> None:
        ids = self._ids
        if len(ids) > self.maxlen:
            for task_id in list(ids)[:len(ids) - self.maxlen]:
                del ids[task_id]
        oldest = time.time() - self.expires
        for task_id in [i for i, when in ids.items() if when < oldest]:
            del ids[task_id]  # (a revoke is rare: a full pass is cheap enough)

    # -- the state file ---------------------------------------------------------------------
    def load(self, path: str) -> None:
        """Use the state file ``path`` from now on, after adding what it holds (a missing
        file is a first start; an unreadable one is logged and replaced)."""
        self.path = os.path.abspath(path)
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
            if not isinstance(doc, dict) or doc.get("qops_state") != FORMAT_VERSION:
                raise ValueError("not a qops state file")
            pairs = [(str(i), float(t)) for i, t in doc.get("revoked", [])]
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError) as exc:
            log.error("state file %s unreadable (%s): starting without it", self.path, exc)
            return
        pairs.sort(key=lambda pair: pair[1])
        self.merge(pairs)

    def save(self) -> None:
        """Write the state file, if there is one (a temporary file renamed over it)."""
        if not self.path:
            return
        with self._lock:
            self._purge_locked()
            doc = {"qops_state": FORMAT_VERSION,
                   "revoked": [[i, round(t, 3)] for i, t in self._ids.items()]}
            folder = os.path.dirname(self.path) or "."
            try:
                fd, tmp = tempfile.mkstemp(prefix=".statedb-", dir=folder)
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        json.dump(doc, f, separators=(",", ":"))
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.path)
                except BaseException:
                    os.unlink(tmp)
                    raise
            except OSError as exc:
                log.error("could not write the state file %s: %s", self.path, exc)
