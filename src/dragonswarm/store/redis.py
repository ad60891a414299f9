"""The Redis store: what orchestrator replicas share (keys, node identities, node records, usage).

Same `Store` as the SQLite file, same answers, so that any replica may serve any caller.
Each step two replicas could race on is one atomic step in Redis: offering, confirming
and revoking a node's credential are Lua scripts (a read and a write that nothing may come
between), a key's first revocation time is an HSETNX, a request's usage is one Lua script,
and other writes of several keys go in one MULTI transaction. Key names and TTLs come from
`rediskeys.py`.

Times are stored as Python's `repr` of the float, which reads back exactly. The client is
redis-py's synchronous one, with a connection pool: the orchestrator calls its store from
threads. A Redis that fails a call raises `StoreUnavailable` (503, retry), logged here once
(`unavailable`). Also here, for every client of ours: the pool options (`client_options`)
and the asyncio client (`async_client`) of the limiter, the callers, the cache and the federation.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
from redis.maint_notifications import MaintNotificationsConfig
from redis.typing import EncodableT

from dragonswarm.errors import ConfigError, StoreUnavailable
from dragonswarm.store import rediskeys as rk
from dragonswarm.store.base import (
    KeyRecord,
    NodeIdentity,
    NodeRecord,
    NodeUsage,
    Role,
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

log = logging.getLogger("dragonswarm.store")

CONNECT_TIMEOUT_S = 5.0
# A command that has not been answered in this long fails (and the request with it, as a
# 503) rather than holding a thread of the server's small pool forever.
COMMAND_TIMEOUT_S = 10.0
# Connections one client keeps to Redis. A caller beyond them waits (up to COMMAND_TIMEOUT_S)
# for one to come free: redis-py's default pool fails the call at once ("Too many
# connections"), which under a burst of requests turned admissions into errors. Redis runs
# one command at a time, so more connections would not answer sooner.
MAX_CONNECTIONS = 32


def client_options() -> dict[str, Any]:
    """The pool options every client of ours uses, the asyncio one included.

    Maintenance notifications (a Redis Enterprise feature, "auto" by default) off: while they
    are on, redis-py's asyncio pool skips its check of a connection at checkout, so after a
    Redis restart the first command on each pooled connection failed ("Connection closed by
    server") instead of going on a new one."""
    return {"decode_responses": True, "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "socket_timeout": COMMAND_TIMEOUT_S, "health_check_interval": 30,
            "max_connections": MAX_CONNECTIONS, "timeout": COMMAND_TIMEOUT_S,
            "maint_notifications_config": MaintNotificationsConfig(enabled=False)}  # fmt: skip

P = ParamSpec("P")
T = TypeVar("T")


def redacted(url: str) -> str:
    """The URL with its password masked: the only form of a Redis URL that may be printed or logged."""
    try:
        parts = urlsplit(url)
        userinfo, at, host = parts.netloc.rpartition("@")
        if at and ":" in userinfo:
            user = userinfo.partition(":")[0]
            parts = parts._replace(netloc=f"{user}:***@{host}")
        if "password" in parts.query.lower():  # redis-py also takes ?password=
            parts = parts._replace(query="***")
        return urlunsplit(parts)
    except ValueError:
        return "<a Redis URL that does not parse>"


def _scrubbed(text: str, url: str) -> str:
    """An error message with the URL's password taken out, in case a library quoted it."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    return text.replace(password, "***") if password else text


def connect(url: str) -> redis.Redis:
    """A client for `url`, checked with a PING. A URL that does not parse or a Redis that cannot be
    used (unreachable, wrong password) is a `ConfigError`: one line, the password masked."""
    try:
        client = redis.Redis.from_pool(redis.BlockingConnectionPool.from_url(url, **client_options()))
    except ValueError as exc:
        raise ConfigError(f"invalid Redis URL {redacted(url)}: {_scrubbed(str(exc), url)}") from None
    try:
        client.ping()
    except (redis.RedisError, ValueError) as exc:  # ValueError: a port or database that is not a number
        client.close()
        raise ConfigError(f"cannot use Redis at {redacted(url)}: {_scrubbed(str(exc), url)}") from None
    return client


def async_client(url: str, **overrides: Any) -> redis.asyncio.Redis:
    """An asyncio client for `url` with our pool options (and `overrides`); it connects on first
    use, the URL having been checked by `connect` at start."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(url, **{**client_options(), **overrides})
    return redis.asyncio.Redis.from_pool(pool)


def unavailable(what: str, exc: redis.RedisError) -> StoreUnavailable:
    """The error a failed call of the shared store becomes (the API answers 503), said in the log."""
    log.warning("the shared store (Redis) failed in %s: %s", what, exc)
    return StoreUnavailable("the orchestrator's shared store is unavailable; retry shortly")


def _shared(method: Callable[P, T]) -> Callable[P, T]:
    """A store method whose Redis failures become `StoreUnavailable`."""

    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except redis.RedisError as exc:
            raise unavailable(method.__name__, exc) from exc

    return call


# Offer a credential to a name nobody holds (never confirmed, never revoked). KEYS: identity, names.
# ARGV: credential hash, created, name. Returns 1 if offered.
OFFER = """
if redis.call('HEXISTS', KEYS[1], 'confirmed') == 1 or redis.call('HEXISTS', KEYS[1], 'revoked') == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'hash', ARGV[1], 'created', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
return 1
"""

# Bind a name to the credential offered last, if it is this one. KEYS: identity. ARGV: credential
# hash, now. Comparing hashes with == leaks nothing worth having (see base.hash_key): a
# 256-bit credential is not found by learning which hash prefixes match.
CONFIRM = """
if redis.call('HEXISTS', KEYS[1], 'revoked') == 1 or redis.call('HGET', KEYS[1], 'hash') ~= ARGV[1] then
  return 0
end
redis.call('HSETNX', KEYS[1], 'confirmed', ARGV[2])
return 1
"""

# Revoke an admitted node, keeping the first revocation's time. KEYS: identity. ARGV: now.
REVOKE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSETNX', KEYS[1], 'revoked', ARGV[1])
return 1
"""

# Count one request: in the totals and in its hour, which expires once past the kept hours, and the
# hour listed in the hours' zset, trimmed of those no longer kept. One script, not a MULTI of eleven
# commands: the same atomic step (the hours always add up to the totals since), at half the
# client's CPU (105 against 206 µs a call here), which packs one command and parses one reply.
# KEYS: totals, the hour's hash, the hours' zset. ARGV: the requests, prompt and completion
# fields; prompt, completion tokens; the hour's expiry; the hour; the first hour kept.
COUNT = """
for i = 1, 2 do
  redis.call('HINCRBY', KEYS[i], ARGV[1], 1)
  redis.call('HINCRBY', KEYS[i], ARGV[2], ARGV[4])
  redis.call('HINCRBY', KEYS[i], ARGV[3], ARGV[5])
end
redis.call('EXPIREAT', KEYS[2], ARGV[6])
redis.call('ZADD', KEYS[3], ARGV[7], ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[8])
return 1
"""


def count_call(totals: str, hour_hash: Callable[[int], str], who: int | str, model: str, prompt_tokens: int,
               completion_tokens: int, at: float | None) -> tuple[list[str], list[str | int]]:  # fmt: skip
    """The keys and arguments of `COUNT` for one request of `who` (a key's id or a node's name)
    at `at` (None: now); ValueError for counts that are not counts."""
    check_usage(prompt_tokens, completion_tokens)
    now = time.time() if at is None else at
    hour = hour_of(now)
    fields = [rk.usage_field(who, kind, model) for kind in ("r", "p", "c")]
    args: list[str | int] = [*fields, prompt_tokens, completion_tokens, hour + rk.USAGE_HOUR_EXPIRES_S, hour,
                             first_hour_kept(now)]  # fmt: skip
    return [totals, hour_hash(hour), rk.USAGE_HOURS], args


def _encodable(fields: dict[str, str]) -> dict[EncodableT, EncodableT]:
    """The same fields, typed as redis-py's `hset` takes them (its mapping type is invariant)."""
    return {name: value for name, value in fields.items()}  # a comprehension retypes it


def _time(value: str | None) -> float | None:
    return None if value is None else float(value)


def key_record(fields: dict[str, str]) -> KeyRecord:
    """A key's record from its hash's fields (`rediskeys.key`)."""
    return KeyRecord(int(fields["id"]), fields["name"], cast(Role, fields["role"]), fields["prefix"],
                     float(fields["created"]), _time(fields.get("expires")), _time(fields.get("revoked")),
                     cache=fields.get("cache") != "0")  # fmt: skip


def _identity(name: str, fields: dict[str, str]) -> NodeIdentity:
    return NodeIdentity(name, float(fields["created"]), _time(fields.get("revoked")), _time(fields.get("confirmed")))


class RedisStore:
    """`Store` over a Redis server that several orchestrator replicas share."""

    def __init__(self, client: redis.Redis) -> None:
        self._r = client
        self._offer = client.register_script(OFFER)
        self._confirm = client.register_script(CONFIRM)
        self._revoke = client.register_script(REVOKE)
        self._count_script = client.register_script(COUNT)

    @classmethod
    def connect(cls, url: str) -> RedisStore:
        """The store on the Redis at `url`; `ConfigError` if it cannot be used (see `connect`)."""
        return cls(connect(url))

    @_shared
    def create_key(self, role: Role, name: str, expires: float | None = None,
                   cache: bool = True) -> tuple[str, KeyRecord]:  # fmt: skip
        check_new_key(role, name)
        key = new_key()
        digest = hash_key(key)
        created = time.time()
        key_id = self._r.incr(rk.KEY_IDS)
        fields = {"id": str(key_id), "name": name, "role": role, "prefix": key_prefix(key), "created": repr(created)}
        if expires is not None:
            fields["expires"] = repr(float(expires))
        if not cache:  # absent: the cache is used, as by every key made before the field was
            fields["cache"] = "0"
        with self._r.pipeline(transaction=True) as tx:
            tx.hset(rk.key(digest), mapping=_encodable(fields))
            tx.hset(rk.KEYS, str(key_id), digest)
            tx.execute()
        return key, key_record(fields)

    @_shared
    def find_key(self, key: str) -> KeyRecord | None:
        fields = cast(dict[str, str], self._r.hgetall(rk.key(hash_key(key))))
        return key_record(fields) if fields else None

    def _keys(self) -> list[tuple[str, KeyRecord]]:
        """(hash, record) of every key, oldest first."""
        index = cast(dict[str, str], self._r.hgetall(rk.KEYS))
        digests = [index[key_id] for key_id in sorted(index, key=int)]
        with self._r.pipeline(transaction=False) as reads:
            for digest in digests:
                reads.hgetall(rk.key(digest))
            records = reads.execute()
        return [(digest, key_record(fields)) for digest, fields in zip(digests, records, strict=True) if fields]

    @_shared
    def list_keys(self) -> list[KeyRecord]:
        return [record for _, record in self._keys()]

    @_shared
    def revoke_key(self, ident: str) -> KeyRecord | None:
        if ident.isdigit():
            digest = cast(str | None, self._r.hget(rk.KEYS, str(int(ident))))
            digests = [digest] if digest else []
        else:
            digests = [digest for digest, record in self._keys() if record.prefix == ident]
        if len(digests) != 1:
            return None
        self._r.hsetnx(rk.key(digests[0]), "revoked", repr(time.time()))  # a second revocation keeps the first time
        return key_record(cast(dict[str, str], self._r.hgetall(rk.key(digests[0]))))

    @_shared
    def offer_identity(self, name: str) -> str | None:
        credential = new_credential()
        offered = self._offer(keys=[rk.identity(name), rk.IDENTITIES],
                              args=[hash_key(credential), repr(time.time()), name])  # fmt: skip
        return credential if offered == 1 else None

    @_shared
    def confirm_identity(self, name: str, credential: str) -> bool:
        return bool(self._confirm(keys=[rk.identity(name)], args=[hash_key(credential), repr(time.time())]) == 1)

    @_shared
    def forget_identity(self, name: str) -> bool:
        with self._r.pipeline(transaction=True) as tx:
            tx.delete(rk.identity(name))
            tx.srem(rk.IDENTITIES, name)
            tx.delete(rk.node(name))
            tx.zrem(rk.NODES, name)
            identity, _, record, _ = tx.execute()
        return bool(identity or record)

    @_shared
    def find_identity(self, name: str, credential: str) -> NodeIdentity | None:
        fields = cast(dict[str, str], self._r.hgetall(rk.identity(name)))
        if not fields or not hmac.compare_digest(fields["hash"], hash_key(credential)):
            return None
        return _identity(name, fields)

    @_shared
    def get_identity(self, name: str) -> NodeIdentity | None:
        fields = cast(dict[str, str], self._r.hgetall(rk.identity(name)))
        return _identity(name, fields) if fields else None

    @_shared
    def revoke_identity(self, name: str) -> bool:
        return bool(self._revoke(keys=[rk.identity(name)], args=[repr(time.time())]) == 1)

    @_shared
    def list_identities(self) -> list[NodeIdentity]:
        names = sorted(cast(set[str], self._r.smembers(rk.IDENTITIES)))
        with self._r.pipeline(transaction=False) as reads:
            for name in names:
                reads.hgetall(rk.identity(name))
            found = reads.execute()
        return [_identity(name, fields) for name, fields in zip(names, found, strict=True) if fields]

    @_shared
    def save_nodes(self, nodes: Sequence[NodeRecord]) -> None:
        # Serialised before anything is sent: a record that is not JSON fails the whole save.
        rows = [(n, json.dumps(n.info)) for n in nodes]
        if not rows:
            return
        now = time.time()
        with self._r.pipeline(transaction=True) as tx:
            for record, info in rows:
                name = rk.node(record.name)
                tx.hsetnx(name, "first_seen", repr(record.first_seen))
                tx.hset(name, mapping={"last_seen": repr(record.last_seen), "state": record.state, "info": info})
                tx.expire(name, rk.NODE_TTL_S)
                tx.zadd(rk.NODES, {record.name: now + rk.NODE_TTL_S})
            tx.zremrangebyscore(rk.NODES, "-inf", f"({now!r}")  # names whose records expired
            tx.expire(rk.NODES, rk.NODE_TTL_S)
            tx.execute()

    @_shared
    def list_nodes(self) -> list[NodeRecord]:
        names = sorted(cast(list[str], self._r.zrangebyscore(rk.NODES, repr(time.time()), "+inf")))
        with self._r.pipeline(transaction=False) as reads:
            for name in names:
                reads.hgetall(rk.node(name))
            found: list[dict[str, str]] = reads.execute()
        return [NodeRecord(name, float(f["first_seen"]), float(f["last_seen"]), f["state"], json.loads(f["info"]))
                for name, f in zip(names, found, strict=True) if f]  # fmt: skip

    @_shared
    def record_usage(self, key_id: int, model: str, prompt_tokens: int, completion_tokens: int,
                     at: float | None = None) -> None:  # fmt: skip
        self._count(rk.USAGE, rk.usage_hour, key_id, model, prompt_tokens, completion_tokens, at)

    @_shared
    def record_node_usage(self, node: str, model: str, prompt_tokens: int, completion_tokens: int,
                          at: float | None = None) -> None:  # fmt: skip
        self._count(rk.NODE_USAGE, rk.node_usage_hour, node, model, prompt_tokens, completion_tokens, at)

    def _count(self, totals: str, hour_hash: Callable[[int], str], who: int | str, model: str, prompt_tokens: int,
               completion_tokens: int, at: float | None) -> None:  # fmt: skip
        keys, args = count_call(totals, hour_hash, who, model, prompt_tokens, completion_tokens, at)
        self._count_script(keys=keys, args=args)

    def _usage(self, totals: str, hour_hash: Callable[[int], str],
               since: float | None) -> dict[tuple[str, str], dict[str, int]]:  # fmt: skip
        """(who, model) -> counts: from the totals, or summed over the hours from `since`'s on."""
        if since is None:
            hashes = [cast(dict[str, str], self._r.hgetall(totals))]
        else:
            hours = cast(list[str], self._r.zrangebyscore(rk.USAGE_HOURS, hour_of(since), "+inf"))
            with self._r.pipeline(transaction=False) as reads:
                for hour in hours:
                    reads.hgetall(hour_hash(int(hour)))
                hashes = reads.execute()
        rows: dict[tuple[str, str], dict[str, int]] = {}
        for fields in hashes:
            for field, value in fields.items():
                who, kind, model = rk.parse_usage_field(field)
                counts = rows.setdefault((who, model), dict.fromkeys(rk.USAGE_KINDS.values(), 0))
                counts[rk.USAGE_KINDS[kind]] += int(value)
        return rows

    @_shared
    def usage_by_key(self) -> dict[int, tuple[int, int, int]]:
        totals: dict[int, tuple[int, int, int]] = {}
        for (key_id, _), c in self._usage(rk.USAGE, rk.usage_hour, None).items():
            r, p, q = totals.get(int(key_id), (0, 0, 0))
            totals[int(key_id)] = (r + c["requests"], p + c["prompt_tokens"], q + c["completion_tokens"])
        return totals

    @_shared
    def list_usage(self, since: float | None = None) -> list[Usage]:
        rows = {(int(key_id), model): c for (key_id, model), c in self._usage(rk.USAGE, rk.usage_hour, since).items()}
        return [Usage(key_id, model, c["requests"], c["prompt_tokens"], c["completion_tokens"])
                for (key_id, model), c in sorted(rows.items())]  # fmt: skip

    @_shared
    def list_node_usage(self, since: float | None = None) -> list[NodeUsage]:
        rows = self._usage(rk.NODE_USAGE, rk.node_usage_hour, since)
        return [NodeUsage(node, model, c["requests"], c["prompt_tokens"], c["completion_tokens"])
                for (node, model), c in sorted(rows.items())]  # fmt: skip

    def close(self) -> None:
        self._r.close()
