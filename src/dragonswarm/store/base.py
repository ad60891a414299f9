"""What the orchestrator keeps: records, key handling and the `Store` interface a backend implements."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from dragonswarm.protocol.swarm import CREDENTIAL_PREFIX

Role = Literal["user", "node", "admin", "metrics"]  # metrics: only scrapes `/metrics`
ROLES: tuple[Role, ...] = ("user", "node", "admin", "metrics")

KEY_PREFIX = "dsk_"
SHOWN_PREFIX_LEN = 12  # "dsk_" plus 8 random characters: enough to tell keys apart, useless to an attacker
MAX_NAME_LEN = 64


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: int
    name: str
    role: Role
    prefix: str  # first 12 characters of the key, to recognise it in listings (never the whole key)
    created: float  # unix time
    expires: float | None = None  # unix time; None: never
    revoked: float | None = None  # unix time it was revoked; None: in force
    cache: bool = True  # False: its answers never come from nor go to the response cache

    def refusal(self, now: float) -> str | None:
        """Why this key may not be used now, or None if it may."""
        if self.revoked is not None:
            return "this API key has been revoked"
        if self.expires is not None and now >= self.expires:
            return "this API key has expired"
        return None

    def state(self, now: float) -> str:
        """'active', 'expired' or 'revoked', as listings show it."""
        return "revoked" if self.revoked is not None else ("expired" if self.refusal(now) else "active")


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """A machine admitted to the swarm: its name and the hash of its own credential.

    A name is offered a credential first and bound to it only once the node confirms that
    it holds it (`confirmed`); until then the shared node key may ask again, so a welcome
    lost on the way, or a credential the node failed to write, never locks a name out."""

    name: str
    created: float
    revoked: float | None = None
    confirmed: float | None = None


@dataclass(frozen=True, slots=True)
class NodeRecord:
    name: str
    first_seen: float
    last_seen: float
    state: str  # "live" | "stale" | "gone"
    info: dict[str, Any]  # models, shares, last heartbeat figures (JSON-serialisable)


@dataclass(frozen=True, slots=True)
class Usage:
    """What one key has used of one model: since the store was made, or since the hour asked for."""

    key_id: int
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class NodeUsage:
    """What one node's hand-offs (its owner's requests it passed to the swarm) used of one model."""

    node: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


HOUR_S = 3600
# How long usage by the hour is kept: enough for a `--since 30d` report, with room to spare. Every
# caller (key or node) adds a bucket per model each hour it is busy, and nodes are callers too, so
# the hours must not be kept for good; the all-time totals are, and are never trimmed.
USAGE_HOURS_KEPT_S = 35 * 86_400


def hour_of(at: float) -> int:
    """The start of the hour holding unix time `at`: the bucket that usage at `at` is counted in."""
    return int(at // HOUR_S) * HOUR_S


def first_hour_kept(now: float) -> int:
    """The oldest hour whose usage is kept at `now`: of the 840 kept (35 days), the current one is the
    last. Older hours are dropped as usage is counted."""
    return hour_of(now) - USAGE_HOURS_KEPT_S + HOUR_S


def check_usage(prompt_tokens: int, completion_tokens: int) -> None:
    """Raise ValueError for counts no request can have; shared by every backend."""
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError("token counts cannot be negative")


def new_key() -> str:
    """A new random key: 'dsk_' + secrets.token_urlsafe(32) (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_credential() -> str:
    """A node's own credential, issued when a node key admits it."""
    return CREDENTIAL_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """sha256 hex of the key, which is all a store keeps."""
    # No salt or slow KDF: those protect low-entropy passwords from guessing. Our keys are
    # 256 bits from `secrets`, so a leaked hash cannot be brute-forced either way, and a
    # plain digest lets the store look a key up by an index on the hash.
    return hashlib.sha256(key.encode()).hexdigest()


def key_prefix(key: str) -> str:
    """The part of a key that may be shown in listings."""
    return key[:SHOWN_PREFIX_LEN]


def check_new_key(role: str, name: str) -> None:
    """Raise ValueError unless `role` and `name` are fit for a new key; shared by every backend."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if not name.strip():
        raise ValueError("a key needs a name")
    if len(name) > MAX_NAME_LEN:
        raise ValueError(f"key name longer than {MAX_NAME_LEN} characters")


class Store(Protocol):
    """The orchestrator's state. Implementations must be safe to call from several threads."""

    def create_key(self, role: Role, name: str, expires: float | None = None,
                   cache: bool = True) -> tuple[str, KeyRecord]:  # fmt: skip
        """Make a key; the plaintext is returned this once and only its hash is stored.
        `cache` False: the key opts out of the orchestrator's response cache."""

    def find_key(self, key: str) -> KeyRecord | None:
        """The record of a plaintext key (revoked and expired ones too), or None if it is unknown."""

    def list_keys(self) -> list[KeyRecord]:
        """Every key, oldest first."""

    def revoke_key(self, ident: str) -> KeyRecord | None:
        """Revoke the key with this id or shown prefix; None if no single key matches."""

    def offer_identity(self, name: str) -> str | None:
        """A new credential for a name nobody holds yet (plaintext, once; it replaces one offered
        before and never confirmed), or None if the name is bound or revoked."""

    def confirm_identity(self, name: str, credential: str) -> bool:
        """Bind the name to this credential, its node having shown it holds it; False if the
        credential is not the one offered (another machine's offer replaced it)."""

    def forget_identity(self, name: str) -> bool:
        """Free a name (its identity and its record); False if nothing was kept under it."""

    def find_identity(self, name: str, credential: str) -> NodeIdentity | None:
        """The identity if `credential` is this name's, else None."""

    def get_identity(self, name: str) -> NodeIdentity | None:
        """The identity held under a name, if any."""

    def revoke_identity(self, name: str) -> bool:
        """Revoke a node for good; False if no such node was admitted."""

    def list_identities(self) -> list[NodeIdentity]:
        """Every admitted node, by name."""

    def save_nodes(self, nodes: Sequence[NodeRecord]) -> None:
        """Upsert by name in one transaction; a node's first_seen is kept from its first save."""

    def list_nodes(self) -> list[NodeRecord]:
        """Every node, ordered by name."""

    def record_usage(self, key_id: int, model: str, prompt_tokens: int, completion_tokens: int,
                     at: float | None = None) -> None:  # fmt: skip
        """Count one request and its tokens against a key and model, in all and in the hour
        holding `at` (unix time; None: now); hours before `first_hour_kept(at)` are dropped."""

    def record_node_usage(self, node: str, model: str, prompt_tokens: int, completion_tokens: int,
                          at: float | None = None) -> None:  # fmt: skip
        """Count one hand-off (a request a node passed over for its owner) against the node, as
        `record_usage` counts a key's."""

    def usage_by_key(self) -> dict[int, tuple[int, int, int]]:
        """key_id -> (requests, prompt_tokens, completion_tokens), summed over models, in all."""

    def list_usage(self, since: float | None = None) -> list[Usage]:
        """Every key's usage per model, by key id then model: in all, or with `since`, summed over
        the hours from the one holding `since` on (usage from before hours were kept is in no hour).
        Hours before `first_hour_kept(now)` are dropped (or soon will be): a report asks from that one
        on at the earliest."""

    def list_node_usage(self, since: float | None = None) -> list[NodeUsage]:
        """Every node's hand-offs' usage per model, by name then model; `since` as in `list_usage`."""

    def close(self) -> None:
        """Release the connection; the store is unusable afterwards."""
