"""Browser logins to the dashboard: one-time tokens exchanged for session cookies.

A browser cannot send a bearer header when it opens a page, and an admin key must never
sit in a URL, a log or a page. So an admin asks for a one-time token with their key
(`dragon dashboard`); the URL printed carries it in its fragment (`#login=...`), which a
browser never sends to a server, so it is in no request line and no log either; the page
posts it once and gets an HttpOnly, Secure, SameSite=Strict session cookie in exchange.

Only hashes are kept, in memory: a restart logs every browser out (they ask again), and
with several replicas this moves to the shared store.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

TOKEN_TTL_S = 120.0  # a one-time token: long enough to paste, short enough to be useless later
SESSION_TTL_S = 12 * 3600.0
MAX_PENDING = 1000  # tokens asked for and not yet used: an admin key in a loop cannot grow this without end
MAX_SESSIONS = 1000


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class Logins:
    tokens: dict[str, float] = field(default_factory=dict)  # token hash -> expiry (monotonic)
    sessions: dict[str, float] = field(default_factory=dict)  # session hash -> expiry

    def issue(self, now: float, ttl_s: float = TOKEN_TTL_S) -> str:
        """A new one-time token, valid for `ttl_s`."""
        self._expire(now)
        if len(self.tokens) >= MAX_PENDING:
            self.tokens.pop(next(iter(self.tokens)))  # the oldest goes
        token = secrets.token_urlsafe(32)
        self.tokens[_hash(token)] = now + ttl_s
        return token

    def redeem(self, token: str, now: float) -> str | None:
        """A session for a token not used before and not expired; the token is spent either way."""
        expiry = self.tokens.pop(_hash(token), None)
        if expiry is None or expiry < now:
            return None
        self._expire(now)
        if len(self.sessions) >= MAX_SESSIONS:
            self.sessions.pop(next(iter(self.sessions)))
        session = secrets.token_urlsafe(32)
        self.sessions[_hash(session)] = now + SESSION_TTL_S
        return session

    def valid(self, session: str | None, now: float) -> bool:
        if not session:
            return False
        expiry = self.sessions.get(_hash(session))
        return expiry is not None and expiry >= now

    def end(self, session: str) -> None:
        self.sessions.pop(_hash(session), None)

    def _expire(self, now: float) -> None:
        for table in (self.tokens, self.sessions):
            for h in [h for h, expiry in table.items() if expiry < now]:
                del table[h]
