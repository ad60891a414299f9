"""Per-key rate limits shared by orchestrator replicas: `scheduler.ratelimit`'s sliding window, in Redis.

The same log, the same checks, the same answers as the in-process `RateLimiter` (which
explains why the window holds over every 60 s, not on average), kept per lane in three
Redis keys (`rediskeys.rate`): a sorted set of admissions by time, their charges net of
refunds, and the sum and latest time. Each operation is one Lua script, so two replicas
admitting for one key at once are serialised by Redis: together they never admit more than
the limit in any window. Time is the Redis server's clock (milliseconds), one clock for
every replica, never moving back; tests may pass their own.

The client is redis-py's asyncio one: the orchestrator admits on its event loop, and a
round trip must not hold the loop (nor a thread of its small pool) while Redis answers.
Calls made while a round trip is out go together in the next one (`Pipelined`).

A lane this replica has admitted in the last window is answered at once when what Redis
last said of it, plus what the replica admitted since, leaves room: the charge goes to Redis
behind the answer. Redis still keeps every window exact (it refuses a charge that does not
fit), but a replica that has not seen what the others admitted may pass the limit by what
it admits ahead of Redis's answer: at most half the limit, and only once the others used the
lane unseen. A lane unseen, or in the upper half of its limits, waits for Redis's answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
from redis.commands.core import AsyncScript

from dragonswarm.errors import StoreUnavailable
from dragonswarm.scheduler.ratelimit import WINDOW_S, Charge, Refusal, answer_without_log, fits_ahead, limited
from dragonswarm.store import rediskeys as rk
from dragonswarm.store.redis import async_client
from dragonswarm.store.redis_pipeline import Pipelined

log = logging.getLogger("dragonswarm.store")

WINDOW_MS = int(WINDOW_S * 1000)

# The time of this call in ms: the caller's (ARGV[n] not empty, for tests) or the server's.
# Scripts that call TIME and then write are replicated by their effects (Redis >= 5 may, 7 must).
_NOW = """
local function now_ms(given)
  if given ~= '' then return tonumber(given) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS: log, charges, state. ARGV: member, tokens, rpm, tpm, window ms, ttl ms, now ms or ''.
# Returns {1, now} when admitted (charged under `member`), {0, wait ms} when refused, each
# followed by the requests and tokens in the window after it.
ADMIT = _NOW + """
local log, charges, state = KEYS[1], KEYS[2], KEYS[3]
local member, tokens = ARGV[1], tonumber(ARGV[2])
if redis.call('HEXISTS', charges, member) == 1 then  -- sent again (its reply was lost): charged once
  local at = redis.call('ZSCORE', log, member)
  return {1, tostring(at), redis.call('ZCARD', log), tonumber(redis.call('HGET', state, 'sum')) or 0}
end
local rpm, tpm, window = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms(ARGV[7])
local latest = tonumber(redis.call('HGET', state, 'latest'))
if latest and latest > now then now = latest end  -- the window never moves back
local sum = tonumber(redis.call('HGET', state, 'sum')) or 0
-- charges as old as the window leave it
local old = redis.call('ZRANGEBYSCORE', log, '-inf', now - window)
for _, m in ipairs(old) do
  sum = sum - (tonumber(redis.call('HGET', charges, m)) or 0)
  redis.call('HDEL', charges, m)
end
if #old > 0 then redis.call('ZREMRANGEBYSCORE', log, '-inf', now - window) end
-- until when the request does not fit: the time the limiting charge leaves the window
local fits_at = now
local count = redis.call('ZCARD', log)
if rpm > 0 and count + 1 > rpm then
  local at = redis.call('ZRANGE', log, count - rpm, count - rpm, 'WITHSCORES')
  fits_at = math.max(fits_at, tonumber(at[2]) + window)
end
local excess = sum + tokens - tpm
if tpm > 0 and excess > 0 then
  local all = redis.call('ZRANGE', log, 0, -1, 'WITHSCORES')
  for i = 1, #all, 2 do
    excess = excess - (tonumber(redis.call('HGET', charges, all[i])) or 0)
    if excess <= 0 then
      fits_at = math.max(fits_at, tonumber(all[i + 1]) + window)
      break
    end
  end
end
local admitted = fits_at <= now
if admitted then
  redis.call('ZADD', log, now, member)
  redis.call('HSET', charges, member, tokens)
  sum = sum + tokens
end
redis.call('HSET', state, 'sum', sum, 'latest', now)
for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ARGV[6]) end
if admitted then return {1, tostring(now), count + 1, sum} end
return {0, tostring(fits_at - now), count, sum}
"""

# KEYS: log, charges, state. ARGV: member, tokens it now may keep. Lowers a charge still in
# the window (never raises it); one that left the window, or was cancelled, is untouched.
REFUND = """
local was = tonumber(redis.call('HGET', KEYS[2], ARGV[1]))
if not was then return 0 end
local now = math.min(was, tonumber(ARGV[2]))
if now < was then
  redis.call('HSET', KEYS[2], ARGV[1], now)
  redis.call('HINCRBY', KEYS[3], 'sum', now - was)
end
return 1
"""

# KEYS: log, charges, state. ARGV: member. Takes an admission back: request and tokens.
CANCEL = """
local was = tonumber(redis.call('HGET', KEYS[2], ARGV[1]))
if not was then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'sum', -was)
return 1
"""

# KEYS: log, charges. ARGV: window ms, now ms or ''. Returns {requests, tokens} in the window.
CHARGED = _NOW + """
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. (now_ms(ARGV[2]) - tonumber(ARGV[1])), '+inf')
local tokens = 0
for _, m in ipairs(members) do tokens = tokens + (tonumber(redis.call('HGET', KEYS[2], m)) or 0) end
return {#members, tokens}
"""


def _ms(now: float | None) -> str:
    return "" if now is None else str(round(now * 1000))


# Lanes a replica remembers what Redis last said of (the most recently admitted): beyond
# these, a lane's next admission waits for Redis, as a lane never seen does.
LANES_KEPT = 100_000


@dataclass
class _Lane:
    """A lane's window as Redis last answered for it, with what this replica admitted since
    (ahead of Redis's answer) counted in."""

    requests: int
    tokens: int
    seen: float  # monotonic time of that answer


class RedisRateLimiter:
    """Requests and tokens per minute per key, over windows every replica shares; 0 turns a limit off.

    The orchestrator's `Limiter`: `admit` raises `StoreUnavailable` when Redis does not answer
    (the request is refused with 503, nothing charged); `refund` and `cancel` never raise: a
    charge they could not lower stays until it leaves the window, which errs on the safe side."""

    def __init__(self, client: redis.asyncio.Redis, rpm: int, tpm: int) -> None:
        self.rpm, self.tpm = rpm, tpm
        self._r = client
        self._admit = client.register_script(ADMIT)
        self._refund = client.register_script(REFUND)
        self._cancel = client.register_script(CANCEL)
        self._charged = client.register_script(CHARGED)
        # Every call may run twice: an admission is recognised by its member, refunds and cancels are idempotent.
        self._calls = Pipelined(client, [self._admit, self._refund, self._cancel, self._charged], "shared rate limits")
        self._lanes: OrderedDict[str, _Lane] = OrderedDict()
        self._ahead: dict[str, list[int]] = {}  # lane -> [requests, tokens] admitted, Redis's answer to come

    @classmethod
    def from_url(cls, url: str, rpm: int, tpm: int) -> RedisRateLimiter:
        """A limiter on the Redis at `url` (the store's `connect` has checked it); it connects on first use."""
        return cls(async_client(url), rpm, tpm)

    async def admit(self, key: str, tokens: int, now: float | None = None) -> Charge | Refusal:
        """Charge a request of at most `tokens` tokens, or say why not and for how long (charging
        nothing). `now`: seconds on the caller's clock, for tests; None: the Redis server's clock."""
        answer = answer_without_log(key, tokens, now or 0.0, self.rpm, self.tpm)
        if answer is not None:
            return answer
        member = uuid.uuid4().hex
        args: list[str | int] = [member, tokens, self.rpm, self.tpm, WINDOW_MS, rk.RATE_TTL_S * 1000, _ms(now)]
        lane = self._lanes.get(key)
        if lane is not None and time.monotonic() - lane.seen < WINDOW_S and \
                fits_ahead(lane.requests, lane.tokens, tokens, self.rpm, self.tpm):  # fmt: skip
            lane.requests += 1
            lane.tokens += tokens
            ahead = self._ahead.setdefault(key, [0, 0])
            ahead[0] += 1
            ahead[1] += tokens
            self._calls.submit(self._admit, rk.rate(key), args, repeatable=True).add_done_callback(
                lambda answer: self._settled(key, tokens, answer))
            return Charge(key, now if now is not None else time.time(), tokens, handle=member)
        try:
            admitted, value, requests, used = await self._calls.call(self._admit, rk.rate(key), args, repeatable=True)
        except redis.RedisError as exc:
            log.warning("the shared rate limits (Redis) failed: %s", exc)
            raise StoreUnavailable("the orchestrator's shared rate limits are unavailable; retry shortly") from exc
        self._learn(key, int(requests), int(used))
        if admitted:
            return Charge(key, float(value) / 1000, tokens, handle=member)
        return limited(self.rpm, self.tpm, float(value) / 1000)

    def _learn(self, key: str, requests: int, tokens: int) -> None:
        """Redis's count of a lane after one of its calls, with what is still ahead of Redis counted in."""
        ahead = self._ahead.get(key, [0, 0])
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(0, 0, 0.0)
            while len(self._lanes) > LANES_KEPT:
                self._lanes.popitem(last=False)
        self._lanes.move_to_end(key)
        lane.requests, lane.tokens, lane.seen = requests + ahead[0], tokens + ahead[1], time.monotonic()

    def _settled(self, key: str, tokens: int, answer: asyncio.Future[Any]) -> None:
        """Redis's answer to a charge admitted ahead of it."""
        ahead = self._ahead.get(key)
        if ahead is not None:
            ahead[0] -= 1
            ahead[1] -= tokens
            if ahead[0] <= 0:
                del self._ahead[key]
        if answer.cancelled() or (error := answer.exception()) is not None:
            # The request runs uncharged; the lane's next admission waits for Redis again.
            self._lanes.pop(key, None)
            log.warning("the shared rate limits (Redis) failed to record a charge admitted ahead: %s",
                        "closed" if answer.cancelled() else error)  # fmt: skip
            return
        admitted, _, requests, used = answer.result()
        self._learn(key, int(requests), int(used))
        if not int(admitted):  # other replicas filled the window meanwhile: this one passed it by one
            log.info("lane %s was admitted ahead of Redis, which found its window full", key)

    async def refund(self, charge: Charge, used: int) -> None:
        """Lower a charge to the tokens the request really used: never below 0, never above what was charged."""
        lowered = min(charge.tokens, max(0, used))
        if charge.handle and lowered < charge.tokens:
            await self._run_quietly("refund", self._refund, charge, lowered)
        charge.tokens = lowered

    async def cancel(self, charge: Charge) -> None:
        """Take back an admission whose request was refused before it began: it counts for nothing."""
        if charge.handle:
            await self._run_quietly("cancel", self._cancel, charge)
        charge.tokens = 0

    async def _run_quietly(self, what: str, script: AsyncScript, charge: Charge,
                           *args: int) -> None:  # fmt: skip
        # The answer is out by now: a failure here must not turn it into an error.
        try:
            await self._calls.call(script, rk.rate(charge.key), [charge.handle, *args], repeatable=True)
        except redis.RedisError as exc:
            log.warning("the shared rate limits (Redis) failed to %s a charge; it stays until it leaves the "
                        "window: %s", what, exc)  # fmt: skip

    async def charged(self, key: str, now: float | None = None) -> tuple[int, int]:
        """(requests, tokens) charged to `key` in the window ending at `now` (None: the server's clock)."""
        # In line with the calls before it, those whose answers went ahead of Redis included.
        answer = await self._calls.call(self._charged, rk.rate(key)[:2], [WINDOW_MS, _ms(now)], repeatable=True)
        requests, tokens = answer
        return int(requests), int(tokens)

    async def close(self) -> None:
        await self._calls.close()
        await self._r.aclose()
