"""Every Redis key the project uses, and every TTL: the one place that names them.

All keys start with `dragon:`, so a Redis shared with other programs can tell ours apart
(and `redis-cli --scan --pattern 'dragon:*'` lists them). Names built from a value (a
node's name, a key's hash, a rate-limit lane) are functions here, never f-strings elsewhere.
Lua scripts receive every key they touch as KEYS, built here, so no script composes a name.

| key | type | holds | TTL |
|---|---|---|---|
| `dragon:keys:next-id` | string | the last API key id handed out (INCR) | none |
| `dragon:keys` | hash | key id -> sha256 of the key: the listing, oldest first by id | none |
| `dragon:key:<sha256>` | hash | one API key: id, name, role, prefix, created, expires?, revoked?, cache? | none |
| `dragon:identities` | set | names of admitted nodes | none |
| `dragon:identity:<name>` | hash | hash (of its credential), created, confirmed?, revoked? | none |
| `dragon:nodes` | zset | node name -> unix time its record expires | `NODE_TTL_S` |
| `dragon:node:<name>` | hash | first_seen, last_seen, state, info (JSON) | `NODE_TTL_S` |
| `dragon:usage` | hash | `<key id>:<r|p|c>:<model>` -> a key's requests, prompt or completion tokens, in all | none |
| `dragon:usage:nodes` | hash | `<node name>:<r|p|c>:<model>` -> the same for a node's hand-offs, in all | none |
| `dragon:usage:hours` | zset | hour start (unix seconds) -> itself: the kept hours counted in | none: trimmed |
| `dragon:usage:hour:<hour start>` | hash | as `dragon:usage`, in that hour only | hour + `USAGE_HOUR_EXPIRES_S` |
| `dragon:usage:nodes:hour:<hour start>` | hash | as `dragon:usage:nodes`, that hour | hour + `USAGE_HOUR_EXPIRES_S` |
| `dragon:rate:{<lane>}:log` | zset | charge id -> admission time (ms, the Redis server's clock) | `RATE_TTL_S` |
| `dragon:rate:{<lane>}:charges` | hash | charge id -> tokens charged, net of refunds | `RATE_TTL_S` |
| `dragon:rate:{<lane>}:state` | hash | sum (of the log's tokens), latest (ms: never moves back) | `RATE_TTL_S` |
| `dragon:replicas` | set | the ids of replicas that announced themselves | none (dead ones removed) |
| `dragon:replica:<id>` | string | this replica is alive: the format it writes for the others | `REPLICA_TTL_S` |
| `dragon:replica:<id>:nodes` | hash | node name -> what placement needs of it (JSON) | `REPLICA_NODES_TTL_S` |
| `dragon:replica:<id>:queue` | hash | user lane -> fragments waiting in its queue | `REPLICA_NODES_TTL_S` |
| `dragon:replica:<id>:inbox` | stream | `run`/`cancel` from other replicas for its nodes | `STREAM_TTL_S` |
| `dragon:replica:<id>:events` | stream | events of its jobs run elsewhere; others' changed nodes | `STREAM_TTL_S` |
| `dragon:response:<sha256>` | string | one cached answer's events (JSON), by its cache key | `--cache-ttl` |

A key's plaintext is never stored: only its sha256 (in a key's name and the listing).
The rate-limit keys of one lane share a hash tag (`{<lane>}`), so one script may touch all
three on a Redis Cluster too.
"""

from __future__ import annotations

from dragonswarm.store.base import HOUR_S, USAGE_HOURS_KEPT_S

PREFIX = "dragon:"

# API keys (store/redis.py)
KEY_IDS = PREFIX + "keys:next-id"
KEYS = PREFIX + "keys"

# Node identities: admitted machines and their credentials' hashes
IDENTITIES = PREFIX + "identities"

# Node records, as the orchestrator last saw each node
NODES = PREFIX + "nodes"
# A record not saved for a day is dropped: a machine gone that long is listed no more. Each
# save refreshes it, and a replica saves its live nodes every few seconds.
NODE_TTL_S = 86_400

# Usage counters per key (or node) and model (HINCRBY): in all, and per hour for reports "since T".
# A request adds to both in one transaction. Fields from before hours were kept are in the totals
# only: they count in all and in no hour. The totals are kept for good; an hour only for
# `USAGE_HOURS_KEPT_S` (35 days, 840 hours): the same transaction trims the hours' zset below the
# first hour kept and sets its hour's hashes to expire, so they hold at most callers x models x 3
# fields x 840 hours, callers being the keys, or the nodes that hand off (10,000 nodes handing off
# every hour on one model each: 25 million fields at most, then no more). An all-time report still
# reads the totals alone, a window only its own hours.
USAGE = PREFIX + "usage"
NODE_USAGE = PREFIX + "usage:nodes"
USAGE_HOURS = PREFIX + "usage:hours"
USAGE_KINDS = {"r": "requests", "p": "prompt_tokens", "c": "completion_tokens"}
# An hour's hashes outlive its place in the window by an hour, so a report that read the hour from
# `USAGE_HOURS` as it was leaving (or on a clock a little behind Redis's) still finds them.
USAGE_HOUR_EXPIRES_S = USAGE_HOURS_KEPT_S + HOUR_S

# Rate limits (store/redis_limits.py): a charge leaves the window after 60 s, so a lane's keys
# are useless a window after its last admission; the second more covers clock granularity.
RATE_TTL_S = 61


def key(sha256: str) -> str:
    """One API key's record, named by the hash of the key."""
    return f"{PREFIX}key:{sha256}"


def identity(name: str) -> str:
    """One admitted node's identity."""
    return f"{PREFIX}identity:{name}"


def node(name: str) -> str:
    """One node's record."""
    return f"{PREFIX}node:{name}"


def usage_hour(hour: int) -> str:
    """Keys' usage counted in the hour starting at `hour` (unix seconds)."""
    return f"{PREFIX}usage:hour:{hour}"


def node_usage_hour(hour: int) -> str:
    """Nodes' hand-offs' usage counted in the hour starting at `hour`."""
    return f"{PREFIX}usage:nodes:hour:{hour}"


def usage_field(who: int | str, kind: str, model: str) -> str:
    """A counter in a usage hash: `who` is a key id or a node name (which holds no ':'), and the
    model goes last, so any model name splits back out whole."""
    return f"{who}:{kind}:{model}"


def parse_usage_field(field: str) -> tuple[str, str, str]:
    """(who, kind, model) of a usage hash's field."""
    who, _, rest = field.partition(":")
    kind, _, model = rest.partition(":")
    return who, kind, model


def rate(lane: str) -> tuple[str, str, str]:
    """A rate-limit lane's log, charges and state, in the order the limiter's scripts take them."""
    tag = f"{PREFIX}rate:{{{lane}}}"
    return f"{tag}:log", f"{tag}:charges", f"{tag}:state"


# Replicas sharing work (orchestrator/federation.py)
REPLICAS = PREFIX + "replicas"
REPLICA_TTL_S = 3  # refreshed twice a second: a replica silent this long is taken for dead
REPLICA_NODES_TTL_S = 10  # its nodes' hash outlives a crash by this much at most
STREAM_MAXLEN = 100_000  # inbox and event streams are trimmed to about this many entries
STREAM_TTL_S = 3600  # ... deleted an hour after their last entry (a replica that died; its reader trims them)


def replica(replica_id: str) -> str:
    """A replica's liveness."""
    return f"{PREFIX}replica:{replica_id}"


def replica_nodes(replica_id: str) -> str:
    """The nodes a replica holds."""
    return f"{PREFIX}replica:{replica_id}:nodes"


def inbox(replica_id: str) -> str:
    """Messages for the nodes a replica holds."""
    return f"{PREFIX}replica:{replica_id}:inbox"


def events(replica_id: str) -> str:
    """Node events for the jobs a replica placed on other replicas' nodes."""
    return f"{PREFIX}replica:{replica_id}:events"


def replica_queue(replica_id: str) -> str:
    """What a replica has waiting in its fair queue, per user: admission counts the whole swarm's."""
    return f"{PREFIX}replica:{replica_id}:queue"


# The response cache (store/responses_redis.py). Its TTL is the orchestrator's setting
# (`--cache-ttl`), not a constant: the operator decides how long an answer stays good.
def response(key: str) -> str:
    """One cached answer, named by its cache key (a sha256: the model file, the request, the scope)."""
    return f"{PREFIX}response:{key}"
