"""Every Redis key the swarm uses, and how long each lives: the one place to read them."""

from __future__ import annotations

PREFIX = "dragon:"

# --- replicas (orchestrator/federation.py) ---
REPLICAS = PREFIX + "replicas"  # set: the replica ids that have announced themselves
REPLICA_TTL_S = 3  # a replica refreshes its liveness key twice a second; gone this long, it is dead
REPLICA_NODES_TTL_S = 10  # its nodes' hash outlives a crash by this much at most
STREAM_MAXLEN = 100_000  # inbox and event streams are trimmed to about this many entries
STREAM_TTL_S = 3600  # ... and deleted an hour after their last entry (a replica that died)


def replica(replica_id: str) -> str:
    """String, with a TTL: this replica is alive."""
    return f"{PREFIX}replica:{replica_id}"


def replica_nodes(replica_id: str) -> str:
    """Hash, node name -> what placement needs of that node (JSON), for the nodes this replica holds."""
    return f"{PREFIX}replica:{replica_id}:nodes"


def inbox(replica_id: str) -> str:
    """Stream: `run` and `cancel` messages from other replicas for nodes this replica holds."""
    return f"{PREFIX}replica:{replica_id}:inbox"


def events(replica_id: str) -> str:
    """Stream: batches of node events for jobs this replica placed on other replicas' nodes."""
    return f"{PREFIX}replica:{replica_id}:events"
