"""Rate limits shared through a real Redis: the Lua windows answer exactly as the in-process
`RateLimiter` does, and limiters on separate connections (replicas) never admit more than the
limit together. End to end, with two orchestrator processes, in test_replicas.py."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dragonswarm.errors import StoreUnavailable
from dragonswarm.scheduler.ratelimit import Charge, RateLimiter, Refusal
from dragonswarm.store import rediskeys
from dragonswarm.store.redis_limits import ADMIT, CANCEL, RedisRateLimiter
from dragonswarm.store.redis_server import start_local_redis

T = TypeVar("T")


def run(url: str, rpm: int, tpm: int, body: Callable[[RedisRateLimiter], Awaitable[T]]) -> T:
    """Run `body` with a limiter on its own connection, closed afterwards."""

    async def main() -> T:
        limiter = RedisRateLimiter.from_url(url, rpm, tpm)
        try:
            return await body(limiter)
        finally:
            await limiter.close()

    return asyncio.run(main())


def same(local: Charge | Refusal, shared: Charge | Refusal) -> None:
    if isinstance(local, Refusal):
        assert shared == local  # the same reason and the same exact wait
    else:
        assert isinstance(shared, Charge), (local, shared)
        assert (shared.key, shared.at, shared.tokens) == (local.key, local.at, local.tokens)


# --- the same answers as the in-process limiter -------------------------------------------------------


@dataclass(frozen=True)
class Admit:
    key: str
    after: float  # seconds after the previous operation
    tokens: int


@dataclass(frozen=True)
class Refund:
    which: int  # an earlier admission, modulo how many there were
    used: int


@dataclass(frozen=True)
class Cancel:
    which: int


# Times on a 1/4 s grid: exact in floating point and in whole milliseconds alike. Round gaps
# often land a request exactly a window after an earlier one: the edge where a charge leaves.
gaps = st.one_of(st.sampled_from([0.0, 15.0, 30.0, 60.0]), st.integers(0, 4 * 40).map(lambda q: q / 4))
operations = st.one_of(
    st.builds(Admit, st.sampled_from("ab"), gaps, st.integers(0, 1200)),
    st.builds(Refund, st.integers(0, 100), st.integers(-50, 1300)),
    st.builds(Cancel, st.integers(0, 100)),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rpm=st.integers(0, 8), tpm=st.integers(0, 3000), ops=st.lists(operations, max_size=50))
def test_the_lua_windows_answer_as_the_in_process_ones(redis_url: str, rpm: int, tpm: int,
                                                       ops: list[Admit | Refund | Cancel]) -> None:  # fmt: skip
    lanes = {name: f"{name}-{uuid.uuid4().hex}" for name in "ab"}  # each example its own keys

    async def check(shared: RedisRateLimiter) -> None:
        local = RateLimiter(rpm=rpm, tpm=tpm)
        now = 1000.0
        pairs: list[tuple[Charge, Charge]] = []
        for op in ops:
            if isinstance(op, Admit):
                now += op.after
                a = local.admit(lanes[op.key], op.tokens, now)
                b = await shared.admit(lanes[op.key], op.tokens, now=now)
                same(a, b)
                if isinstance(a, Charge) and isinstance(b, Charge):
                    pairs.append((a, b))
            elif pairs and isinstance(op, Refund):
                a, b = pairs[op.which % len(pairs)]
                local.refund(a, op.used)
                await shared.refund(b, op.used)
                assert a.tokens == b.tokens
            elif pairs and isinstance(op, Cancel):
                a, b = pairs[op.which % len(pairs)]
                local.cancel(a)
                await shared.cancel(b)
                assert a.tokens == b.tokens == 0
            for lane in lanes.values():
                assert await shared.charged(lane, now=now) == local.charged(lane, now)

    run(redis_url, rpm, tpm, check)


# --- replicas together --------------------------------------------------------------------------------


def test_two_replicas_admitting_at_once_never_pass_the_limit(redis_url: str) -> None:
    # Two limiters on two connections (two replicas), 120 requests each, all at once for one key.
    async def race(rpm: int, tpm: int, tokens: int) -> list[Charge | Refusal]:
        replicas = [RedisRateLimiter.from_url(redis_url, rpm, tpm) for _ in range(2)]
        try:
            asks = [replica.admit(f"key-{rpm}-{tpm}", tokens, now=5000.0) for replica in replicas for _ in range(120)]
            return list(await asyncio.gather(*asks))
        finally:
            for replica in replicas:
                await replica.close()

    results = asyncio.run(race(rpm=30, tpm=0, tokens=1))
    assert sum(isinstance(r, Charge) for r in results) == 30
    assert all(r.wait == 60.0 for r in results if isinstance(r, Refusal))
    results = asyncio.run(race(rpm=0, tpm=1000, tokens=70))
    assert sum(isinstance(r, Charge) for r in results) == 14  # 14 x 70 = 980; a 15th would pass 1000


def test_admissions_made_at_once_share_round_trips(redis_url: str) -> None:
    # A wave of requests on one replica: each admission is one script, but they travel
    # together. One connection per call waited for the pool (32) and then for the replica's
    # busy loop to read each answer: in a wave of 1,000 users that took seconds.
    async def wave(limiter: RedisRateLimiter) -> list[Charge | Refusal]:
        return list(await asyncio.gather(*(limiter.admit(f"key-{i % 50}", 10) for i in range(400))))

    with redis.Redis.from_url(redis_url) as client:
        before = int(client.info("stats")["total_connections_received"])
        results = run(redis_url, 5, 0, wave)
        opened = int(client.info("stats")["total_connections_received"]) - before
    assert sum(isinstance(r, Charge) for r in results) == 50 * 5  # every key's window holds, as one by one
    assert all(isinstance(r, Refusal) and r.wait is not None and 0 < r.wait <= 60
               for r in results if not isinstance(r, Charge))  # fmt: skip
    assert opened <= 2, f"{opened} connections for one wave"


def test_scripts_flushed_from_redis_are_loaded_again(redis_url: str) -> None:
    # A Redis restarted without persistence forgets its scripts: the next calls reload them.
    async def body(limiter: RedisRateLimiter) -> None:
        first = await limiter.admit("key-1", 10)
        with redis.Redis.from_url(redis_url) as client:
            client.script_flush()
        second, third = await asyncio.gather(limiter.admit("key-1", 10), limiter.admit("key-1", 10))
        assert isinstance(first, Charge) and isinstance(second, Charge) and isinstance(third, Refusal)
        await limiter.refund(first, 3)
        assert await limiter.charged("key-1") == (2, 13)

    run(redis_url, 2, 100, body)


def test_a_lane_seen_is_admitted_ahead_of_redis_and_charged_behind(tmp_path: Path) -> None:
    # Redis paused (SIGSTOP, our own server): a lane this replica admitted before is answered
    # at once from what Redis last said, while it stays in the lower half of its window; past
    # that, and for a lane never seen, admission waits for Redis. Once Redis answers again,
    # the charge made ahead is in its window.
    server = start_local_redis(tmp_path / "redis", persist=False)

    async def body(limiter: RedisRateLimiter) -> None:
        assert isinstance(await limiter.admit("seen", 10), Charge)
        server.process.send_signal(signal.SIGSTOP)
        try:
            ahead = await asyncio.wait_for(limiter.admit("seen", 10), 5)
            assert isinstance(ahead, Charge) and ahead.handle
            waiting = [asyncio.ensure_future(limiter.admit(lane, 10)) for lane in ("unseen", "seen")]
            await asyncio.sleep(0.5)
            assert not any(w.done() for w in waiting)  # a lane never seen; half of 4 requests used
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert all(isinstance(answer, Charge) for answer in [await w for w in waiting])
        assert await limiter.charged("seen") == (3, 30)

    try:
        run(server.url, 4, 100, body)
    finally:
        server.stop()


def test_replicas_admitting_ahead_pass_a_limit_by_one_batch_at_most(redis_url: str) -> None:
    # Replica B last saw a lane nearly empty; A then used most of it. B's burst is admitted
    # ahead up to half the limit by its stale view: Redis refuses what does not fit, so its
    # window never holds more than the limit, and what passed it is B's one batch. Once
    # Redis has answered, both refuse.
    async def race() -> tuple[int, int, list[Charge | Refusal]]:
        a, b = (RedisRateLimiter.from_url(redis_url, 10, 0) for _ in range(2))
        try:
            admitted = [await b.admit("lane", 1)]
            admitted += [await a.admit("lane", 1) for _ in range(8)]
            admitted += await asyncio.gather(*(b.admit("lane", 1) for _ in range(6)))
            in_redis, _ = await a.charged("lane")
            after = [await a.admit("lane", 1), await b.admit("lane", 1)]
            return sum(isinstance(c, Charge) for c in admitted), in_redis, after
        finally:
            await a.close()
            await b.close()

    admitted, in_redis, after = asyncio.run(race())
    assert in_redis == 10
    assert admitted == 13  # 9 before B's burst, then B's view (1 of 10) let 4 through ahead
    assert all(isinstance(r, Refusal) for r in after)


def test_an_admission_sent_again_is_charged_once(redis_url: str) -> None:
    # A pipeline whose reply was lost is sent again on a new connection: the admission is
    # recognised by its member and answered as before, never counted twice.
    keys = rediskeys.rate("lane")
    args = ["member-1", 70, 0, 1000, 60_000, 61_000, "5000"]
    with redis.Redis.from_url(redis_url) as client:
        first = client.eval(ADMIT, 3, *keys, *args)
        again = client.eval(ADMIT, 3, *keys, *args)
        assert first == again == [1, b"5000", 1, 70]

    async def body(limiter: RedisRateLimiter) -> None:
        assert await limiter.charged("lane", now=5.0) == (1, 70)

    run(redis_url, 0, 1000, body)


def test_scripts_lost_by_redis_run_again_in_their_order(redis_url: str) -> None:
    # Redis restarted empty of scripts, but one of them loaded again (say by a cancel sent
    # alone): a batch of an admission and its cancel must not run the cancel first.
    async def body(limiter: RedisRateLimiter) -> None:
        assert isinstance(await limiter.admit("lane", 10), Charge)  # known: the next goes ahead
        with redis.Redis.from_url(redis_url) as client:
            client.script_flush()
            client.script_load(CANCEL)
        ahead = await limiter.admit("lane", 10)
        assert isinstance(ahead, Charge)
        await limiter.cancel(ahead)  # in the same batch as the admission
        assert await limiter.charged("lane") == (1, 10)

    run(redis_url, 4, 100, body)


def test_on_the_servers_clock_a_refusal_says_how_long(redis_url: str) -> None:
    async def body(limiter: RedisRateLimiter) -> None:
        first = await limiter.admit("key-1", 10)
        second = await limiter.admit("key-1", 10)
        assert isinstance(first, Charge) and isinstance(second, Charge) and second.at >= first.at
        third = await limiter.admit("key-1", 10)
        assert isinstance(third, Refusal) and third.wait is not None and 0 < third.wait <= 60
        assert "2 requests and 100 tokens per minute" in third.reason
        assert await limiter.charged("key-1") == (2, 20)
        await limiter.refund(first, 4)
        await limiter.cancel(second)
        assert await limiter.charged("key-1") == (1, 4)
        too_big = await limiter.admit("key-1", 101)
        assert isinstance(too_big, Refusal) and too_big.wait is None  # never fits: no round trip, no wait

    run(redis_url, 2, 100, body)
    with redis.Redis.from_url(redis_url) as client:  # a lane's keys go a window after its last admission
        for name in rediskeys.rate("key-1"):
            assert 0 < client.pttl(name) <= rediskeys.RATE_TTL_S * 1000
        assert set(client.scan_iter()) == {n.encode() for n in rediskeys.rate("key-1")}


def test_without_limits_nothing_reaches_redis(redis_url: str) -> None:
    async def body(limiter: RedisRateLimiter) -> None:
        charge = await limiter.admit("key-1", 10**9)
        assert isinstance(charge, Charge) and not charge.handle
        await limiter.refund(charge, 5)
        await limiter.cancel(charge)

    run(redis_url, 0, 0, body)
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0


def test_a_redis_gone_away_refuses_admission_and_lets_refunds_pass(tmp_path: Path) -> None:
    server = start_local_redis(tmp_path / "redis", persist=False)

    async def body(limiter: RedisRateLimiter) -> None:
        charge = await limiter.admit("key-1", 10)
        assert isinstance(charge, Charge)
        server.stop()
        with pytest.raises(StoreUnavailable):
            await limiter.admit("key-2", 10)  # a lane never seen waits for Redis
        # A lane seen has one admission answered ahead of Redis; its charge cannot be
        # recorded, and from then on the lane waits for Redis too.
        ahead = await limiter.admit("key-1", 10)
        assert isinstance(ahead, Charge)
        with pytest.raises(redis.RedisError):  # in line behind that charge: once it fails, so has the charge
            await limiter.charged("key-1")
        with pytest.raises(StoreUnavailable):
            await limiter.admit("key-1", 10)
        await limiter.refund(charge, 1)  # the answer is out: logged, never raised
        await limiter.cancel(charge)

    try:
        run(server.url, 5, 100, body)
    finally:
        server.stop()
