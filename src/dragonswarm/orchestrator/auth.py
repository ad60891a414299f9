"""Who is asking: every endpoint but /health needs a key, and the key's role must allow it.

Fails closed: no key or an unknown key is 401, a known key with the wrong role 403.
`admin` may do everything. The inference API also takes a node's own credential (with its
name in `X-Dragon-Node`): a node handing its owner's request over speaks as itself, so
it has its own limits and queue lane, and a revoked node is refused there too.
Lookups never hold the event loop: a key is read through the `CallerStore` (a thread for
the SQLite file, Redis's asyncio client for replicas), a node's credential in a thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from fastapi import Request

from dragonswarm.errors import Forbidden, Unauthorized
from dragonswarm.protocol.swarm import CREDENTIAL_PREFIX, NODE_HEADER
from dragonswarm.store.base import KeyRecord, NodeIdentity, Role, Store
from dragonswarm.store.callers import CallerStore
from dragonswarm.web.requestlog import facts


def bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_of(headers: Mapping[str, str]) -> str:
    """The bearer token; 401 when there is none."""
    token = bearer(headers)
    if token is None:
        raise Unauthorized("missing API key: send it as 'Authorization: Bearer KEY'")
    return token


def allowed(record: KeyRecord | None, roles: tuple[Role, ...], what: str) -> KeyRecord:
    """The key's record if it may `what` now: 401 when unknown, revoked or expired, 403 for another role."""
    if record is None:
        raise Unauthorized("invalid API key")
    refusal = record.refusal(time.time())
    if refusal is not None:
        raise Unauthorized(refusal)
    if record.role != "admin" and record.role not in roles:
        raise Forbidden(f"a {record.role} key may not {what}")
    return record


def authenticate(store: Store, headers: Mapping[str, str], roles: tuple[Role, ...], what: str) -> KeyRecord:
    """`allowed` for the key in `headers`, read from `store` (blocking)."""
    return allowed(store.find_key(token_of(headers)), roles, what)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks for inference: a key, or a node speaking for itself with its credential."""

    lane: str  # its rate limits and its lane in the fair queue: one per key, one per node
    key: KeyRecord | None = None
    node: str | None = None  # the node's name, authenticated: the origin of a hand-off

    @property
    def name(self) -> str:
        """Who, for logs and metrics: the key's name or the node's, never a secret."""
        if self.key is not None:
            return self.key.name
        return f"node:{self.node}" if self.node else self.lane


def node_identity(store: Store, name: str, credential: str) -> NodeIdentity:
    """The node a credential speaks for: 401 when it is not that node's, 403 once revoked."""
    identity = store.find_identity(name, credential)
    if identity is None:
        raise Unauthorized(f"not a credential of node {name!r} (send the node's name in {NODE_HEADER})")
    if identity.revoked is not None:
        raise Forbidden(f"node {name!r} has been revoked")
    return identity


def require(*roles: Role, what: str) -> Callable[[Request], Awaitable[KeyRecord]]:
    """A FastAPI dependency admitting keys of these roles (and admin)."""

    async def dependency(request: Request) -> KeyRecord:
        record = await _key(request, roles, what)
        facts(request).key = record.name
        return record

    return dependency


async def _key(request: Request, roles: tuple[Role, ...], what: str) -> KeyRecord:
    callers: CallerStore = request.app.state.callers
    return allowed(await callers.find_key(token_of(request.headers)), roles, what)


async def inference(request: Request) -> Caller:
    """A FastAPI dependency: a user (or admin) key, or a node's own credential."""
    headers = request.headers
    token = bearer(headers) or ""
    if token.startswith(CREDENTIAL_PREFIX):
        name = headers.get(NODE_HEADER.lower(), "")
        await asyncio.to_thread(node_identity, request.app.state.store, name, token)
        caller = Caller(lane=f"node-{name}", node=name)
    else:
        record = await _key(request, ("user",), "use the inference API")
        caller = Caller(lane=f"key-{record.id}", key=record)
    facts(request).key = caller.name
    return caller
