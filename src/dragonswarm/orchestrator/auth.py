"""Who is asking: every endpoint but /health needs a key, and the key's role must allow it.

Fails closed: no key or an unknown key is 401, a known key with the wrong role 403.
`admin` may do everything.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping

from fastapi import Request

from dragonswarm.errors import Forbidden, Unauthorized
from dragonswarm.store.base import KeyRecord, Role, Store


def bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(store: Store, headers: Mapping[str, str], roles: tuple[Role, ...], what: str) -> KeyRecord:
    token = bearer(headers)
    if token is None:
        raise Unauthorized("missing API key: send it as 'Authorization: Bearer KEY'")
    record = store.find_key(token)
    if record is None:
        raise Unauthorized("invalid API key")
    refusal = record.refusal(time.time())
    if refusal is not None:
        raise Unauthorized(refusal)
    if record.role != "admin" and record.role not in roles:
        raise Forbidden(f"a {record.role} key may not {what}")
    return record


def require(*roles: Role, what: str) -> Callable[[Request], Awaitable[KeyRecord]]:
    """A FastAPI dependency admitting keys of these roles (and admin)."""

    # Async on purpose: the lookup is one indexed SQLite read (microseconds), cheaper than
    # the thread hop FastAPI would make for a plain function on every request.
    async def dependency(request: Request) -> KeyRecord:
        return authenticate(request.app.state.store, request.headers, roles, what)

    return dependency
