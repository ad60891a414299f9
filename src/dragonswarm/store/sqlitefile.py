"""What both SQLite files of ours (the state store and the response cache) open and write the
same way: a file only its owner can read, one connection shared by threads, WAL."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BUSY_TIMEOUT_S = 5.0


def open_private(path: Path) -> sqlite3.Connection:
    """Open (or create) `path`, readable by its owner only, in WAL mode.

    The file is created by us with mode 0600 so that it is never readable by others, even for a
    moment (the state store holds key hashes); SQLite gives the -wal and -shm files the same
    mode. isolation_level=None: transactions are opened by `immediate`, never by sqlite3 behind
    our back. In WAL mode synchronous=NORMAL loses no committed data when the process crashes,
    only on power loss, and spares an fsync per write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    os.chmod(path, 0o600)
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
    except BaseException:
        db.close()
        raise
    return db


@contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction. IMMEDIATE takes the write lock up front, so a busy file is waited on
    (busy timeout) instead of failing when a deferred read upgrades to a write."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
