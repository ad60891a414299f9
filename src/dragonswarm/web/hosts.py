"""Which `Host` and `Origin` a node's local API answers: its defence against DNS rebinding.

A web page can make a browser send requests to 127.0.0.1 under a name the page's owner
controls (attacker.example resolving first to their server, then to 127.0.0.1: DNS
rebinding, as in Ollama's CVE-2024-28224). The browser then calls it same-origin and
lets the page read the answers. Such a request carries the attacker's name in `Host`,
so the API answers only names it knows: loopback, the address it binds, and names the
owner configures. An IP literal can serve no rebinding, so a node that binds beyond
loopback (with its API key) also answers its addresses by number. A browser's request
from another site carries that site in `Origin`: refused by the same rule.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from dragonswarm.errors import Forbidden
from dragonswarm.web.errors import dragon_error_response

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARDS = frozenset({"0.0.0.0", "::", ""})


def host_name(header: str) -> str:
    """The name in a `Host` header: no port, no IPv6 brackets, lower case, no trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:8701
        return header[1 : header.find("]")] if "]" in header else header
    if header.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        header = header.split(":", 1)[0]
    return header.rstrip(".")


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


@dataclass(frozen=True)
class HostPolicy:
    """The names the local API answers to (pure: header values in, a decision out)."""

    names: frozenset[str]
    any_ip: bool  # bound beyond loopback: clients may address this machine by number

    @classmethod
    def for_bind(cls, bind_host: str, configured: Iterable[str] = ()) -> HostPolicy:
        bind = host_name(bind_host)
        ip = _ip(bind)
        beyond = bind in WILDCARDS or (ip is not None and not ip.is_loopback) or (ip is None and bind != "localhost")
        names = LOOPBACK_NAMES | {host_name(n) for n in configured} | ({bind} - WILDCARDS)
        return cls(frozenset(names), any_ip=beyond)

    def allows_host(self, header: str) -> bool:
        name = host_name(header)
        if name in self.names:
            return True
        ip = _ip(name)
        return ip is not None and (ip.is_loopback or self.any_ip)

    def allows_origin(self, origin: str) -> bool:
        """A browser's `Origin`: a page served under a name this API answers to (any port)."""
        if origin == "null":  # sandboxed frames, file:// pages: no site to trust
            return False
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and self.allows_host(parts.netloc)


class CheckHost:
    """ASGI middleware: a request under a name or from a site this API does not answer to gets 403."""

    def __init__(self, app: ASGIApp, policy: HostPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        host = headers.get(b"host", b"").decode("latin-1")
        origin = headers.get(b"origin")
        problem = None
        if not self.policy.allows_host(host):
            problem = Forbidden(f"this node's API does not answer to the host name {host_name(host)!r}; "
                                "add it with --allowed-host if it is yours", code="host_not_allowed")  # fmt: skip
        elif origin is not None and not self.policy.allows_origin(origin.decode("latin-1")):
            problem = Forbidden(f"requests from web pages of {origin.decode('latin-1')!r} are refused: a page "
                                "may not use this node's API from another site", code="origin_not_allowed")  # fmt: skip
        if problem is None:
            await self.app(scope, receive, send)
        else:
            await dragon_error_response(problem)(scope, receive, send)
