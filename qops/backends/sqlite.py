"""Results in the embedded SQLite file (the default with the SQLite broker)."""

from __future__ import annotations

import time
from typing import Any

from qops.backends.base import SUCCESS, ResultBackend
from qops.transports.sqlite.transport import SQLiteDB
from qops.transports.sqlite.url import path_from_url


class SQLiteBackend(ResultBackend):
    @classmethod
    def check_url(cls, url: str) -> None:
        path_from_url(url, "result backend URL")

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.db = SQLiteDB(url, what="SQLite result backend")
        self._last_sweep = 0.0

    def _get(self, task_id: str) -> bytes | None:
        row = self.db.conn().execute(
            "SELECT data, expires FROM results WHERE task_id = ?", (task_id,)).fetchone()
        if row is None or (row[1] is not None and row[1] < time.time()):
            return None
        return bytes(row[0])

    def _store(self, task_id: str, data: bytes, state: str, *, reply_to: str | None) -> None:
        now = time.time()
        expires = now + self.expires if self.expires else None
        with self.db.write() as conn:
            # One statement: insert, or overwrite unless a SUCCESS is there already.
            conn.execute(
                "INSERT INTO results (task_id, status, data, expires) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (task_id) DO UPDATE SET status = excluded.status, "
                "data = excluded.data, expires = excluded.expires "
                "WHERE results.status != ?",
                (task_id, state, data, expires, SUCCESS))
            if now - self._last_sweep > 60:
                self._last_sweep = now
                conn.execute("DELETE FROM results WHERE expires IS NOT NULL AND expires < ?",
                             (now,))

    def cleanup(self) -> None:
        with self.db.write() as conn:
            conn.execute("DELETE FROM results WHERE expires IS NOT NULL AND expires < ?",
                         (time.time(),))

    def _delete(self, task_id: str) -> None:
        with self.db.write() as conn:
            conn.execute("DELETE FROM results WHERE task_id = ?", (task_id,))

    def close(self) -> None:
        self.db.close()
