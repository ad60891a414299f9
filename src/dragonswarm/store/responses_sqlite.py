"""The response cache of one orchestrator: a SQLite file of its own under the home.

Its own file, not a table in `state.db`: answers come and go by the thousand, and their
writes must not queue behind (or hold up) the store's keys and usage; a cache file can
also be deleted at any time, losing nothing but answers. It holds answers to prompts,
so it is created private to its owner (mode 0600), like the store.

Bounded twice: an answer expires after the time to live, and the answers together stay
under `max_bytes`, the oldest going first. Calls run in a thread (`asyncio.to_thread`):
a write may wait on the file's lock, and the event loop must not.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

from dragonswarm.errors import ConfigError, StoreUnavailable
from dragonswarm.store.sqlitefile import immediate, open_private

log = logging.getLogger("dragonswarm.store")

T = TypeVar("T")

SCHEMA_VERSION = 1

# The rowid orders answers by when they were kept: INSERT OR REPLACE gives a replaced answer a
# new, larger one, so the oldest answers have the smallest.
SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    expires REAL NOT NULL,
    size INTEGER NOT NULL,
    value BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_expires ON responses (expires)
"""

# Every answer but the newest ones that fit in the bound together (?), in one statement.
EVICT = """
DELETE FROM responses WHERE rowid IN (
    SELECT rowid FROM (SELECT rowid, SUM(size) OVER (ORDER BY rowid DESC) AS kept FROM responses) WHERE kept > ?
)
"""


class SqliteResponses:
    """`ResponseStore` over one SQLite file: answers for `ttl_s`, at most `max_bytes` of them."""

    def __init__(self, path: Path, ttl_s: float, max_bytes: int) -> None:
        self.path = path
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        # One connection for the threads that call it, one at a time (the lock).
        self._lock = threading.Lock()
        self._db = open_private(path)  # an answer lost to a power cut is only a miss
        try:
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        version = cast(int, self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise ConfigError(f"{self.path} has schema version {version}, newer than this dragonswarm "
                              f"({SCHEMA_VERSION}); delete it (it holds only cached answers)")  # fmt: skip
        if version < SCHEMA_VERSION:
            with immediate(self._db) as db:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    async def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                return work(self._db)

        try:
            return await asyncio.to_thread(locked)
        except sqlite3.Error as exc:
            log.warning("the response cache (%s) failed: %s", self.path, exc)
            raise StoreUnavailable("the response cache is unavailable") from exc

    async def get(self, key: str) -> bytes | None:
        def read(db: sqlite3.Connection) -> bytes | None:
            row = db.execute("SELECT value FROM responses WHERE key = ? AND expires > ?", (key, time.time())).fetchone()
            return None if row is None else bytes(row[0])

        return await self._call(read)

    async def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return  # kept, it would push every other answer out, and itself with them

        def write(db: sqlite3.Connection) -> None:
            now = time.time()
            with immediate(db):
                db.execute("INSERT OR REPLACE INTO responses (key, expires, size, value) VALUES (?, ?, ?, ?)",
                           (key, now + self.ttl_s, len(value), value))  # fmt: skip
                db.execute("DELETE FROM responses WHERE expires <= ?", (now,))
                db.execute(EVICT, (self.max_bytes,))

        await self._call(write)

    async def close(self) -> None:
        with self._lock:
            self._db.close()
