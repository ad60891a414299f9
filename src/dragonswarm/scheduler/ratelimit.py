"""Per-key rate limits: requests and tokens per minute over a sliding window (pure, no clock of its own).

A request is charged at admission: one request, and its token estimate (prompt plus the
most it may generate). When it ends, `refund` lowers that charge to what it really used,
so a key is held to what it consumed while no request can overrun the limit mid-way.

Each key keeps a log of its admissions in the last `WINDOW_S` seconds, each with its
charge net of refunds. A request is admitted only if the log plus the request fit both
limits. That holds the limits over every window, not on average:

    For any window [s, s + 60) let t be the last admission in it. Every earlier admission
    in the window is younger than 60 s at t, so it was in the log when t was admitted,
    at a charge no smaller than its final one (refunds only lower a charge, and never
    below zero). t's own final charge is at most its estimate. So the window's admissions
    sum, net of refunds, to at most what t's check allowed: the limit.

A token bucket (refilling at limit/60 per second) cannot promise this: a full bucket plus
a minute's refill admits twice the limit within 60 s.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

WINDOW_S = 60.0


@dataclass(eq=False, slots=True)
class Charge:
    """One admitted request's place in its key's log: the handle `refund` takes."""

    key: str
    at: float  # when it was admitted
    tokens: int  # what it is charged now, net of refunds
    logged: bool = True  # still counted in its key's window (False once older than the window)
    handle: str = ""  # a shared limiter's own name for it (its member in Redis); "" in process


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request not admitted, and nothing charged for it."""

    reason: str
    wait: float | None  # seconds until it would fit; None when it never can (bigger than the limit)


@dataclass(slots=True)
class _Log:
    """A key's admissions younger than the window, oldest first, and their sum net of refunds."""

    charges: deque[Charge] = field(default_factory=deque)
    tokens: int = 0
    latest: float = float("-inf")  # the latest time seen: the window never moves back

    def expire(self, now: float) -> None:
        while self.charges and self.charges[0].at + WINDOW_S <= now:
            old = self.charges.popleft()
            old.logged = False
            self.tokens -= old.tokens


def answer_without_log(key: str, tokens: int, now: float, rpm: int, tpm: int) -> Charge | Refusal | None:
    """What every limiter answers before it looks at a key's window: a refusal for a request bigger
    than the limit itself, an unlogged charge when there is no limit, else None (look)."""
    if tokens < 0:
        raise ValueError("a token estimate cannot be negative")
    if tpm and tokens > tpm:
        return Refusal(f"this request may use up to {tokens} tokens, more than this key's limit of {tpm} "
                       "tokens per minute: it can never be admitted; ask for fewer tokens", None)  # fmt: skip
    if not rpm and not tpm:
        return Charge(key, now, tokens, logged=False)  # no limit: nothing to remember
    return None


def fits_ahead(requests: int, tokens_used: int, tokens: int, rpm: int, tpm: int) -> bool:
    """A shared window last seen holding `requests` and `tokens_used` (with what this replica
    admitted since counted in) stays in its lower half with one more request of `tokens`: the
    replica may admit it before the shared store answers. What other replicas admitted since
    it last looked is unknown, so only there: a key near its limit waits for the store's exact
    answer, and one replica can pass a limit only if the others used half of it unseen, and
    then by what it admitted before the store's answer reached it."""
    return (not rpm or requests + 1 <= rpm // 2) and (not tpm or tokens_used + tokens <= tpm // 2)


def limited(rpm: int, tpm: int, wait: float) -> Refusal:
    """The refusal of a request that fits once `wait` seconds have passed."""
    limits = " and ".join(f"{n} {what}" for n, what in ((rpm, "requests"), (tpm, "tokens")) if n)
    return Refusal(f"rate limit reached for this key ({limits} per minute); retry in {math.ceil(wait)} s", wait)


@dataclass
class RateLimiter:
    """Requests per minute and tokens per minute per key; 0 turns a limit off."""

    rpm: int
    tpm: int
    _logs: dict[str, _Log] = field(default_factory=dict)
    _swept: float = float("-inf")

    def admit(self, key: str, tokens: int, now: float) -> Charge | Refusal:
        """Charge a request of at most `tokens` tokens, or say why not and for how long (charging nothing)."""
        answer = answer_without_log(key, tokens, now, self.rpm, self.tpm)
        if answer is not None:
            return answer
        self._sweep(now)
        log = self._logs.get(key)
        if log is None:
            log = self._logs[key] = _Log()
        now = log.latest = max(now, log.latest)
        log.expire(now)
        wait = self._wait(log, tokens, now)
        if wait > 0:
            return limited(self.rpm, self.tpm, wait)
        charge = Charge(key, now, tokens)
        log.charges.append(charge)
        log.tokens += tokens
        return charge

    def refund(self, charge: Charge, used: int) -> None:
        """Lower a charge to the tokens the request really used: never below 0, never above what was charged."""
        lowered = min(charge.tokens, max(0, used))
        if charge.logged:
            self._logs[charge.key].tokens -= charge.tokens - lowered
        charge.tokens = lowered

    def cancel(self, charge: Charge) -> None:
        """Take back an admission whose request was refused before it began (queue full, no node
        serves the model): a request that was never served counts for nothing, in either limit."""
        if charge.logged:
            log = self._logs[charge.key]
            log.charges.remove(charge)
            log.tokens -= charge.tokens
            charge.logged = False
        charge.tokens = 0

    def _wait(self, log: _Log, tokens: int, now: float) -> float:
        """Seconds until the oldest charges have left the window and the request fits; 0 if it fits now."""
        # Only the passing of time frees room here (a refund may free it sooner): the answer is
        # the exact time the limiting charge expires, so admitting at now + wait succeeds.
        until = now
        if self.rpm and len(log.charges) + 1 > self.rpm:
            until = max(until, log.charges[len(log.charges) - self.rpm].at + WINDOW_S)
        excess = log.tokens + tokens - self.tpm
        if self.tpm and excess > 0:
            for old in log.charges:
                excess -= old.tokens
                if excess <= 0:
                    until = max(until, old.at + WINDOW_S)
                    break
        return until - now

    def _sweep(self, now: float) -> None:
        """Forget keys idle for a whole window, so keys that stop calling do not hold memory."""
        if now - self._swept < WINDOW_S:
            return
        self._swept = now
        for key in list(self._logs):
            log = self._logs[key]
            log.expire(max(now, log.latest))
            if not log.charges:
                del self._logs[key]

    def charged(self, key: str, now: float) -> tuple[int, int]:
        """(requests, tokens) charged to `key` in the window ending at `now`."""
        log = self._logs.get(key)
        if log is None:
            return (0, 0)
        log.expire(max(now, log.latest))
        return (len(log.charges), log.tokens)
