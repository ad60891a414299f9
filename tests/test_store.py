"""The SQLite store, against a real file: keys, nodes, usage, and two processes' worth of connections."""

from __future__ import annotations

import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dragonswarm.store.base import NodeRecord, Store, Usage, hash_key, new_key
from dragonswarm.store.sqlite import SqliteStore, open_store


@pytest.fixture
def open_db(tmp_path: Path) -> Iterator[Callable[[], SqliteStore]]:
    """Opens stores on one file under tmp_path, and closes every one at the end."""
    opened: list[SqliteStore] = []

    def open_one() -> SqliteStore:
        store = SqliteStore(tmp_path / "home" / "state.db")
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(open_db: Callable[[], SqliteStore]) -> SqliteStore:
    return open_db()


def test_new_key_is_random_and_prefixed() -> None:
    a, b = new_key(), new_key()
    assert a.startswith("dsk_") and len(a) == 4 + 43
    assert a != b
    assert hash_key(a) != hash_key(b) and len(hash_key(a)) == 64


def test_created_key_is_found_by_its_plaintext(store: SqliteStore) -> None:
    key, record = store.create_key("user", "alice")
    assert record.name == "alice" and record.role == "user"
    assert store.find_key(key) == record


def test_unknown_or_altered_key_is_not_found(store: SqliteStore) -> None:
    key, _ = store.create_key("admin", "root")
    assert store.find_key(new_key()) is None
    assert store.find_key(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.find_key(key[:12]) is None
    assert store.find_key("") is None


def test_plaintext_key_never_reaches_the_file(store: SqliteStore, tmp_path: Path) -> None:
    key, record = store.create_key("node", "gpu-box")
    store.close()
    files = list((tmp_path / "home").iterdir())
    blob = b"".join(f.read_bytes() for f in files)
    assert hash_key(key).encode() in blob  # the check can see what was written
    assert key.encode() not in blob
    assert key[len(record.prefix) :].encode() not in blob


def test_prefix_is_the_first_twelve_characters(store: SqliteStore) -> None:
    key, record = store.create_key("user", "bob")
    assert record.prefix == key[:12]
    assert len(record.prefix) == 12


@pytest.mark.parametrize("role", ["root", "", "User"])
def test_unknown_role_is_refused(store: SqliteStore, role: str) -> None:
    with pytest.raises(ValueError, match="role"):
        store.create_key(role, "x")  # type: ignore[arg-type]
    assert store.list_keys() == []


@pytest.mark.parametrize("name", ["", "   ", "n" * 65])
def test_bad_name_is_refused(store: SqliteStore, name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        store.create_key("user", name)
    assert store.list_keys() == []


def test_name_of_64_characters_is_accepted(store: SqliteStore) -> None:
    _, record = store.create_key("user", "n" * 64)
    assert record.name == "n" * 64


def test_keys_survive_close_and_reopen(open_db: Callable[[], SqliteStore]) -> None:
    first = open_db()
    made = [first.create_key(role, f"k-{role}") for role in ("user", "node", "admin")]
    first.close()
    second = open_db()
    assert second.list_keys() == [record for _, record in made]
    for key, record in made:
        assert second.find_key(key) == record


def test_two_stores_on_one_file_see_each_others_writes(open_db: Callable[[], SqliteStore]) -> None:
    orchestrator, cli = open_db(), open_db()
    assert orchestrator.list_keys() == []
    key, record = cli.create_key("user", "made-by-cli")
    assert orchestrator.find_key(key) == record
    orchestrator.record_usage(record.id, "m", 3, 4)
    orchestrator.save_nodes([NodeRecord("n1", 1.0, 2.0, "live", {})])
    assert cli.usage_by_key() == {record.id: (1, 3, 4)}
    assert [n.name for n in cli.list_nodes()] == ["n1"]


def test_save_nodes_upserts_and_keeps_first_seen(store: SqliteStore) -> None:
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


def test_save_nodes_is_one_transaction(store: SqliteStore) -> None:
    bad = NodeRecord("z", 1.0, 1.0, "live", {"not json": object()})
    with pytest.raises(TypeError):
        store.save_nodes([NodeRecord("a", 1.0, 1.0, "live", {}), bad])
    assert store.list_nodes() == []


def test_usage_accumulates_per_key_over_models(store: SqliteStore) -> None:
    store.record_usage(1, "tiny", 10, 5)
    store.record_usage(1, "tiny", 7, 3)
    store.record_usage(1, "gemma", 1, 1)
    store.record_usage(2, "tiny", 100, 0)
    assert store.usage_by_key() == {1: (3, 18, 9), 2: (1, 100, 0)}


def test_usage_is_listed_per_key_and_model(store: SqliteStore) -> None:
    assert store.list_usage() == []
    store.record_usage(2, "tiny", 100, 0)
    store.record_usage(1, "tiny", 10, 5)
    store.record_usage(1, "gemma", 1, 1)
    store.record_usage(1, "tiny", 7, 3)
    assert store.list_usage() == [Usage(1, "gemma", 1, 1, 1), Usage(1, "tiny", 2, 17, 8), Usage(2, "tiny", 1, 100, 0)]


def test_negative_usage_is_refused(store: SqliteStore) -> None:
    with pytest.raises(ValueError):
        store.record_usage(1, "tiny", -1, 0)
    assert store.usage_by_key() == {}


def test_file_is_private(store: SqliteStore, tmp_path: Path) -> None:
    path = tmp_path / "home" / "state.db"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    store.create_key("user", "u")  # the WAL and shared-memory files hold the same data
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


def test_file_header_says_wal_and_schema_version_3(store: SqliteStore, tmp_path: Path) -> None:
    # Read from the SQLite file header (https://sqlite.org/fileformat.html) rather than
    # through sqlite3, which only store/ imports. Closing checkpoints the WAL into the file.
    store.close()
    header = (tmp_path / "home" / "state.db").read_bytes()[:100]
    assert header[18:20] == b"\x02\x02"  # read/write format 2 = WAL
    assert int.from_bytes(header[60:64], "big") == 3  # PRAGMA user_version


def test_threads_share_one_store(store: SqliteStore) -> None:
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


def test_keys_expire_and_are_revoked(store: SqliteStore) -> None:
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
                     "DROP TABLE identities; PRAGMA user_version = 1;")  # fmt: skip
    db.close()
    store = SqliteStore(tmp_path / "old.db")
    found = store.find_key(key)
    store.close()
    assert found is not None and found.name == "kept" and found.expires is None


def test_node_identities(store: SqliteStore) -> None:
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
