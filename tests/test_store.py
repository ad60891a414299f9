"""The store, against a real SQLite file and a real Redis: every `Store` test runs on both backends.

Keys, identities, nodes and usage, and two processes' (or replicas') worth of connections;
then what only one backend has: SQLite's file, Redis's key names and TTLs.
"""

from __future__ import annotations

import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from dragonswarm.errors import ConfigError, StoreUnavailable
from dragonswarm.store import rediskeys
from dragonswarm.store.backends import open_store as open_any_store
from dragonswarm.store.base import (
    HOUR_S,
    USAGE_HOURS_KEPT_S,
    NodeRecord,
    NodeUsage,
    Store,
    Usage,
    first_hour_kept,
    hash_key,
    hour_of,
    new_key,
)
from dragonswarm.store.redis import RedisStore, redacted
from dragonswarm.store.redis_server import start_local_redis
from dragonswarm.store.sqlite import SqliteStore, open_store


@dataclass
class Backend:
    """One kind of store under test: how to open another connection to the same state, and
    everything it has written, as bytes (to look for what must never be there)."""

    name: str
    open: Callable[[], Store]
    stored: Callable[[], bytes]


def _redis_contents(url: str) -> bytes:
    """Every key name and value under our prefix, read by type (DUMP would compress them)."""
    parts: list[str] = []
    with redis.Redis.from_url(url, decode_responses=True) as client:
        for name in client.scan_iter(match=rediskeys.PREFIX + "*"):
            kind = client.type(name)
            value = {"hash": client.hgetall, "set": client.smembers, "zset": lambda k: client.zrange(k, 0, -1),
                     "string": client.get}[kind](name)  # fmt: skip
            parts.append(f"{name} {value}")
    return "\n".join(parts).encode()


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        home = tmp_path / "home"
        return Backend("sqlite", lambda: SqliteStore(home / "state.db"),
                       lambda: b"".join(f.read_bytes() for f in home.iterdir()))  # fmt: skip
    url: str = request.getfixturevalue("redis_url")  # started only for the tests that need it
    return Backend("redis", lambda: RedisStore.connect(url), lambda: _redis_contents(url))


@pytest.fixture
def open_db(backend: Backend) -> Iterator[Callable[[], Store]]:
    """Opens stores on one backend's state, and closes every one at the end."""
    opened: list[Store] = []

    def open_one() -> Store:
        store = backend.open()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(open_db: Callable[[], Store]) -> Store:
    return open_db()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path / "home" / "state.db")
    yield store
    store.close()


def test_new_key_is_random_and_prefixed() -> None:
    a, b = new_key(), new_key()
    assert a.startswith("dsk_") and len(a) == 4 + 43
    assert a != b
    assert hash_key(a) != hash_key(b) and len(hash_key(a)) == 64


def test_created_key_is_found_by_its_plaintext(store: Store) -> None:
    key, record = store.create_key("user", "alice")
    assert record.name == "alice" and record.role == "user"
    assert store.find_key(key) == record


def test_unknown_or_altered_key_is_not_found(store: Store) -> None:
    key, _ = store.create_key("admin", "root")
    assert store.find_key(new_key()) is None
    assert store.find_key(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.find_key(key[:12]) is None
    assert store.find_key("") is None


def test_plaintext_key_never_reaches_the_store(store: Store, backend: Backend) -> None:
    key, record = store.create_key("node", "gpu-box")
    store.close()
    blob = backend.stored()
    assert hash_key(key).encode() in blob  # the check can see what was written
    assert key.encode() not in blob
    assert key[len(record.prefix) :].encode() not in blob


def test_prefix_is_the_first_twelve_characters(store: Store) -> None:
    key, record = store.create_key("user", "bob")
    assert record.prefix == key[:12]
    assert len(record.prefix) == 12


@pytest.mark.parametrize("role", ["root", "", "User"])
def test_unknown_role_is_refused(store: Store, role: str) -> None:
    with pytest.raises(ValueError, match="role"):
        store.create_key(role, "x")  # type: ignore[arg-type]
    assert store.list_keys() == []


@pytest.mark.parametrize("name", ["", "   ", "n" * 65])
def test_bad_name_is_refused(store: Store, name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        store.create_key("user", name)
    assert store.list_keys() == []


def test_name_of_64_characters_is_accepted(store: Store) -> None:
    _, record = store.create_key("user", "n" * 64)
    assert record.name == "n" * 64


def test_keys_survive_close_and_reopen(open_db: Callable[[], Store]) -> None:
    first = open_db()
    made = [first.create_key(role, f"k-{role}") for role in ("user", "node", "admin")]
    first.close()
    second = open_db()
    assert second.list_keys() == [record for _, record in made]
    for key, record in made:
        assert second.find_key(key) == record


def test_two_stores_on_one_file_see_each_others_writes(open_db: Callable[[], Store]) -> None:
    orchestrator, cli = open_db(), open_db()
    assert orchestrator.list_keys() == []
    key, record = cli.create_key("user", "made-by-cli")
    assert orchestrator.find_key(key) == record
    orchestrator.record_usage(record.id, "m", 3, 4)
    orchestrator.save_nodes([NodeRecord("n1", 1.0, 2.0, "live", {})])
    assert cli.usage_by_key() == {record.id: (1, 3, 4)}
    assert [n.name for n in cli.list_nodes()] == ["n1"]


def test_save_nodes_upserts_and_keeps_first_seen(store: Store) -> None:
    store.save_nodes(
        [
            NodeRecord("b", 10.0, 10.0, "live", {"models": ["tiny"], "share": 0.5}),
            NodeRecord("a", 11.0, 11.0, "live", {}),
        ]
    )
    store.save_nodes([NodeRecord("b", 99.0, 20.0, "stale", {"models": [], "share": 0.25})])
    nodes = store.list_nodes()
    assert [n.name for n in nodes] == ["a", "b"]
    assert nodes[1] == NodeRecord("b", 10.0, 20.0, "stale", {"models": [], "share": 0.25})
    assert nodes[0] == NodeRecord("a", 11.0, 11.0, "live", {})


def test_save_nodes_is_one_transaction(store: Store) -> None:
    bad = NodeRecord("z", 1.0, 1.0, "live", {"not json": object()})
    with pytest.raises(TypeError):
        store.save_nodes([NodeRecord("a", 1.0, 1.0, "live", {}), bad])
    assert store.list_nodes() == []


def test_usage_accumulates_per_key_over_models(store: Store) -> None:
    store.record_usage(1, "tiny", 10, 5)
    store.record_usage(1, "tiny", 7, 3)
    store.record_usage(1, "gemma", 1, 1)
    store.record_usage(2, "tiny", 100, 0)
    assert store.usage_by_key() == {1: (3, 18, 9), 2: (1, 100, 0)}


def test_usage_is_listed_per_key_and_model(store: Store) -> None:
    assert store.list_usage() == []
    store.record_usage(2, "tiny", 100, 0)
    store.record_usage(1, "tiny", 10, 5)
    store.record_usage(1, "gemma", 1, 1)
    store.record_usage(1, "tiny", 7, 3)
    assert store.list_usage() == [Usage(1, "gemma", 1, 1, 1), Usage(1, "tiny", 2, 17, 8), Usage(2, "tiny", 1, 100, 0)]


def test_negative_usage_is_refused(store: Store) -> None:
    with pytest.raises(ValueError):
        store.record_usage(1, "tiny", -1, 0)
    with pytest.raises(ValueError):
        store.record_node_usage("w1", "tiny", 0, -1)
    assert store.usage_by_key() == {} and store.list_usage(0) == [] and store.list_node_usage() == []


H = hour_of(time.time()) - 3 * HOUR_S  # three hours ago: well within the hours kept


def test_usage_is_kept_by_the_hour_for_keys_and_nodes(open_db: Callable[[], Store]) -> None:
    store = open_db()
    store.record_usage(1, "tiny", 10, 5, at=H - 1)  # the hour before
    store.record_usage(1, "tiny", 7, 3, at=H + 10)
    store.record_usage(1, "tiny", 1, 1, at=H + 3599)
    store.record_usage(2, "gemma", 4, 4, at=H + 3600 + 5)  # the hour after
    store.record_node_usage("1box", "model:with:colons", 100, 50, at=H - 86_400)  # a day before
    store.record_node_usage("1box", "model:with:colons", 2, 2, at=H + 100)
    store.record_node_usage("w2", "tiny", 3, 3, at=H + 3600)
    reader = open_db()  # what one connection counted, another reads
    # In all: every hour. Nodes' hand-offs are not any key's.
    assert reader.list_usage() == reader.list_usage(0) == [Usage(1, "tiny", 3, 18, 9), Usage(2, "gemma", 1, 4, 4)]
    assert reader.usage_by_key() == {1: (3, 18, 9), 2: (1, 4, 4)}
    assert reader.list_node_usage() == [NodeUsage("1box", "model:with:colons", 2, 102, 52),
                                        NodeUsage("w2", "tiny", 1, 3, 3)]  # fmt: skip
    # Since a time: from the start of the hour holding it on, whole hours.
    for since in (H, H + 1800, H + 3599.9):
        assert reader.list_usage(since) == [Usage(1, "tiny", 2, 8, 4), Usage(2, "gemma", 1, 4, 4)], since
        assert reader.list_node_usage(since) == [NodeUsage("1box", "model:with:colons", 1, 2, 2),
                                                 NodeUsage("w2", "tiny", 1, 3, 3)]  # fmt: skip
    assert reader.list_usage(H - 1) == [Usage(1, "tiny", 3, 18, 9), Usage(2, "gemma", 1, 4, 4)]
    assert reader.list_usage(H + 3600) == [Usage(2, "gemma", 1, 4, 4)]
    assert reader.list_node_usage(H + 3600) == [NodeUsage("w2", "tiny", 1, 3, 3)]
    assert reader.list_usage(H + 7200) == [] and reader.list_node_usage(H + 7200) == []
    # Without a time, a request counts in the hour it is recorded in.
    before = time.time()
    store.record_usage(3, "tiny", 1, 1)
    store.record_node_usage("w2", "tiny", 1, 1)
    assert reader.list_usage(before) == [Usage(3, "tiny", 1, 1, 1)]
    assert reader.list_node_usage(before) == [NodeUsage("w2", "tiny", 1, 1, 1)]


def test_hours_older_than_35_days_are_dropped_as_usage_is_counted(open_db: Callable[[], Store]) -> None:
    store, now = open_db(), time.time()
    first = first_hour_kept(now)
    assert first == hour_of(now) - USAGE_HOURS_KEPT_S + HOUR_S  # 840 hours kept, this one the last
    store.record_usage(1, "tiny", 100, 100, at=now - USAGE_HOURS_KEPT_S - 86_400)  # counted 36 days ago
    store.record_usage(1, "tiny", 10, 10, at=first - 1)  # the last hour to be dropped
    store.record_usage(1, "tiny", 1, 1, at=first)  # the first hour kept
    store.record_node_usage("w1", "tiny", 100, 100, at=first - 1)
    store.record_usage(2, "tiny", 2, 2, at=now)  # counting now drops what is older than 35 days
    store.record_node_usage("w1", "tiny", 2, 2, at=now)
    reader = open_db()
    assert reader.list_usage(0) == reader.list_usage(first) == [Usage(1, "tiny", 1, 1, 1), Usage(2, "tiny", 1, 2, 2)]
    assert reader.list_node_usage(0) == [NodeUsage("w1", "tiny", 1, 2, 2)]
    # The totals keep everything, for good.
    assert reader.list_usage() == [Usage(1, "tiny", 3, 111, 111), Usage(2, "tiny", 1, 2, 2)]
    assert reader.usage_by_key() == {1: (3, 111, 111), 2: (1, 2, 2)}
    assert reader.list_node_usage() == [NodeUsage("w1", "tiny", 2, 102, 102)]


def test_file_is_private(sqlite_store: SqliteStore, tmp_path: Path) -> None:
    path = tmp_path / "home" / "state.db"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    sqlite_store.create_key("user", "u")  # the WAL and shared-memory files hold the same data
    for extra in ("state.db-wal", "state.db-shm"):
        assert stat.S_IMODE((tmp_path / "home" / extra).stat().st_mode) == 0o600


def test_open_store_uses_state_db_under_home(tmp_path: Path) -> None:
    store: Store = open_store(tmp_path)
    try:
        key, record = store.create_key("user", "u")
    finally:
        store.close()
    assert (tmp_path / "state.db").exists()
    reopened = SqliteStore(tmp_path / "state.db")
    try:
        assert reopened.find_key(key) == record
    finally:
        reopened.close()


def test_file_header_says_wal_and_schema_version_5(sqlite_store: SqliteStore, tmp_path: Path) -> None:
    # Read from the SQLite file header (https://sqlite.org/fileformat.html) rather than
    # through sqlite3, which only store/ imports. Closing checkpoints the WAL into the file.
    sqlite_store.close()
    header = (tmp_path / "home" / "state.db").read_bytes()[:100]
    assert header[18:20] == b"\x02\x02"  # read/write format 2 = WAL
    assert int.from_bytes(header[60:64], "big") == 5  # PRAGMA user_version


def test_threads_share_one_store(store: Store) -> None:
    # The server calls the store from its thread pool; transactions must not interleave.
    def work() -> None:
        for _ in range(50):
            store.record_usage(1, "tiny", 2, 1)
            store.list_keys()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert store.usage_by_key() == {1: (400, 800, 400)}


def test_keys_expire_and_are_revoked(store: Store) -> None:
    key, record = store.create_key("user", "temp", expires=time.time() + 3600)
    assert store.find_key(key) == record and record.refusal(time.time()) is None
    assert record.refusal(time.time() + 7200) == "this API key has expired"
    revoked = store.revoke_key(record.prefix)
    assert revoked is not None and revoked.revoked is not None
    found = store.find_key(key)
    assert found is not None and found.refusal(time.time()) == "this API key has been revoked"
    assert store.revoke_key(str(record.id)) == found  # revoking twice keeps the first time
    assert store.revoke_key("dsk_nothing") is None


def test_a_version_1_file_is_migrated(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "old.db")
    key, _ = store.create_key("user", "kept")
    store.close()
    import sqlite3  # simulate a file written by schema version 1: drop what version 2 added

    db = sqlite3.connect(tmp_path / "old.db")
    db.executescript("ALTER TABLE keys DROP COLUMN expires; ALTER TABLE keys DROP COLUMN revoked;"
                     "ALTER TABLE keys DROP COLUMN cache; DROP TABLE identities; PRAGMA user_version = 1;")  # fmt: skip
    db.close()
    store = SqliteStore(tmp_path / "old.db")
    found = store.find_key(key)
    store.close()
    assert found is not None and found.name == "kept" and found.expires is None and found.cache


def test_a_version_3_file_is_migrated_with_every_key_using_the_cache(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "old.db")
    key, _ = store.create_key("user", "kept", cache=False)
    store.close()
    import sqlite3  # a file of schema version 3: its keys have no cache column

    db = sqlite3.connect(tmp_path / "old.db")
    db.executescript("ALTER TABLE keys DROP COLUMN cache; PRAGMA user_version = 3;")
    db.close()
    store = SqliteStore(tmp_path / "old.db")
    found = store.find_key(key)
    _, opted_out = store.create_key("user", "new", cache=False)
    store.close()
    assert found is not None and found.name == "kept" and found.cache  # made before the opt-out existed
    assert not opted_out.cache


def test_a_version_4_files_usage_counts_in_all_and_in_no_hour(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "old.db")
    store.close()
    import sqlite3  # a file of schema version 4: running totals per key and model, no hours, no nodes

    db = sqlite3.connect(tmp_path / "old.db")
    db.executescript("DROP TABLE usage_hours; DROP TABLE node_usage; DROP TABLE node_usage_hours;"
                     "INSERT INTO usage VALUES (1, 'tiny', 5, 50, 20), (2, 'gemma', 1, 3, 4);"
                     "PRAGMA user_version = 4;")  # fmt: skip
    db.close()
    store = SqliteStore(tmp_path / "old.db")
    try:
        store.record_usage(1, "tiny", 10, 1, at=H)
        store.record_node_usage("w1", "tiny", 2, 2, at=H)
        assert store.list_usage() == [Usage(1, "tiny", 6, 60, 21), Usage(2, "gemma", 1, 3, 4)]
        assert store.usage_by_key() == {1: (6, 60, 21), 2: (1, 3, 4)}
        assert store.list_usage(0) == [Usage(1, "tiny", 1, 10, 1)]  # from before the hours: in none of them
        assert store.list_node_usage() == store.list_node_usage(H) == [NodeUsage("w1", "tiny", 1, 2, 2)]
    finally:
        store.close()
    assert int.from_bytes((tmp_path / "old.db").read_bytes()[60:64], "big") == 5


def test_a_key_may_opt_out_of_the_response_cache(open_db: Callable[[], Store]) -> None:
    store = open_db()
    cached, with_cache = store.create_key("user", "cached")
    fresh, without = store.create_key("user", "fresh", cache=False)
    assert with_cache.cache and not without.cache
    other = open_db()  # another connection reads what was stored, not what was returned
    assert other.find_key(cached) == with_cache and other.find_key(fresh) == without
    assert [k.cache for k in other.list_keys()] == [True, False]
    revoked = other.revoke_key(str(without.id))
    assert revoked is not None and not revoked.cache


def test_node_identities(store: Store) -> None:
    lost = store.offer_identity("w1")  # a welcome that never reached its node
    credential = store.offer_identity("w1")  # ... so the node key asks again
    assert lost is not None and credential is not None and lost != credential
    assert not store.confirm_identity("w1", lost)  # the first offer is void
    assert store.confirm_identity("w1", credential)
    assert store.offer_identity("w1") is None  # bound: the node key can no longer speak for it
    found = store.find_identity("w1", credential)
    assert found is not None and found.revoked is None and found.confirmed is not None
    assert store.find_identity("w1", credential + "x") is None
    assert store.find_identity("w2", credential) is None
    assert store.revoke_identity("w1") and not store.revoke_identity("nobody")
    again = store.find_identity("w1", credential)
    assert again is not None and again.revoked is not None
    assert [i.name for i in store.list_identities()] == ["w1"]
    assert store.offer_identity("w1") is None and not store.confirm_identity("w1", credential)  # revoked for good
    assert store.forget_identity("w1") and not store.forget_identity("w1")
    assert store.get_identity("w1") is None and store.offer_identity("w1") is not None  # the name is free again


def test_racing_offers_bind_a_name_once(open_db: Callable[[], Store]) -> None:
    # Replicas admitting one name at once (a node reconnecting to two of them): each offers,
    # then confirms what it offered. Exactly one credential ends up bound, and it is the one
    # whose confirmation succeeded; the others were replaced or came too late.
    stores = [open_db() for _ in range(4)]
    start = threading.Barrier(len(stores) * 2)
    bound: list[str] = []

    def admit(store: Store) -> None:
        start.wait(timeout=30)
        for _ in range(25):
            credential = store.offer_identity("racer")
            if credential is not None and store.confirm_identity("racer", credential):
                bound.append(credential)

    threads = [threading.Thread(target=admit, args=(s,)) for s in stores for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(bound) == 1
    assert stores[0].find_identity("racer", bound[0]) is not None
    assert stores[0].offer_identity("racer") is None


def test_key_ids_are_unique_across_connections(open_db: Callable[[], Store]) -> None:
    stores = [open_db() for _ in range(3)]
    made: list[int] = []

    def create(store: Store) -> None:
        for i in range(20):
            made.append(store.create_key("user", f"k{i}")[1].id)

    threads = [threading.Thread(target=create, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(made) == list(range(1, 61))
    assert [k.id for k in stores[0].list_keys()] == list(range(1, 61))


def test_forgetting_a_name_drops_its_record_too(store: Store) -> None:
    credential = store.offer_identity("w1")
    assert credential is not None and store.confirm_identity("w1", credential)
    store.save_nodes([NodeRecord("w1", 1.0, 2.0, "live", {}), NodeRecord("w2", 1.0, 2.0, "live", {})])
    assert store.forget_identity("w1")
    assert [n.name for n in store.list_nodes()] == ["w2"]
    assert store.forget_identity("w2")  # a record alone is something to forget
    assert store.list_nodes() == [] and not store.forget_identity("w2")


# --- Redis only ---------------------------------------------------------------------------------------


def test_every_redis_key_is_ours_and_node_records_expire(redis_url: str) -> None:
    store = RedisStore.connect(redis_url)
    try:
        key, record = store.create_key("user", "u")
        credential = store.offer_identity("w1")
        store.save_nodes([NodeRecord("w1", 1.0, 2.0, "live", {"models": ["tiny"]})])
        store.record_usage(record.id, "model:with:colons", 3, 4, at=H)
        store.record_node_usage("w1", "tiny", 1, 2, at=H)
        with redis.Redis.from_url(redis_url, decode_responses=True) as client:
            names = set(client.scan_iter())
            digest = client.hget(rediskeys.KEYS, str(record.id))
            assert digest == hash_key(key)
            totals = {rediskeys.USAGE, rediskeys.NODE_USAGE, rediskeys.USAGE_HOURS}
            hours = {rediskeys.usage_hour(H), rediskeys.node_usage_hour(H)}
            assert names == {rediskeys.KEY_IDS, rediskeys.KEYS, rediskeys.key(digest), rediskeys.IDENTITIES,
                             rediskeys.identity("w1"), rediskeys.NODES, rediskeys.node("w1"), *totals,
                             *hours}  # fmt: skip
            # Node records live a day from their last save; keys, identities and usage totals for good
            # (the hours' zset is trimmed instead); an hour's usage 35 days and an hour from its start.
            for name in (rediskeys.node("w1"), rediskeys.NODES):
                assert 0 < client.ttl(name) <= rediskeys.NODE_TTL_S
            assert client.ttl(rediskeys.identity("w1")) == -1 and all(client.ttl(name) == -1 for name in totals)
            assert rediskeys.USAGE_HOUR_EXPIRES_S == USAGE_HOURS_KEPT_S + HOUR_S
            for name in hours:  # TTL, not EXPIRETIME: Redis 6 has no EXPIRETIME
                assert abs(client.ttl(name) - (H + rediskeys.USAGE_HOUR_EXPIRES_S - time.time())) <= 2, name
            client.delete(rediskeys.node("w1"))  # as when its day is up
        assert store.list_nodes() == []
        assert store.list_usage() == [Usage(record.id, "model:with:colons", 1, 3, 4)]
        assert credential is not None and store.find_identity("w1", credential) is not None
    finally:
        store.close()


def test_redis_usage_from_before_hours_counts_in_all_and_in_no_hour(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:  # as a replica before hours wrote it
        client.hset(rediskeys.USAGE, mapping={"1:r:tiny": 5, "1:p:tiny": 50, "1:c:tiny": 20, "2:r:m:x": 1,
                                              "2:p:m:x": 3, "2:c:m:x": 4})  # fmt: skip
    store = RedisStore.connect(redis_url)
    try:
        store.record_usage(1, "tiny", 10, 1, at=H)
        assert store.list_usage() == [Usage(1, "tiny", 6, 60, 21), Usage(2, "m:x", 1, 3, 4)]
        assert store.usage_by_key() == {1: (6, 60, 21), 2: (1, 3, 4)}
        assert store.list_usage(0) == [Usage(1, "tiny", 1, 10, 1)]
        assert store.list_node_usage() == []
    finally:
        store.close()


def test_redis_trims_the_hours_older_than_35_days_in_the_counting_transaction(redis_url: str) -> None:
    now = time.time()
    first = first_hour_kept(now)
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:  # hours counted long ago
        for hour in (first - 10 * HOUR_S, first - HOUR_S, first):
            client.zadd(rediskeys.USAGE_HOURS, {str(hour): hour})
            client.hset(rediskeys.usage_hour(hour), "1:r:tiny", 1)
    store = RedisStore.connect(redis_url)
    try:
        store.record_usage(2, "tiny", 1, 1, at=now)
        with redis.Redis.from_url(redis_url, decode_responses=True) as client:
            assert client.zrange(rediskeys.USAGE_HOURS, 0, -1) == [str(first), str(hour_of(now))]
            assert client.ttl(rediskeys.usage_hour(hour_of(now))) > 0  # ... and the hour counted in expires
        assert store.list_usage(0) == [Usage(1, "tiny", 1, 0, 0), Usage(2, "tiny", 1, 1, 1)]
    finally:
        store.close()


def test_open_store_picks_redis_only_with_a_url(tmp_path: Path, redis_url: str) -> None:
    shared = open_any_store(tmp_path, redis_url)
    embedded = open_any_store(tmp_path)
    try:
        assert isinstance(shared, RedisStore) and isinstance(embedded, SqliteStore)
        key, _ = shared.create_key("user", "replicated")
        assert embedded.find_key(key) is None
    finally:
        shared.close()
        embedded.close()


def test_a_redis_that_cannot_be_used_is_one_line_without_its_password(redis_url: str, tmp_path: Path) -> None:
    password = urlsplit(redis_url).password
    assert password
    wrong = redis_url.replace(password, "not-the-password")
    for url, why in ((wrong, "username-password"), ("redis://:s3cret@127.0.0.1:1/0", "onnect"),
                     ("http://:s3cret@127.0.0.1:1/0", "scheme"), ("redis://:s3cret@127.0.0.1:port/0", "Port")):
        with pytest.raises(ConfigError) as caught:
            open_any_store(tmp_path, url)
        message = str(caught.value)
        assert why in message and "\n" not in message
        assert "s3cret" not in message and "not-the-password" not in message and ":***@" in message


def test_redacted_masks_the_password_only() -> None:
    assert redacted("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    assert redacted("rediss://user:pw@host/1") == "rediss://user:***@host/1"
    assert redacted("redis://host:6379/0") == "redis://host:6379/0"
    assert redacted("redis://host/0?password=pw") == "redis://host/0?***"


def test_a_redis_gone_away_is_store_unavailable(tmp_path: Path) -> None:
    server = start_local_redis(tmp_path / "redis", persist=False)
    store = RedisStore.connect(server.url)
    try:
        key, record = store.create_key("user", "u")
        assert store.find_key(key) == record
        server.stop()
        with pytest.raises(StoreUnavailable) as caught:
            store.find_key(key)
        assert caught.value.status == 503 and caught.value.retry_after >= 1
    finally:
        store.close()
        server.stop()


def test_the_redis_store_answers_across_a_restart_and_counts_once(tmp_path: Path) -> None:
    """Redis restarted under a running store: every pooled connection is broken. Each must be
    found broken before a command goes on it (the pool reads it at checkout), so no call fails
    for it and no usage write is sent twice (a command retried after a lost answer may have
    been carried out). Earlier notes said the first command on each answered 503."""
    folder = tmp_path / "redis"
    server = start_local_redis(folder)  # with its append-only file: the restart keeps the data
    store = RedisStore.connect(server.url)
    try:
        key, record = store.create_key("user", "u")

        def use() -> None:
            assert store.find_key(key) == record
            store.record_usage(record.id, "m", 1, 1)

        def in_threads(n: int) -> None:  # several at once: several connections in the pool
            errors: list[BaseException] = []

            def run() -> None:
                try:
                    use()
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=run) for _ in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert errors == []

        in_threads(4)
        pooled = len(store._r.connection_pool._connections)  # type: ignore[attr-defined]
        assert pooled >= 2
        port = server.port
        server.stop()
        server = start_local_redis(folder, port)
        in_threads(4)
        for _ in range(pooled):  # one by one: each takes a connection broken by the restart
            use()
        assert store.usage_by_key()[record.id] == (8 + pooled, 8 + pooled, 8 + pooled)
    finally:
        store.close()
        server.stop()


def test_the_local_redis_keeps_its_password_private_and_its_data(tmp_path: Path) -> None:
    # What `dragon up --replicas` starts: loopback, a password in a 0600 file, an append-only file.
    folder = tmp_path / "data" / "redis"
    server = start_local_redis(folder)
    try:
        assert server.url.startswith("redis://:") and "@127.0.0.1:" in server.url
        password = (folder / "password").read_text().strip()
        assert password == server.password and len(password) >= 32
        for private in ("password", "redis.conf"):
            assert stat.S_IMODE((folder / private).stat().st_mode) == 0o600
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        with redis.Redis(host="127.0.0.1", port=server.port) as anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        store = RedisStore.connect(server.url)
        key, record = store.create_key("admin", "kept")
        store.close()
    finally:
        assert server.stop() == 0
    assert password not in " ".join(server.process.args)  # type: ignore[arg-type]  # never on a command line
    again = start_local_redis(folder)  # the same folder: the same password, the data back
    try:
        assert again.password == password
        store = RedisStore.connect(again.url)
        assert store.find_key(key) == record
        store.close()
    finally:
        again.stop()
    assert any((folder / "appendonlydir").iterdir())
