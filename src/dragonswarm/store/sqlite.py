"""The SQLite store: one file under the home directory, shared by the orchestrator and the CLI.

Both may have it open at once (`dragon keys create` while the orchestrator runs), so the
file is in WAL mode, so readers never block the writer, with a busy timeout, so a write
waits for the other process's write rather than failing.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from dragonswarm.errors import ConfigError
from dragonswarm.store.base import (
    KeyRecord,
    NodeIdentity,
    NodeRecord,
    NodeUsage,
    Role,
    Store,
    Usage,
    check_new_key,
    check_usage,
    first_hour_kept,
    hash_key,
    hour_of,
    key_prefix,
    new_credential,
    new_key,
)
from dragonswarm.store.sqlitefile import immediate, open_private

SCHEMA_VERSION = 5

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    prefix TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    state TEXT NOT NULL,
    info TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    key_id INTEGER NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    PRIMARY KEY (key_id, model)
);
"""

# Version 2: keys can expire and be revoked; admitted nodes hold their own credential.
SCHEMA_V2 = """
ALTER TABLE keys ADD COLUMN expires REAL;
ALTER TABLE keys ADD COLUMN revoked REAL;
CREATE TABLE IF NOT EXISTS identities (
    name TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    created REAL NOT NULL,
    revoked REAL
);
"""


# Version 3: a name is bound only once its node confirms the credential it was offered.
SCHEMA_V3 = """
ALTER TABLE identities ADD COLUMN confirmed REAL;
UPDATE identities SET confirmed = created
"""

# Version 4: a key may opt out of the response cache (every key made before uses it).
SCHEMA_V4 = """
ALTER TABLE keys ADD COLUMN cache INTEGER NOT NULL DEFAULT 1
"""

# Version 5: usage is also kept by the hour, so a report can cover "since T", and nodes' hand-offs
# are counted per node. The totals stay in `usage` and `node_usage`: the rows from before hours
# were kept count there (all time) and in no hour, and an all-time report reads one row per key
# and model however long the store has run. An hour row is kept `USAGE_HOURS_KEPT_S` (35 days,
# 840 hours): each count deletes its table's older hours in the same transaction, so a table holds
# at most callers x models x 840 rows, callers being the keys, or the nodes that hand off (10,000
# nodes handing off every hour on one model each: 8.4 million rows at most, then no more). The
# hour leads their primary keys, so a "since" read and the trimming are each one range of it.
SCHEMA_V5 = """
CREATE TABLE IF NOT EXISTS node_usage (
    node TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    PRIMARY KEY (node, model)
);
CREATE TABLE IF NOT EXISTS usage_hours (
    hour INTEGER NOT NULL,
    key_id INTEGER NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    PRIMARY KEY (hour, key_id, model)
);
CREATE TABLE IF NOT EXISTS node_usage_hours (
    hour INTEGER NOT NULL,
    node TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    PRIMARY KEY (hour, node, model)
)
"""

COUNTS = "requests, prompt_tokens, completion_tokens"
ADD_COUNTS = ("DO UPDATE SET requests = requests + 1, prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
              " completion_tokens = completion_tokens + excluded.completion_tokens")  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class UsageSql:
    """The statements over one kind of caller's usage (keys' or nodes'): its totals and its hours."""

    add_total: str
    add_hour: str
    list_all: str
    list_since: str
    trim_hours: str


def usage_sql(totals: str, who: str) -> UsageSql:
    """Over the tables `totals` and `<totals>_hours`, whose rows are per `who` (a column) and model."""
    hours = f"{totals}_hours"
    return UsageSql(
        add_total=f"INSERT INTO {totals} ({who}, model, {COUNTS}) VALUES (?, ?, 1, ?, ?)"
                  f" ON CONFLICT ({who}, model) {ADD_COUNTS}",
        add_hour=f"INSERT INTO {hours} (hour, {who}, model, {COUNTS}) VALUES (?, ?, ?, 1, ?, ?)"
                 f" ON CONFLICT (hour, {who}, model) {ADD_COUNTS}",
        list_all=f"SELECT {who}, model, {COUNTS} FROM {totals} ORDER BY {who}, model",
        list_since=f"SELECT {who}, model, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens) FROM {hours}"
                   f" WHERE hour >= ? GROUP BY {who}, model ORDER BY {who}, model",
        trim_hours=f"DELETE FROM {hours} WHERE hour < ?",
    )  # fmt: skip


KEY_USAGE = usage_sql("usage", "key_id")
NODE_USAGE = usage_sql("node_usage", "node")


def open_store(home: Path) -> Store:
    """The store kept under a DRAGON_HOME."""
    return SqliteStore(home / "state.db")


class SqliteStore:
    """`Store` over one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # One connection shared by the server's threads; the lock keeps their transactions
        # from interleaving, which sqlite3 alone does not guarantee.
        self._lock = threading.Lock()
        self._db = open_private(path)  # it holds key hashes: readable by its owner only
        try:
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        with self._write() as db:
            version = cast(int, db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"{self.path} has schema version {version}, newer than this dragonswarm ({SCHEMA_VERSION})"
                )
            steps = [(1, SCHEMA), (2, SCHEMA_V2), (3, SCHEMA_V3), (4, SCHEMA_V4), (5, SCHEMA_V5)]
            for target, script in steps:
                if version < target:
                    for statement in script.split(";"):
                        if statement.strip():
                            db.execute(statement)
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (`sqlitefile.immediate`), one thread at a time."""
        with self._lock, immediate(self._db) as db:
            yield db

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    def create_key(self, role: Role, name: str, expires: float | None = None,
                   cache: bool = True) -> tuple[str, KeyRecord]:  # fmt: skip
        check_new_key(role, name)
        key = new_key()
        created = time.time()
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO keys (name, role, prefix, hash, created, expires, cache) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, role, key_prefix(key), hash_key(key), created, expires, int(cache)),
            )
            key_id = cursor.lastrowid
        assert key_id is not None  # an INSERT into a rowid table always sets it
        return key, KeyRecord(key_id, name, role, key_prefix(key), created, expires, cache=cache)

    def find_key(self, key: str) -> KeyRecord | None:
        # An equality lookup on the hash leaks no timing worth having: learning which hash
        # prefixes exist does not help find a 256-bit key that produces them.
        with self._read() as db:
            row = db.execute(
                f"SELECT {KEY_COLUMNS} FROM keys WHERE hash = ?", (hash_key(key),)
            ).fetchone()
        return None if row is None else _key_record(row)

    def list_keys(self) -> list[KeyRecord]:
        with self._read() as db:
            rows = db.execute(f"SELECT {KEY_COLUMNS} FROM keys ORDER BY id").fetchall()
        return [_key_record(row) for row in rows]

    def revoke_key(self, ident: str) -> KeyRecord | None:
        with self._write() as db:
            if ident.isdigit():
                rows = db.execute(f"SELECT {KEY_COLUMNS} FROM keys WHERE id = ?", (int(ident),)).fetchall()
            else:
                rows = db.execute(f"SELECT {KEY_COLUMNS} FROM keys WHERE prefix = ?", (ident,)).fetchall()
            if len(rows) != 1:
                return None
            record = _key_record(rows[0])
            if record.revoked is None:
                now = time.time()
                db.execute("UPDATE keys SET revoked = ? WHERE id = ?", (now, record.id))
                record = dataclasses.replace(record, revoked=now)
        return record

    def offer_identity(self, name: str) -> str | None:
        credential = new_credential()
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO identities (name, hash, created) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
                " hash = excluded.hash, created = excluded.created WHERE confirmed IS NULL AND revoked IS NULL",
                (name, hash_key(credential), time.time()),
            )
            return credential if cursor.rowcount == 1 else None

    def confirm_identity(self, name: str, credential: str) -> bool:
        with self._write() as db:
            row = db.execute("SELECT hash FROM identities WHERE name = ? AND revoked IS NULL", (name,)).fetchone()
            if row is None or not hmac.compare_digest(row[0], hash_key(credential)):
                return False
            db.execute("UPDATE identities SET confirmed = COALESCE(confirmed, ?) WHERE name = ?", (time.time(), name))
            return True

    def forget_identity(self, name: str) -> bool:
        with self._write() as db:
            forgotten = db.execute("DELETE FROM identities WHERE name = ?", (name,)).rowcount
            forgotten += db.execute("DELETE FROM nodes WHERE name = ?", (name,)).rowcount
            return forgotten > 0

    def find_identity(self, name: str, credential: str) -> NodeIdentity | None:
        with self._read() as db:
            row = db.execute("SELECT name, created, revoked, confirmed, hash FROM identities WHERE name = ?",
                             (name,)).fetchone()  # fmt: skip
        if row is None or not hmac.compare_digest(row[4], hash_key(credential)):
            return None
        return NodeIdentity(*row[:4])

    def get_identity(self, name: str) -> NodeIdentity | None:
        with self._read() as db:
            row = db.execute("SELECT name, created, revoked, confirmed FROM identities WHERE name = ?",
                             (name,)).fetchone()  # fmt: skip
        return None if row is None else NodeIdentity(*row)

    def revoke_identity(self, name: str) -> bool:
        with self._write() as db:
            cursor = db.execute("UPDATE identities SET revoked = COALESCE(revoked, ?) WHERE name = ?",
                                (time.time(), name))  # fmt: skip
            return cursor.rowcount == 1

    def list_identities(self) -> list[NodeIdentity]:
        with self._read() as db:
            rows = db.execute("SELECT name, created, revoked, confirmed FROM identities ORDER BY name").fetchall()
        return [NodeIdentity(*row) for row in rows]

    def save_nodes(self, nodes: Sequence[NodeRecord]) -> None:
        rows = [(n.name, n.first_seen, n.last_seen, n.state, json.dumps(n.info)) for n in nodes]
        with self._write() as db:
            db.executemany(
                "INSERT INTO nodes (name, first_seen, last_seen, state, info) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET"
                " last_seen = excluded.last_seen, state = excluded.state, info = excluded.info",
                rows,
            )

    def list_nodes(self) -> list[NodeRecord]:
        with self._read() as db:
            rows = db.execute("SELECT name, first_seen, last_seen, state, info FROM nodes ORDER BY name").fetchall()
        return [
            NodeRecord(name=name, first_seen=first, last_seen=last, state=state, info=json.loads(info))
            for name, first, last, state, info in rows
        ]

    def record_usage(self, key_id: int, model: str, prompt_tokens: int, completion_tokens: int,
                     at: float | None = None) -> None:  # fmt: skip
        self._count(KEY_USAGE, key_id, model, prompt_tokens, completion_tokens, at)

    def record_node_usage(self, node: str, model: str, prompt_tokens: int, completion_tokens: int,
                          at: float | None = None) -> None:  # fmt: skip
        self._count(NODE_USAGE, node, model, prompt_tokens, completion_tokens, at)

    def _count(self, sql: UsageSql, who: int | str, model: str, prompt_tokens: int, completion_tokens: int,
               at: float | None) -> None:  # fmt: skip
        check_usage(prompt_tokens, completion_tokens)
        now = time.time() if at is None else at
        with self._write() as db:  # both or neither: the hours always add up to the totals since
            db.execute(sql.add_total, (who, model, prompt_tokens, completion_tokens))
            db.execute(sql.add_hour, (hour_of(now), who, model, prompt_tokens, completion_tokens))
            db.execute(sql.trim_hours, (first_hour_kept(now),))  # the hours' bound; the totals stay

    def usage_by_key(self) -> dict[int, tuple[int, int, int]]:
        with self._read() as db:
            rows = db.execute(
                "SELECT key_id, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens) FROM usage GROUP BY key_id"
            ).fetchall()
        return {key_id: (requests, prompt, completion) for key_id, requests, prompt, completion in rows}

    def list_usage(self, since: float | None = None) -> list[Usage]:
        return [Usage(*row) for row in self._list(KEY_USAGE, since)]

    def list_node_usage(self, since: float | None = None) -> list[NodeUsage]:
        return [NodeUsage(*row) for row in self._list(NODE_USAGE, since)]

    def _list(self, sql: UsageSql, since: float | None) -> list[Any]:
        with self._read() as db:
            if since is None:
                return db.execute(sql.list_all).fetchall()
            return db.execute(sql.list_since, (hour_of(since),)).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()


KEY_COLUMNS = "id, name, role, prefix, created, expires, revoked, cache"


def _key_record(row: tuple[int, str, Role, str, float, float | None, float | None, int]) -> KeyRecord:
    return KeyRecord(*row[:7], cache=bool(row[7]))
