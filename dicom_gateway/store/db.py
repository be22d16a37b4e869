"""The job store's SQLite database: one connection per thread, write transactions, the schema at open.

WAL journal; `synchronous=FULL` when durable. `busy_timeout` (30 s) serialises writers across threads
and processes. Every state change is one `tx()`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dicom_gateway.store.schema import migrate


class Database:
    """One SQLite file; opening it applies the missing migrations (or refuses a newer schema)."""

    def __init__(self, path: Path, durable: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._durable = durable
        self._local = threading.local()
        migrate(self.conn(), self.path)

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (autocommit mode; `tx` opens the transactions)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if self._durable else 'NORMAL'}")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT; ROLLBACK on any exception)."""
        conn = self.conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Rows of one read statement."""
        return self.conn().execute(sql, args).fetchall()

    def one(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Row | None:
        """The first row of one read statement, or None."""
        rows = self.query(sql, args)
        return rows[0] if rows else None

    def close(self) -> None:
        """Close this thread's connection (others keep theirs)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
